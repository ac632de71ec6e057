"""Runs on a CUDA device: mixed precision, channels_last, torch.compile, determinism. Skipped
(cleanly, at collection) where torch sees no GPU, as on CI."""

from __future__ import annotations

import pytest
import torch

from conftest import run_tiny


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run_on_gpu(tmp_path, name: str, *sets: str) -> dict:
    return run_tiny(tmp_path, name, "training.device=cuda", "training.epochs=3", *sets)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu_is_close_to_fp32(tmp_path, precision):
    fp32 = run_on_gpu(tmp_path, "fp32")
    low = run_on_gpu(tmp_path, precision, f"training.precision={precision}")
    assert low["status"] == "complete"
    assert low["train_loss"][0] == pytest.approx(fp32["train_loss"][0], abs=0.1)


def test_channels_last_resnet_and_compile_on_gpu(tmp_path):
    plain = run_on_gpu(tmp_path, "plain", "backbone={name: resnet32, width: 8}")
    fast = run_on_gpu(tmp_path, "fast", "backbone={name: resnet32, width: 8}", "training.channels_last=true",
                      "training.compile=true", "training.precision=bf16")
    assert fast["status"] == "complete"
    assert fast["train_loss"][0] == pytest.approx(plain["train_loss"][0], abs=0.15)


def test_deterministic_mode_repeats_a_gpu_run_exactly(tmp_path):
    a = run_on_gpu(tmp_path, "a", "training.deterministic=true")
    b = run_on_gpu(tmp_path, "b", "training.deterministic=true")
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["train_loss"] == b["train_loss"]


def test_gpu_jpeg_decoding_matches_the_cpu_decoder(tmp_path):
    """nvJPEG and libjpeg-turbo may differ by a grey level (their IDCTs); the crops built on
    them agree to that."""
    from test_jpeg_path import image_folder

    from incremental.data.device import resolve
    from incremental.data.jpeg import FileBatchLoader

    splits, benchmark = image_folder(tmp_path)
    data = benchmark.test_stream[0].dataset
    batches = {device: torch.cat([x.cpu() for x, _, _ in FileBatchLoader(
        resolve(data), torch.device(device), splits.batch_augmentation, batch_size=4, train=False, shuffle=False)])
        for device in ("cpu", "cuda")}
    assert (batches["cuda"] - batches["cpu"]).abs().max() <= 2 * 2 / 255  # 2 grey levels, in units of std 0.5


def test_balanced_finetuning_and_mae_train_on_the_gpu_engine_in_bf16_compiled(tmp_path):
    """The engine's loops outside the template on CUDA: ViTIL's balanced finetuning and MAE
    pretraining with bf16 autocast and torch.compile, close to the eager fp32 runs."""
    from test_engine import _pretrain

    plain = run_on_gpu(tmp_path, "vitil", "strategy=vitil", "strategy.balanced_finetuning.epochs=1")
    fast = run_on_gpu(tmp_path, "vitil_fast", "strategy=vitil", "strategy.balanced_finetuning.epochs=1",
                      "training.precision=bf16", "training.compile=true")
    assert fast["status"] == "complete" and all(fast["wall_time_s"][i]["balanced_finetuning"] > 0 for i in (1, 2))
    assert fast["train_loss"][0] == pytest.approx(plain["train_loss"][0], abs=0.15)
    eager = _pretrain(tmp_path, "mae", "training.device=cuda")
    compiled = _pretrain(tmp_path, "mae_fast", "training.device=cuda", "training.precision=bf16",
                         "training.compile=true")
    assert compiled["compile_s"] > 0
    assert compiled["epoch_loss"] == pytest.approx(eager["epoch_loss"], rel=0.05)


def test_gan_fitting_on_the_gpu_in_bf16_channels_last():
    """The GAN trains on the GPU (bf16 forward passes, channels-last) and comes back to the CPU;
    its samples are images of the right classes' shape, and its losses are finite."""
    from incremental.memory.gan import Generator, ProjectionDiscriminator, sample, train_gan

    torch.manual_seed(0)
    generator = Generator(num_classes=4, channels=1, image_size=16, width=8, z_dim=16)
    discriminator = ProjectionDiscriminator(num_classes=4, channels=1, image_size=16, width=8)
    previous = Generator(num_classes=4, channels=1, image_size=16, width=8, z_dim=16).eval()
    real = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8)
    losses = train_gan(generator, discriminator, real, torch.randint(2, 4, (64,)), previous=previous,
                       old_labels=[0, 1], steps=20, batch_size=16, lr=2e-4, loss="hinge", d_steps=1,
                       diffaugment=True, gp_weight=10.0, device="cuda")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert next(generator.parameters()).device.type == "cpu"
    images = sample(generator, torch.tensor([0, 3]))
    assert images.shape == (2, 1, 16, 16) and 0 <= float(images.min()) and float(images.max()) <= 1


def test_the_feature_cache_on_the_gpu_gives_the_uncached_matrix(tmp_path):
    cached = run_on_gpu(tmp_path, "cached", "strategy=simplecil")
    plain = run_on_gpu(tmp_path, "plain", "strategy=simplecil", "training.feature_cache_mb=0")
    assert cached["accuracy_matrix"] == plain["accuracy_matrix"]
