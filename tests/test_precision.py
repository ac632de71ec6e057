"""Mixed precision, channels_last, torch.compile and DataLoader settings of the run's template,
on the CPU (torch's CPU autocast supports bf16 and fp16); tests/test_gpu.py repeats the runs
on CUDA when there is one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_tiny

from incremental.training.template import IncrementalTemplate


def run_small(tmp_path, name, *sets: str) -> dict:
    return run_tiny(tmp_path, name, "training.epochs=2", *sets)


def test_bf16_and_fp16_autocast_train_close_to_fp32(tmp_path):
    fp32 = run_small(tmp_path, "fp32", "strategy=vitil", "strategy.balanced_finetuning.epochs=1")
    for precision in ("bf16", "fp16"):
        low = run_small(tmp_path, precision, "strategy=vitil", "strategy.balanced_finetuning.epochs=1",
                       f"training.precision={precision}")
        assert low["status"] == "complete"
        # autocast really ran (the losses are not fp32's) and stayed close to fp32
        assert low["train_loss"] != fp32["train_loss"]
        assert low["train_loss"][0] == pytest.approx(fp32["train_loss"][0], abs=0.05)
    checkpoint = torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=True)
    assert checkpoint["grad_scaler"]["scale"] > 0  # fp16's loss scale is checkpointed
    assert not torch.load(tmp_path / "bf16" / "checkpoint.pt", weights_only=True)["grad_scaler"]


def test_compile_builds_one_graph_for_the_whole_run(tmp_path):
    """The backbone is compiled once: the head growing over 3 experiences (4, 7, 10 classes),
    the replayed memory changing the data size, the last partial batch (dropped), the
    evaluation batches (eager) and ViTIL's balanced finetuning of every parameter (the same
    compiled forward, on the engine) recompile nothing. Compile time is reported apart, and
    the saved parameter names are the model's own."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    metrics = run_small(tmp_path, "compiled", "training.compile=true", "training.epochs=1", "strategy=vitil",
                        "strategy.balanced_finetuning.epochs=1", "strategy.balanced_finetuning.params=all")
    assert all(metrics["wall_time_s"][i]["balanced_finetuning"] > 0 for i in (1, 2))
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] == 1, dict(stats)
    assert not torch._dynamo.utils.counters["recompiles"]
    assert metrics["wall_time_s"][0]["compile"] > 0 and "compile" not in metrics["wall_time_s"][1]
    names = set(load_file(str(tmp_path / "compiled" / "model.safetensors")))
    assert names and not any("_orig_mod" in n for n in names)
    torch._dynamo.reset()


def _template(**kwargs) -> IncrementalTemplate:
    from incremental.training.plugins import silent_evaluator

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    return IncrementalTemplate(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                               criterion=torch.nn.CrossEntropyLoss(), train_mb_size=4, device="cpu",
                               evaluator=silent_evaluator(), **kwargs)


def test_channels_last_inputs():
    template = _template(channels_last=True)
    template.mbatch = [torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)]
    template._unpack_minibatch()
    assert template.mb_x.is_contiguous(memory_format=torch.channels_last)


def test_loader_keeps_workers_and_prefetches():
    from avalanche.benchmarks.utils import AvalancheDataset
    from torch.utils.data import TensorDataset

    template = _template(prefetch_factor=6)
    data = TensorDataset(torch.zeros(8, 3, 8, 8), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    template.adapted_dataset = AvalancheDataset([data])
    template.make_train_dataloader(num_workers=2)
    assert template.dataloader.persistent_workers and template.dataloader.prefetch_factor == 6
    template.make_train_dataloader(num_workers=0)
    assert not template.dataloader.persistent_workers
