"""The one training engine (incremental.training.engine): the plain loop that balanced
finetuning and MAE pretraining run on, with the run's precision, compile and NaN checks.
Sharding under torchrun is tested in tests/test_distributed.py, the template's own use of the
engine in tests/test_precision.py."""

from __future__ import annotations

import json

import pytest
import torch

from incremental.errors import UserError
from incremental.training.optim import LOSS_CHECK_EVERY, check_finite
from incremental.training.engine import TrainingEngine


def _fit(engine: TrainingEngine, model: torch.nn.Module, batches, **kwargs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for group in optimizer.param_groups:
        group["base_lr"] = 0.1
    criterion = torch.nn.CrossEntropyLoss()
    return engine.fit(model, batches, optimizer, epochs=kwargs.pop("epochs", 1), desc="test",
                      lr_factor=lambda iteration, steps: 1.0,
                      loss=lambda forward, batch: criterion(forward(batch[0]).float(), batch[1]),
                      check=lambda value, when: check_finite(value, "test loss", when, key="test.lr"), **kwargs)


def test_a_nan_is_found_within_the_epoch_at_the_next_loss_read():
    """The loss is read every LOSS_CHECK_EVERY steps, not only at the epoch's end: a NaN from step
    10 of a 3-read epoch stops the loop at the first read, naming the epoch and step from 1."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    steps = []
    model.register_forward_pre_hook(lambda module, inputs: steps.append(1))
    x = torch.randn(8, 4)
    batches = [[x if i < 9 else torch.full_like(x, float("nan")), torch.zeros(8, dtype=torch.long)]
               for i in range(3 * LOSS_CHECK_EVERY)]
    with pytest.raises(UserError, match=rf"test loss became nan in epoch 1 of 1 \(step {LOSS_CHECK_EVERY}\)") as info:
        _fit(TrainingEngine("cpu"), model, batches)
    assert info.value.key == "test.lr"
    assert len(steps) == LOSS_CHECK_EVERY  # stopped at the first read, not at the epoch's end


def test_epoch_losses_are_the_mean_over_steps_and_the_lr_follows_the_schedule():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    batches = [[torch.randn(8, 4), torch.randint(0, 3, (8,))] for _ in range(3)]
    seen_lrs, seen_losses = [], []
    criterion = torch.nn.CrossEntropyLoss()

    def loss(forward, batch):
        value = criterion(forward(batch[0]), batch[1])
        seen_losses.append(float(value.detach()))
        return value

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    optimizer.param_groups[0]["base_lr"] = 0.2
    model.register_forward_pre_hook(lambda module, inputs: seen_lrs.append(optimizer.param_groups[0]["lr"]))
    losses = TrainingEngine("cpu").fit(model, batches, optimizer, epochs=2, loss=loss, desc="test",
                                       lr_factor=lambda iteration, steps: 1 / (1 + iteration),
                                       check=lambda value, when: None)
    assert seen_lrs == pytest.approx([0.2 / (1 + i) for i in range(6)])
    assert losses == pytest.approx([sum(seen_losses[:3]) / 3, sum(seen_losses[3:]) / 3], rel=1e-6)


def test_fp16_runs_the_forward_under_autocast_and_steps_through_the_loss_scaler():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    dtypes = []
    model.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    engine = TrainingEngine("cpu", precision="fp16")
    batches = [[torch.randn(8, 4), torch.randint(0, 3, (8,))] for _ in range(2)]
    before = model.weight.detach().clone()
    _fit(engine, model, batches)
    assert dtypes == [torch.float16, torch.float16]
    assert engine.scaler.is_enabled() and engine.scaler.get_scale() > 1  # the scaled backward ran
    assert not torch.equal(before, model.weight)
    assert model.weight.dtype == torch.float32  # master weights stay fp32


MAE_RUN = """
name: mae
seed: 3
dataset: {name: digits, image_size: 16}
protocol: {initial_classes: 4, increment: 3}
backbone: {name: vit, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, global_pool: avg, drop_path_rate: 0.0}
mae: {epochs: 2, batch_size: 32, base_lr: 4.0e-3, warmup_epochs: 1, decoder_embed_dim: 32, decoder_num_heads: 2}
"""


def _pretrain(tmp_path, name: str, *sets: str) -> dict:
    from incremental.cli import main

    config = tmp_path / "mae.yaml"
    config.write_text(MAE_RUN)
    overrides = [a for s in sets for a in ("--set", s)]
    assert main(["pretrain-mae", str(config), "--out", str(tmp_path / name), "--quiet", *overrides]) == 0
    return json.loads((tmp_path / name / "mae_log.json").read_text())


def test_mae_pretraining_takes_the_runs_precision(tmp_path, one_thread):
    fp32 = _pretrain(tmp_path, "fp32")
    bf16 = _pretrain(tmp_path, "bf16", "training.precision=bf16")
    assert bf16["epoch_loss"] != fp32["epoch_loss"]  # autocast really ran
    assert bf16["epoch_loss"] == pytest.approx(fp32["epoch_loss"], rel=0.05)


def test_mae_pretraining_compiles_one_graph_and_reports_its_time_apart(tmp_path, one_thread):
    """The masking noise is an input, not drawn in the graph, and every batch is full: one graph
    for the whole pretraining, the same losses as eager, compile seconds in the log."""
    import torch._dynamo

    eager = _pretrain(tmp_path, "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compiled = _pretrain(tmp_path, "compiled", "training.compile=true")
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, dict(torch._dynamo.utils.counters["stats"])
        assert not torch._dynamo.utils.counters["recompiles"]
    finally:
        torch._dynamo.reset()
    assert compiled["compile_s"] > 0 and "compile_s" not in eager
    assert compiled["epoch_loss"] == pytest.approx(eager["epoch_loss"], rel=1e-3)


def test_balanced_finetuning_on_a_compiling_engine_never_runs_the_backbone_eagerly(one_thread):
    """ViTIL's finetuning takes the run's compile from the engine: a hook inside the backbone runs
    only while dynamo traces it (the compiled code does not call Python hooks), never eagerly."""
    import torch._dynamo

    from test_device_data import digits

    from incremental.config import OptimizerConfig, RunConfig, parse_dataclass
    from incremental.models.net import build_model
    from incremental.training.finetune import balanced_finetune

    splits, benchmark = digits()
    cfg = parse_dataclass(RunConfig, {"backbone": {"name": "vit", "patch_size": 4, "embed_dim": 16, "depth": 1,
                                                   "num_heads": 2, "drop_path_rate": 0.0}})
    torch.manual_seed(0)
    model = build_model(cfg.backbone, in_chans=1, img_size=16, initial_classes=4)
    model.head.active_units.fill_(1)
    tracing = []
    model.backbone.blocks[0].register_forward_pre_hook(lambda m, i: tracing.append(torch.compiler.is_compiling()))
    torch._dynamo.reset()
    try:
        losses = balanced_finetune(model, benchmark.train_stream[0].dataset.subset(range(40)), epochs=2, lr=1e-2,
                                   batch_size=16, params="all", optimizer=OptimizerConfig(), device="cpu", seed=0,
                                   engine=TrainingEngine("cpu", compile=True, batch_augmentation=splits.batch_augmentation))
    finally:
        torch._dynamo.reset()
    assert len(losses) == 2 and tracing and all(tracing), tracing


def test_feature_extraction_takes_the_device_data_path_and_stays_fp32():
    """Herding's and the prototypes' feature pass through the engine's device data path gives
    the DataLoader path's features (eval transforms on the device), and fp32 under a bf16 run."""
    from test_device_data import digits

    from incremental.config import RunConfig, parse_dataclass
    from incremental.memory import extract_features
    from incremental.models.net import build_model

    splits, benchmark = digits()
    data = benchmark.train_stream[1].dataset
    cfg = parse_dataclass(RunConfig, {"backbone": {"name": "vit", "patch_size": 4, "embed_dim": 16, "depth": 1,
                                                   "num_heads": 2}})
    torch.manual_seed(0)
    model = build_model(cfg.backbone, in_chans=1, img_size=16, initial_classes=4)
    loader = extract_features(model, data, batch_size=64, device="cpu")
    inputs = []
    hook = model.backbone.register_forward_pre_hook(lambda m, i: inputs.append(type(i[0])))
    engine = TrainingEngine("cpu", precision="bf16", batch_augmentation=splits.batch_augmentation)
    device = extract_features(model, data, batch_size=64, device="cpu", engine=engine)
    hook.remove()
    assert device.dtype == torch.float32 and device.shape == loader.shape == (len(data), 16)
    assert torch.allclose(device, loader, atol=1e-5)
    # the device path really served the batches: its loader is planned once, not a DataLoader
    assert engine._device_images is not None and engine._device_images.images is not None
