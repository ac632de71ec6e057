"""Data-parallel runs under torchrun with the gloo backend, 2 processes on the CPU: the same
metrics as one process (device data path: the same global batches and crops, so the accuracy
matrix agrees to within one test image per cell and the losses to 1e-4), one global exemplar
memory of the configured size, and files written by rank 0 only."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_RUN, incremental_process

from incremental.data.device import DeviceBatchLoader, DeviceImages, resolve
from incremental.distributed import DistInfo
from incremental.template import ShardedBatchSampler

SETS = ["--set", "training.epochs=3", "--set", "strategy=vitil", "--set", "strategy.balanced_finetuning.epochs=1"]


def incremental(*args: str, processes: int = 1):
    # one thread per process in both cases: the same float summation order
    return incremental_process(*args, env={"OMP_NUM_THREADS": "1"}, processes=processes)


def memory_size(run_dir) -> int:
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return sum(len(indices) for _, indices in state["plugins"][0]["exemplars"].values())


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "tiny.yaml"
    path.write_text(TINY_RUN)
    return path


def test_two_processes_give_the_metrics_of_one(config, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    for run_dir, processes in ((single, 1), (double, 2)):
        done = incremental("run", str(config), "--out", str(run_dir), "--quiet", "--set", "training.data_path=device",
                           *SETS, processes=processes)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, double))
    assert two["status"] == "complete"
    for row_one, row_two in zip(one["accuracy_matrix"], two["accuracy_matrix"]):
        assert row_two == pytest.approx(row_one, abs=1.0)  # stated tolerance: 1 point (about one test image)
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
    assert two["train_samples"] == one["train_samples"]  # each exemplar once per epoch, not once per rank
    assert memory_size(double) == memory_size(single) == 30  # protocol.memory.total, not 30 per rank
    # rank 0 alone wrote: one TensorBoard file, no second metrics
    assert len(list(double.glob("events.out.tfevents.*"))) == 1


def test_two_processes_on_the_dataloader_path_count_each_test_image_once(config, tmp_path):
    run_dir = tmp_path / "loader"
    done = incremental("run", str(config), "--out", str(run_dir), "--quiet", "--set", "training.data_path=loader",
                       "--set", "training.num_workers=1", "--set", "training.epochs=1", processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    sizes = metrics["test_samples_per_experience"]
    for step, predictions in enumerate(metrics["prediction_matrix"]):
        assert [sum(row) for row in predictions] == sizes[: step + 1]  # no padded duplicates
    assert memory_size(run_dir) == 30


def test_an_error_on_rank_zero_stops_every_rank(config, tmp_path):
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "metrics.json").write_text("{}")
    done = incremental("run", str(config), "--out", str(existing), "--quiet", processes=2)
    assert done.returncode != 0
    assert "already holds a run" in done.stderr


@pytest.mark.parametrize("n, batch", [(45, 16), (33, 16), (10, 4)])
def test_sharded_batches_cover_each_global_batch_once(n, batch):
    torch.manual_seed(1)
    single = list(ShardedBatchSampler(n, batch, DistInfo(), train=True, shuffle=True, drop_last=False))
    shards = []
    for rank in (0, 1, 2):
        torch.manual_seed(1)
        shards.append(list(ShardedBatchSampler(n, batch, DistInfo(rank, 3), train=True, shuffle=True,
                                               drop_last=False)))
    assert all(len(s) == len(shards[0]) for s in shards)  # every rank steps together
    for b, whole in enumerate(single[: len(shards[0])]):
        assert sorted(sum((s[b] for s in shards), [])) == sorted(whole)


def test_device_batches_shard_the_single_process_batch_and_its_crops():
    from test_device_data import digits

    splits, benchmark = digits()
    resolved = resolve(benchmark.train_stream[0].dataset)

    def batches(info):
        torch.manual_seed(5)
        return list(DeviceBatchLoader(resolved, DeviceImages("cpu"), splits.batch_augmentation, batch_size=32,
                                      train=True, shuffle=True, dist=info))

    whole = batches(DistInfo())
    parts = [batches(DistInfo(rank, 2)) for rank in (0, 1)]
    for b, (x, y, _) in enumerate(whole[: len(parts[0])]):
        assert torch.equal(torch.cat([parts[0][b][0], parts[1][b][0]]), x)
        assert torch.equal(torch.cat([parts[0][b][1], parts[1][b][1]]), y)
