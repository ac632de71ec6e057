"""Memories counted in bytes: the codecs (raw, JPEG through Pillow, NeRV), the budget, the
8-bit packing they share with the compression code, and generative replay's GAN."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from incremental.cli import main
from incremental.data.base import resize_uint8
from incremental.data.digits import build_digits
from incremental.data.options import DigitsConfig
from incremental.memory.budget import LABEL_BYTES, ByteBudgetMemory
from incremental.memory.codecs import JPEGCodec, NeRVCodec, RawCodec, fitted_downsample, payload_bytes, psnr_db
from incremental.memory.options import JPEGCodecConfig, NeRVCodecConfig, RawCodecConfig
from incremental.models.compress import magnitude_prune, pack_int8, pack_uint8_per_channel, packed_bytes, unpack_int8


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, list[int]]:
    splits = build_digits(DigitsConfig())
    return splits.train.images, splits.train.targets


def class_images(digits, label: int, n: int | None = None) -> torch.Tensor:
    images, targets = digits
    return images[[i for i, t in enumerate(targets) if t == label]][:n]


FAST_NERV = NeRVCodecConfig(steps=60, finetune_steps=10, max_width=8)


# ------------------------------------------------------------------ codecs


def test_raw_codec_keeps_the_pixels_that_fit(digits):
    images = class_images(digits, 1, 20)
    payload = RawCodec().encode(images, 5 * 1024 + 1000, seed=0)
    assert torch.equal(RawCodec().decode(payload), images[:5])  # 1 KiB each at 32 px, grey
    assert payload_bytes(payload) == 5 * 1024 == payload["pixels"].nbytes
    assert RawCodec().encode(images, 1023, seed=0) is None


def linear_upsampling(small: int, large: int) -> np.ndarray:
    """(large, small): 1-D linear interpolation with half-pixel centres, written from its
    definition (source x = (i + 0.5) * small / large - 0.5, clamped at the edges)."""
    matrix = np.zeros((large, small))
    for i in range(large):
        x = min(max((i + 0.5) * small / large - 0.5, 0.0), small - 1)
        left = int(np.floor(x))
        right, weight = min(left + 1, small - 1), x - np.floor(x)
        matrix[i, left] += 1 - weight
        matrix[i, right] += weight
    return matrix


def test_fitted_downsample_is_the_least_squares_inverse_of_bilinear_upsampling():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 1, 20, 20), generator=generator, dtype=torch.uint8)
    upsampling = np.kron(linear_upsampling(5, 20), linear_upsampling(5, 20))  # vec(U X U^T), row-major
    solution = [np.linalg.lstsq(upsampling, image[0].double().numpy().ravel(), rcond=None)[0] for image in images]
    expected = np.clip(np.round(np.stack(solution)), 0, 255).reshape(3, 1, 5, 5)
    np.testing.assert_array_equal(fitted_downsample(images, 5).numpy(), expected)
    # the upsampling that decodes them (the dataset's resize_uint8) is the matrix the test wrote
    small = torch.randint(0, 256, (1, 1, 5, 5), generator=generator, dtype=torch.uint8)
    by_matrix = np.clip(np.round(upsampling @ small[0, 0].double().numpy().ravel()), 0, 255).reshape(20, 20)
    np.testing.assert_array_equal(resize_uint8(small, (20, 20))[0, 0].numpy(), by_matrix)


def test_raw_codec_at_the_digits_native_resolution_is_near_lossless(digits):
    """Digits are 8 x 8 images upsampled to 32 px: stored at size 8 an exemplar takes 64 bytes
    and decodes to the training image, where an antialiased resize would blur it."""
    images = class_images(digits, 3, 40)
    codec = RawCodec(RawCodecConfig(size=8))
    payload = codec.encode(images, 30 * 64 + 4 + 63, seed=0)
    assert codec.count(payload) == 30 and payload["pixels"].shape == (30, 1, 8, 8)
    assert payload_bytes(payload) == 30 * 64 + 4  # and the original height and width, int16
    decoded = codec.decode(payload)
    assert decoded.shape == (30, 1, 32, 32) and psnr_db(decoded, images[:30]) > 60
    assert (decoded != images[:30]).float().mean() < 1e-3
    assert psnr_db(resize_uint8(resize_uint8(images, 8), 32), images) < 25  # the blur avoided
    smaller = codec.shrink(payload, 10 * 64 + 4, seed=0)  # the stored pixels, cut, never resized again
    assert torch.equal(smaller["pixels"], payload["pixels"][:10]) and torch.equal(smaller["shape"], payload["shape"])
    assert codec.smallest_exemplar(images) == 68 and codec.encode(images, 67, seed=0) is None
    assert RawCodec(RawCodecConfig(size=32)).encode(images, 2048, seed=0).keys() == {"pixels"}  # already that size


def test_jpeg_payload_is_pillows_files_and_decodes_as_pillow_does(digits):
    images = class_images(digits, 2, 12)
    codec = JPEGCodec(JPEGCodecConfig(quality=50))
    payload = codec.encode(images, 10 ** 6, seed=0)
    lengths = payload["lengths"].tolist()
    assert payload_bytes(payload) == sum(lengths) + 4 * len(lengths) == payload["data"].nbytes + payload["lengths"].nbytes
    decoded = codec.decode(payload)
    raw = payload["data"].numpy().tobytes()
    first = Image.open(io.BytesIO(raw[:lengths[0]]))  # a JPEG file Pillow reads by itself
    assert first.format == "JPEG" and first.size == (32, 32)
    assert np.array_equal(np.asarray(first), decoded[0, 0].numpy())
    # the same image encoded independently has the same bytes
    again = io.BytesIO()
    Image.fromarray(images[0, 0].numpy()).save(again, format="JPEG", quality=50)
    assert again.getvalue() == raw[:lengths[0]]
    assert 25.0 < psnr_db(decoded, images) < 60.0
    # lower quality: smaller files, more of them fit the same budget
    low = JPEGCodec(JPEGCodecConfig(quality=10))
    assert low.count(low.encode(images, 4000, seed=0)) > codec.count(codec.encode(images, 4000, seed=0))


def test_jpeg_shrink_drops_the_last_files_without_re_encoding(digits):
    codec = JPEGCodec(JPEGCodecConfig(quality=75))
    payload = codec.encode(class_images(digits, 3, 10), 10 ** 6, seed=0)
    smaller = codec.shrink(payload, payload_bytes(payload) // 2, seed=0)
    n = codec.count(smaller)
    assert 0 < n < 10 and payload_bytes(smaller) <= payload_bytes(payload) // 2
    assert torch.equal(smaller["lengths"], payload["lengths"][:n])
    assert torch.equal(smaller["data"], payload["data"][:int(payload["lengths"][:n].sum())])


def test_nerv_reaches_25_db_on_digits_exemplars_in_300_steps(digits):
    images = class_images(digits, 4, 16)
    codec = NeRVCodec(NeRVCodecConfig(steps=300, finetune_steps=50, max_width=16, expansion=1.0))
    payload = codec.encode(images, 16 * 1024, seed=0)
    assert codec.count(payload) == 16 and payload_bytes(payload) <= 16 * 1024
    decoded = codec.decode(payload)
    assert decoded.dtype == torch.uint8 and decoded.shape == images.shape
    assert psnr_db(decoded, images) >= 25.0
    # what is stored is 8-bit weights: the only floats are each channel's minimum and step
    floats = {k for k, t in payload.items() if t.is_floating_point()}
    assert floats and all(k.endswith((".min", ".scale")) for k in floats)
    assert all(payload[k].dtype == torch.uint8 for k in payload if k.endswith(".q"))


def test_nerv_holds_more_exemplars_than_raw_pixels_in_the_same_bytes(digits):
    images = class_images(digits, 5)
    budget = 4 * 1024
    nerv = NeRVCodec(FAST_NERV)
    payload = nerv.encode(images, budget, seed=0)
    assert nerv.count(payload) == 4 * RawCodec().count(RawCodec().encode(images, budget, seed=0))  # expansion 4
    assert payload_bytes(payload) <= budget


def _fit_alone(images: torch.Tensor, *, width: int, steps: int, finetune_steps: int, lr: float, prune: float,
               seed: int) -> torch.nn.Module:
    """One NeRV fitted by itself with a plain nn.Module loop: its own Adam, cosine LR and MSE,
    masked after each fine-tuning step (what the codec did before it batched its fits)."""
    from incremental.memory.nerv import NeRV, frame_positions
    from incremental.models.compress import apply_masks

    targets = images.float() / 255
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = NeRV(width=width, image_size=images.shape[-1], channels=images.shape[1], levels=40)
    t = frame_positions(len(images))

    def fit(count: int, rate: float, masks) -> None:
        optimizer = torch.optim.Adam(net.parameters(), lr=rate, betas=(0.5, 0.999))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=count)
        for _ in range(count):
            loss = torch.nn.functional.mse_loss(net(t), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            if masks is not None:
                apply_masks(net, masks)

    fit(steps, lr, None)
    masks = magnitude_prune(net, prune)
    fit(finetune_steps, lr * 0.1, masks)
    return net


def test_batched_nerv_fits_equal_each_network_fitted_alone(digits):
    """Three classes of different sizes (padded in the batch) fitted together give the weights
    each gets alone, to float rounding; and so the same stored bytes but for rare rounding."""
    from incremental.memory.nerv import NeRV, encode_many

    classes = [class_images(digits, label, n) for label, n in ((0, 12), (1, 7), (2, 10))]
    seeds = [11, 12, 13]
    fitted = encode_many(classes, seeds, width=8, levels=40, steps=25, lr=5e-3, prune=0.4, finetune_steps=5)
    for images, seed, (payload, report) in zip(classes, seeds, fitted):
        alone = _fit_alone(images, width=8, steps=25, finetune_steps=5, lr=5e-3, prune=0.4, seed=seed)
        rebuilt = NeRV(width=8, image_size=32, channels=1, levels=40)
        unpack_int8(rebuilt, payload)
        rebuilt_params = dict(rebuilt.named_parameters())
        for name, p in alone.named_parameters():  # by name: pruning moves a weight to the list's end
            q = rebuilt_params[name]
            scale = float(payload[f"{name}.scale"].max())  # per channel: the widest channel's step
            assert (p - q).abs().max() <= scale / 2 + 1e-4, name  # equal up to the 8-bit rounding
        assert report.steps == 30 and int(payload["frames"][0]) == len(images)


def test_a_target_psnr_stops_each_fit_when_reached_and_reports_it(digits):
    from incremental.memory.nerv import encode_many

    classes = [class_images(digits, label, 8) for label in (3, 4)]
    plain = encode_many(classes, [1, 2], width=8, levels=40, steps=120, lr=5e-3, prune=0.4, finetune_steps=0)
    stopped = encode_many(classes, [1, 2], width=8, levels=40, steps=120, lr=5e-3, prune=0.4, finetune_steps=0,
                          target_psnr=14.0)
    for (_, full), (_, early) in zip(plain, stopped):
        assert full.steps == 120 and full.psnr_db > 14.0
        assert 0 < early.steps < 120 and early.psnr_db >= 14.0


def test_the_memory_reports_each_nerv_fit(digits):
    config = dataclasses.replace(FAST_NERV, target_psnr=12.0)
    memory = ByteBudgetMemory(8 * 1024, NeRVCodec(config), seed=0)
    images, targets = digits
    ranked = {label: [i for i, t in enumerate(targets) if t == label][:10] for label in (0, 1)}
    memory.add_classes(0, ranked, lambda order: images[order])
    report = memory.report(lambda experience, indices: images[indices])
    assert set(report["fits"]) == {"0", "1"}
    assert all(fit["steps"] <= config.steps + config.finetune_steps for fit in report["fits"].values())


def test_int8_packing_stores_exactly_the_predicted_bytes_and_round_trips():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.GELU(), torch.nn.Linear(30, 5))
    predicted = packed_bytes(net, 0.4)
    masks = magnitude_prune(net, 0.4)
    weights = 20 * 30 + 30 * 5
    assert sum(int((~m).sum()) for m in masks.values()) == round(weights * 0.4)  # global, exact count
    packed = pack_int8(net, masks)
    assert payload_bytes(packed) == predicted
    rebuilt = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.GELU(), torch.nn.Linear(30, 5))
    unpack_int8(rebuilt, packed)
    restored = dict(rebuilt.named_parameters())
    for name, p in net.named_parameters():
        q = restored[name]
        scale = float(packed[f"{name}.scale"])
        assert (p - q).abs().max() <= scale / 2 + 1e-6  # the rounding error of 8-bit quantization
        if name in masks:
            assert bool((q[~masks[name]] == 0).all())  # pruned weights come back as zeros


# ------------------------------------------------------------------ the budget


@pytest.mark.parametrize("codec", [RawCodec(), RawCodec(RawCodecConfig(size=8)), JPEGCodec(JPEGCodecConfig(quality=50)),
                                   NeRVCodec(FAST_NERV)], ids=["raw", "raw_8px", "jpeg", "nerv"])
def test_a_byte_budget_is_never_exceeded_and_classes_stay_balanced(digits, codec):
    images, targets = digits
    budget = 12_000
    memory = ByteBudgetMemory(budget, codec, seed=0)
    for experience, labels in enumerate([(0, 1), (2, 3), (4, 5, 6)]):
        ranked = {label: [i for i, t in enumerate(targets) if t == label] for label in labels}
        memory.add_classes(experience, ranked, lambda indices: images[indices])
        assert memory.bytes_used() <= budget
        share = budget // len(memory.classes)
        for label, stored in memory.classes.items():
            assert LABEL_BYTES + payload_bytes(stored.payload) <= share
        state = memory.state_dict()
        stored_bytes = sum(LABEL_BYTES + payload_bytes(c["payload"]) for c in state["classes"].values())
        assert stored_bytes == memory.bytes_used()  # what the checkpoint keeps is what is counted
        report = memory.report(lambda exp, indices: images[indices])
        assert report["bytes"] == memory.bytes_used() and report["exemplars"] == len(memory)
    counts = [codec.count(c.payload) for c in memory.classes.values()]
    assert max(counts) - min(counts) <= max(2, max(counts) // 3)
    decoded_images, labels = memory.decoded()
    assert len(decoded_images) == len(labels) == len(memory)
    assert sorted(set(labels.tolist())) == list(range(7))


def test_raw_memory_keeps_the_herding_prefix_when_it_shrinks(digits):
    images, targets = digits
    memory = ByteBudgetMemory(10 * 1024 + 2 * LABEL_BYTES, RawCodec(), seed=0)
    order = [i for i, t in enumerate(targets) if t == 7][::-1]
    memory.add_classes(0, {7: order, 8: [i for i, t in enumerate(targets) if t == 8]}, lambda idx: images[idx])
    assert memory.classes[7].indices == order[:5]
    memory.add_classes(1, {9: [i for i, t in enumerate(targets) if t == 9]}, lambda idx: images[idx])
    assert memory.classes[7].indices == order[:3]  # (10 KiB + 4) / 3 classes: 3 exemplars of 1 KiB
    assert torch.equal(memory.classes[7].payload["pixels"], images[order[:3]])


# ------------------------------------------------------------------ runs


BYTE_RUN = """
name: bytes
seed: 5
dataset: {name: digits, image_size: 16}
protocol: {initial_classes: 4, increment: 3, memory: {bytes: 6000, codec: {name: jpeg, quality: 60}}}
backbone: {name: vit, patch_size: 4, embed_dim: 32, depth: 1, num_heads: 2, global_pool: avg}
strategy: {name: replay}
training: {epochs: 1, batch_size: 32}
output: {tensorboard: false}
"""


def test_a_run_records_bytes_exemplars_and_psnr_per_experience(write_yaml, tmp_path):
    config = write_yaml(BYTE_RUN)
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics["memory"]) == 3
    for row, seen in zip(metrics["memory"], (4, 7, 10)):
        assert row["codec"] == "jpeg" and row["budget_bytes"] == 6000
        assert 0 < row["bytes"] <= 6000 and row["classes"] == seen
        assert row["exemplars"] >= seen  # every class keeps some (a 16 px JPEG is ~400 bytes with its header)
        assert 20.0 < row["psnr_db"] < 60.0
    # the training set of experience 1 is its new images plus every decoded exemplar
    targets = build_digits(DigitsConfig(image_size=16)).train.targets
    new_classes = set(metrics["experiences"][1])  # original class ids
    new_images = sum(1 for t in targets if t in new_classes)
    assert metrics["train_samples"][1] == new_images + metrics["memory"][0]["exemplars"]


def test_a_count_memory_reports_raw_bytes(write_yaml, tmp_path):
    config = write_yaml(BYTE_RUN.replace("memory: {bytes: 6000, codec: {name: jpeg, quality: 60}}", "memory: {total: 20}"))
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [m["exemplars"] for m in metrics["memory"]] == [20, 20, 20]
    assert [m["bytes"] for m in metrics["memory"]] == [20 * 256] * 3


@pytest.mark.parametrize("codec", [RawCodec(), JPEGCodec(JPEGCodecConfig()), NeRVCodec(FAST_NERV)],
                         ids=["raw", "jpeg", "nerv"])
def test_a_budget_below_one_exemplar_per_class_is_refused_and_the_bound_is_tight(digits, codec):
    """The smallest budget accepted stores one exemplar of the smallest image; one byte less is refused."""
    sample = digits[0][:64]
    one = LABEL_BYTES + codec.smallest_exemplar(sample)
    smallest = int(np.argmin([codec.smallest_exemplar(sample[i:i + 1]) for i in range(len(sample))]))
    memory = ByteBudgetMemory(2 * one, codec, seed=0)
    memory.check_holds_one_exemplar(sample, 2, "x")
    memory.add_classes(0, {0: [smallest], 1: [smallest]}, lambda indices: sample[indices])
    assert len(memory) == 2 and memory.bytes_used() <= 2 * one
    from incremental.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        ByteBudgetMemory(2 * one - 1, codec, seed=0).check_holds_one_exemplar(sample, 2, "x")
    assert refused.value.key == "protocol.memory.bytes"
    assert f"one x exemplar of this dataset takes at least {one} bytes" in str(refused.value)
    assert f"the 2 classes of experience 0 need at least {2 * one} bytes" in str(refused.value)


def test_per_channel_packing_is_the_references_asymmetric_quantisation_and_stores_the_predicted_bytes():
    """Per output channel c: code = round((w - min_c) / step_c), step_c = (max_c - min_c) / 255,
    min and max over the entries pruning kept (NeRV's quantize_per_tensor, quant_axis 0); each
    channel's minimum and maximum come back exact, every entry within half its channel's step,
    pruned entries stay zero, and a channel 100x narrower than another is not quantised at the
    wider one's step, as one scale per tensor would."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(20, 6), torch.nn.GELU(), torch.nn.Linear(6, 4))
    with torch.no_grad():
        net[0].weight[0] *= 100.0  # one wide channel
    predicted = packed_bytes(net, 0.3, per_channel=True)
    masks = magnitude_prune(net, 0.3)
    packed = pack_uint8_per_channel(net, masks)
    assert payload_bytes(packed) == predicted and packed["0.weight.q"].dtype == torch.uint8
    rebuilt = torch.nn.Sequential(torch.nn.Linear(20, 6), torch.nn.GELU(), torch.nn.Linear(6, 4))
    unpack_int8(rebuilt, packed)
    for name, p in net.named_parameters():
        q = dict(rebuilt.named_parameters())[name].detach()
        w = p.detach().reshape(p.shape[0] if p.dim() > 1 else 1, -1).numpy()
        keep = masks[name].reshape(w.shape).numpy() if name in masks else np.ones_like(w, dtype=bool)
        restored = q.reshape(w.shape).numpy()
        for c in range(len(w)):
            kept = w[c][keep[c]]
            low, high = kept.min(), kept.max()
            step = (high - low) / 255
            assert np.allclose(restored[c][keep[c]].min(), low, atol=1e-6)
            assert np.allclose(restored[c][keep[c]].max(), high, atol=1e-5 * max(1.0, abs(high)))
            assert np.abs(restored[c][keep[c]] - kept).max() <= step / 2 + 1e-6
        assert (restored[~keep] == 0).all()
    narrow = np.abs(dict(rebuilt.named_parameters())["0.weight"].detach().numpy()[1:] - net[0].weight.detach().numpy()[1:])
    per_tensor = pack_int8(net, masks)["0.weight.scale"].item()
    assert narrow.max() < per_tensor / 10  # the narrow channels' error, against one step for the tensor
