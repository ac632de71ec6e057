"""The feature cache: keyed by the state of everything under the head, so any change to that
state invalidates it, and runs with it give the accuracy matrices of runs without it."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import run_tiny
from incremental.config.fields import Component
from incremental.models.net import IncrementalNet, PrototypeOutput, build_backbone
from incremental.models.options import ViTConfig
from incremental.training.features import FeatureCache, state_fingerprint


def small_net() -> IncrementalNet:
    torch.manual_seed(0)
    backbone = build_backbone(Component("vit", ViTConfig(patch_size=4, embed_dim=16, depth=1, num_heads=2)),
                              in_chans=1, img_size=8)
    return IncrementalNet(backbone, 3)


def test_every_change_under_the_head_changes_the_fingerprint() -> None:
    net = small_net()
    before = state_fingerprint(net)
    assert before is not None and before == state_fingerprint(net)

    edited = copy.deepcopy(net)
    edited.backbone.blocks[0].mlp.fc1.weight.data[3, 5] += 1e-3  # through .data: no version bump
    assert state_fingerprint(edited) != before

    swapped = copy.deepcopy(net)  # a permutation keeps the plain sum, not the weighted one
    weight = swapped.backbone.blocks[0].attn.qkv.weight
    weight.data[[0, 1]] = weight.data[[1, 0]].clone()
    assert state_fingerprint(swapped) != before

    stepped = copy.deepcopy(net)
    optimizer = torch.optim.SGD(stepped.backbone.parameters(), lr=0.1)
    stepped.pooled(torch.randn(2, 1, 8, 8)).square().sum().backward()
    optimizer.step()
    assert state_fingerprint(stepped) != before

    loaded = small_net()
    loaded.load_state_dict(stepped.state_dict())
    assert state_fingerprint(loaded) == state_fingerprint(stepped)

    buffered = copy.deepcopy(net)
    buffered.backbone.register_buffer("current", torch.tensor(1))  # EASE's subspace counter
    changed = copy.deepcopy(buffered)
    changed.backbone.current.fill_(2)
    assert state_fingerprint(buffered) != state_fingerprint(changed)


def test_the_head_and_output_adapter_do_not_change_it() -> None:
    net = small_net()
    before = state_fingerprint(net)
    net.head.classifier.weight.data += 1
    net.output_adapter = PrototypeOutput(torch.randn(3, net.num_features))
    assert state_fingerprint(net) == before


def test_a_quantised_model_is_not_fingerprinted() -> None:
    from incremental.models.compress import int8_copy

    net = small_net()
    assert state_fingerprint(int8_copy(net)) is None


def test_the_cache_returns_features_only_for_the_state_that_made_them() -> None:
    net = small_net().eval()
    cache = FeatureCache(1 << 20)
    images = torch.randn(5, 1, 8, 8)
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        with torch.no_grad():
            return net.pooled(images)

    first = cache.features(("test", 0, 5), net, compute)
    again = cache.features(("test", 0, 5), net, compute)
    assert len(calls) == 1 and torch.equal(first, again) and cache.hits == 1
    net.backbone.norm.weight.data.mul_(2)
    changed = cache.features(("test", 0, 5), net, compute)
    assert len(calls) == 2 and not torch.equal(first, changed)
    assert torch.equal(changed, net.pooled(images).detach())


def test_the_least_recently_used_set_goes_first_and_zero_turns_it_off() -> None:
    net = small_net()
    rows = torch.zeros(4, 256)  # 4 KiB each
    cache = FeatureCache(10 << 10)
    for key in "abc":
        cache.features(key, net, lambda: rows.clone())
    assert cache.lookup("a", state_fingerprint(net)) is None  # dropped for "c"
    assert cache.lookup("c", state_fingerprint(net)) is not None
    assert cache.held_bytes() <= 10 << 10

    off = FeatureCache(0)
    calls = []
    for _ in range(2):
        off.features("a", net, lambda: calls.append(1) or rows)
    assert len(calls) == 2 and off.held_bytes() == 0


@pytest.mark.parametrize("strategy", ["simplecil", "finetune"])
def test_runs_with_and_without_the_cache_agree(tmp_path, strategy: str) -> None:
    """A frozen backbone (SimpleCIL) reuses the old test sets' features; a trained one
    (finetune) invalidates them every experience. Both give the uncached run's matrix."""
    sets = [f"strategy={strategy}", "training.epochs=1"]
    cached = run_tiny(tmp_path, "cached", *sets)
    uncached = run_tiny(tmp_path, "uncached", *sets, "training.feature_cache_mb=0")
    assert cached["accuracy_matrix"] == uncached["accuracy_matrix"]
    assert cached["prediction_matrix"] == uncached["prediction_matrix"]


def test_a_frozen_backbone_encodes_and_reads_each_test_image_once(tmp_path, monkeypatch) -> None:
    """Count the backbone's forward passes and the image reads (Avalanche's dataset item access,
    spied on, not replaced) during evaluation: with the cache, each experience's test set is
    read and encoded once over the run, without it once per later step as well; and the run's
    random stream is the same either way."""
    from avalanche.benchmarks.utils.data import AvalancheDataset

    from conftest import TINY_RUN
    from incremental.config.files import load_config
    from incremental.distributed import SINGLE
    from incremental.run import loop

    reads = []
    read_item = AvalancheDataset.__getitem__
    monkeypatch.setattr(AvalancheDataset, "__getitem__", lambda self, i: reads.append(1) or read_item(self, i))
    counts, read_counts, random_state = {}, {}, {}
    for budget in (0, 64):
        config = tmp_path / "tiny.yaml"
        config.write_text(TINY_RUN)
        cfg, _ = load_config(str(config), [f"training.feature_cache_mb={budget}", "strategy=simplecil",
                                           "output.tensorboard=false"])
        built = loop.build(cfg, SINGLE, quiet=True, echo=print)
        seen = []
        built.template.model.backbone.patch_embed.register_forward_hook(lambda m, a, out: seen.append(len(a[0])))
        evaluated, read = [], []
        for i in range(len(built.benchmark.train_stream)):
            loop.train_experience(built, i)
            before, reads_before = sum(seen), len(reads)
            built.template.phase_times.collect()
            eval_s = loop.evaluate_experience(built, i)
            evaluated.append(sum(seen) - before)
            read.append(len(reads) - reads_before)
            # the earlier experiences' share of evaluation is timed apart, from the second step
            earlier_s = built.template.phase_times.collect().get("eval_earlier")
            assert (earlier_s is None) == (i == 0) and (earlier_s or 0.0) < eval_s
        counts[budget], read_counts[budget] = evaluated, read
        random_state[budget] = torch.get_rng_state()
        assert built.template.feature_cache.hits == (0 if budget == 0 else sum(range(len(evaluated))))
    sizes = [len(e.dataset) for e in built.benchmark.test_stream]
    assert counts[0] == [sum(sizes[: i + 1]) for i in range(len(sizes))]
    assert counts[64] == sizes
    assert read_counts[0] == counts[0] and read_counts[64] == sizes
    # a pass over cached features draws what the image pass draws: the random stream is the same
    assert torch.equal(random_state[0], random_state[64])
