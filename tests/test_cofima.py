"""CoFiMA's mathematics: the Fisher-weighted merge against a hand computation in numpy, the
capped Fisher diagonal against per-batch gradients taken one by one, and through whole runs:
a merge weight of 1 is SLCA to the bit, a weight of 0 keeps the first experience's network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_pretrained_methods import pretrained, run_method  # noqa: F401 (a fixture)

from incremental.strategies.cofima import capped_fisher_diagonal, fisher_merge


def _tensors(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for name, shape in shapes.items()}


@pytest.mark.parametrize("new_rows", ["times_fisher", "trained"])
def test_the_fisher_merge_is_the_weighted_average_written_out(new_rows):
    rng = np.random.default_rng(0)
    before = _tensors(rng, {"w": (3, 4), "b": (3,), "scale": ()})
    after = _tensors(rng, {"w": (5, 4), "b": (5,), "scale": ()})  # the head grew by two rows
    f0 = {k: v.abs() * 1e-4 for k, v in _tensors(rng, {"w": (3, 4), "b": (3,), "scale": ()}).items()}
    f1 = {k: v.abs() * 1e-4 for k, v in _tensors(rng, {"w": (5, 4), "b": (5,), "scale": ()}).items()}
    f0["w"][0, 0] = f1["w"][0, 0] = 0.0  # no gradient reached this entry in either network
    merged = fisher_merge(before, after, f0, f1, 0.4, new_rows)
    for name in before:
        t0, t1 = before[name].numpy().astype(np.float64), after[name].numpy().astype(np.float64)
        g0, g1 = f0[name].numpy().astype(np.float64), f1[name].numpy().astype(np.float64)
        rows = t0.shape[0] if t0.ndim else None
        old1, oldg1 = (t1[:rows], g1[:rows]) if rows is not None else (t1, g1)
        with np.errstate(invalid="ignore"):
            expected = (0.6 * g0 * t0 + 0.4 * oldg1 * old1) / (0.6 * g0 + 0.4 * oldg1)
        expected = np.where(0.6 * g0 + 0.4 * oldg1 > 0, expected, old1)  # PILOT: 0/0; here: the new value
        if rows is not None and t1.shape[0] > rows:
            added = g1[rows:] * t1[rows:] if new_rows == "times_fisher" else t1[rows:]
            expected = np.concatenate([expected, added])
        assert merged[name].shape == after[name].shape
        np.testing.assert_allclose(merged[name].numpy(), expected, rtol=1e-5, atol=1e-12)
    assert merged["w"][0, 0] == after["w"][0, 0]


def test_without_fishers_the_merge_is_the_plain_average():
    rng = np.random.default_rng(1)
    before, after = _tensors(rng, {"w": (2, 3)}), _tensors(rng, {"w": (4, 3)})
    merged = fisher_merge(before, after, None, None, 0.25)
    expected = np.concatenate([0.75 * before["w"].numpy() + 0.25 * after["w"][:2].numpy(), after["w"][2:].numpy()])
    np.testing.assert_allclose(merged["w"].numpy(), expected, rtol=1e-6)


def test_the_fisher_diagonal_is_the_mean_squared_batch_gradient_capped():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    unused = torch.nn.Parameter(torch.ones(2))  # no gradient reaches it: its Fisher is zero
    model.register_parameter("unused", unused)
    batches = [(torch.randn(n, 6), torch.randint(0, 3, (n,))) for n in (4, 4, 3)]
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for x, y in batches:
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y),
                                    [p for n, p in model.named_parameters() if n != "unused"])
        for (name, _), g in zip([(n, p) for n, p in model.named_parameters() if n != "unused"], grads):
            expected[name] += g.pow(2)
    cap = float(torch.stack([(v / 3).max() for v in expected.values()]).median())  # caps some entries
    fisher, last = capped_fisher_diagonal(model, batches, torch.device("cpu"), cap)
    for name, value in expected.items():
        torch.testing.assert_close(fisher[name], (value / 3).clamp(max=cap), rtol=1e-5, atol=1e-9)
    assert (fisher["unused"] == 0).all() and max(float(f.max()) for f in fisher.values()) == pytest.approx(cap)
    assert all(p.grad is None for p in model.parameters())  # leaves no gradient behind
    for name, gradient in zip([n for n, _ in model.named_parameters() if n != "unused"], grads):
        torch.testing.assert_close(last[name], gradient)  # the last batch's, returned
    assert "unused" not in last


def _weights(run_dir, archived: str | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if archived is None:
        return load_file(str(run_dir / "model.safetensors"))
    return torch.load(run_dir / "checkpoints" / archived, weights_only=False)["model"]


def test_a_merge_weight_of_one_is_slca_to_the_bit(pretrained, tmp_path):  # noqa: F811
    config, weights = pretrained
    slca = run_method(config, weights, tmp_path / "slca", "{name: slca, ca_samples_per_class: 16}")
    cofima = run_method(config, weights, tmp_path / "cofima", "{name: cofima, ca_samples_per_class: 16, "
                        "merge_weight: 1.0, fisher_weighting: false}")
    assert cofima["accuracy_matrix"] == slca["accuracy_matrix"]
    ours, theirs = _weights(tmp_path / "cofima"), _weights(tmp_path / "slca")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_merge_weight_of_zero_keeps_the_first_experiences_backbone(pretrained, tmp_path):  # noqa: F811
    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", "{name: cofima, ca_samples_per_class: 16, merge_weight: 0.0, "
               "fisher_weighting: false}", "output.checkpoint=all")
    first, last = _weights(tmp_path / "run", "experience_000.pt"), _weights(tmp_path / "run")
    backbone = [k for k in last if k.startswith("backbone.")]
    assert backbone and all(torch.equal(first[k], last[k]) for k in backbone)
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())["trained_params"]
    assert all(t > 0 for t in trained)  # the slow learner did train; the merge took it back


def test_the_fisher_merge_moves_the_backbone_between_the_two_networks(pretrained, tmp_path):  # noqa: F811
    """With Fishers, each merged entry lies between the previous and the trained value: after
    experience 1 the backbone differs from experience 0's and from a run without merging. (No
    augmentation: the Fisher pass's random crops would move the random stream SLCA trains on.)"""
    config, weights = pretrained
    sets = ("output.checkpoint=all", "dataset.augment=false")
    run_method(config, weights, tmp_path / "merged", "{name: cofima, ca_samples_per_class: 16}", *sets)
    run_method(config, weights, tmp_path / "slca", "{name: slca, ca_samples_per_class: 16}", *sets)
    first = _weights(tmp_path / "merged", "experience_000.pt")
    merged, unmerged = _weights(tmp_path / "merged", "experience_001.pt"), _weights(tmp_path / "slca", "experience_001.pt")
    backbone = [k for k in merged if k.startswith("backbone.") and merged[k].is_floating_point()]
    assert torch.equal(first["backbone.pos_embed"], _weights(tmp_path / "slca", "experience_000.pt")["backbone.pos_embed"])
    moved = [k for k in backbone if not torch.equal(merged[k], unmerged[k])]
    assert len(moved) > len(backbone) // 2
    for k in moved:  # between theta_0 and a trained theta_1 that is SLCA's (the same first step)
        low, high = torch.minimum(first[k], unmerged[k]), torch.maximum(first[k], unmerged[k])
        assert bool(((merged[k] >= low - 1e-6) & (merged[k] <= high + 1e-6)).all()), k


def test_the_older_rows_fisher_is_the_square_of_the_gradient_left_from_the_last_experience(pretrained, tmp_path):  # noqa: F811
    """PILOT's frozen old heads: the next Fisher pass reads the .grad they still hold. After the
    first experience that is the Fisher pass's last batch; the second experience's Fisher gives
    the first experience's rows its square (capped); ``computed`` gives them their own Fisher."""
    config, weights = pretrained
    fishers = {}
    for mode in ("stale_gradient", "computed"):
        run_method(config, weights, tmp_path / mode, f"{{name: cofima, ca_samples_per_class: 16, old_head_fisher: {mode}}}",
                   "output.checkpoint=all")
        states = [torch.load(tmp_path / mode / "checkpoints" / f"experience_00{e}.pt", weights_only=False)["plugins"][0]
                  for e in (0, 1)]
        fishers[mode] = states[1]["previous_fisher"]["head.classifier.weight"]
        if mode == "stale_gradient":
            start = len(states[0]["previous"]["head.classifier.weight"])  # the first experience's classes
            left = states[0]["stale_head"]["head.classifier.weight"][:start]
            torch.testing.assert_close(fishers[mode][:start], left.pow(2).clamp(max=1e-4))
            assert float(fishers[mode][:start].abs().sum()) > 0
    assert not torch.equal(fishers["stale_gradient"][:start], fishers["computed"][:start])
    torch.testing.assert_close(fishers["stale_gradient"][start:], fishers["computed"][start:])  # the new rows
