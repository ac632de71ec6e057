"""MOS's mathematics: the self-refined retrieval and the ensemble against PILOT's per-image loop
written out, the adapter merge against its formula (once, and before every block of a forward),
the orthogonality loss against numpy; and through whole runs: the pre-trained ViT and the
stored sets stay bit-identical, a momentum of 1 makes every set the first one, the prototypes
are the class means under set 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_pretrained_methods import pretrained, run_method  # noqa: F401 (a fixture)

from incremental.models.net import AdapterRetrievalOutput
from incremental.strategies.mos import AdapterSetsViT


def _pilot_retrieval(set_logits: np.ndarray, first: np.ndarray, class_tasks: np.ndarray, rounds: int) -> np.ndarray:
    """PILOT's models/mos.py ``_eval_cnn`` loop, image by image."""
    finals = []
    for image in range(len(first)):
        reads, previous = 0, first[image]
        while True:
            reads += 1
            logits = set_logits[image, previous]
            proposed = class_tasks[logits.argmax()]
            if reads >= rounds or proposed == previous:
                break
            previous = proposed
        finals.append(logits)
    return np.stack(finals)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("rounds", [1, 2, 4])
def test_the_retrieval_and_the_ensemble_are_pilots_loop(rounds):
    rng = np.random.default_rng(rounds)
    images, sets, classes, width = 64, 3, 6, 5  # 3 experiences of 2 classes; the head grown to 8
    class_tasks = np.repeat(np.arange(sets), 2)
    pooled = rng.standard_normal((images, sets * width)).astype(np.float32)
    set_logits = rng.standard_normal((images, sets, 8)).astype(np.float32) * 3
    prototypes = rng.standard_normal((classes, width)).astype(np.float32)
    output = AdapterRetrievalOutput(torch.from_numpy(prototypes), torch.from_numpy(class_tasks), rounds, ensemble=False)
    scores = output(torch.from_numpy(pooled), torch.from_numpy(set_logits.reshape(images, -1))).numpy()
    base = pooled[:, :width] / np.linalg.norm(pooled[:, :width], axis=1, keepdims=True)
    cosine = base @ (prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)).T
    expected = _pilot_retrieval(set_logits[:, :, :classes], class_tasks[cosine.argmax(1)], class_tasks, rounds)
    np.testing.assert_allclose(scores[:, :classes], expected, rtol=1e-6)
    assert (scores[:, classes:] < scores[:, :classes].min()).all()  # unseen classes score the floor
    if rounds == 4:
        assert len({tuple(row) for row in expected.round(4)}) > 1
    ensemble = AdapterRetrievalOutput(torch.from_numpy(prototypes), torch.from_numpy(class_tasks), rounds)
    mixed = ensemble(torch.from_numpy(pooled), torch.from_numpy(set_logits.reshape(images, -1))).numpy()
    np.testing.assert_allclose(np.exp(mixed[:, :classes]) * 2, _softmax(expected) + _softmax(cosine * sets),
                               rtol=1e-5)


def _sets_vit(momentum: float) -> AdapterSetsViT:
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=0,
                            embed_dim=32, depth=3, num_heads=2)
    backbone = AdapterSetsViT(vit, sets=3, bottleneck=4, scale=0.1, dropout=0.0)
    with torch.no_grad():
        for p in vit.adapters.parameters():
            p.normal_()
    backbone.current.fill_(2)
    sets = vit.adapters.sets
    backbone.merge_means = [[(dict(sets[0][b].named_parameters())[n] + dict(sets[1][b].named_parameters())[n]) / 2
                             for n, _ in sets[2][b].named_parameters()] for b in range(3)]
    backbone.momentum = momentum
    return backbone


def test_the_merge_pulls_the_current_set_towards_the_mean_of_the_earlier_ones():
    backbone = _sets_vit(0.25)
    sets = backbone.vit.adapters.sets
    before = [p.detach().clone() for p in sets[2].parameters()]
    earlier = [[p.detach().clone() for p in sets[i].parameters()] for i in (0, 1)]
    backbone.pull()
    for now, start, a, b in zip(sets[2].parameters(), before, *earlier):
        torch.testing.assert_close(now.detach(), 0.75 * start + 0.25 * (a + b) / 2)
    for i in (0, 1):  # the earlier sets are read, never written
        assert all(torch.equal(p, q) for p, q in zip(sets[i].parameters(), earlier[i]))


def test_per_block_merging_pulls_once_before_every_block_of_a_training_forward():
    backbone = _sets_vit(0.1)
    sets = backbone.vit.adapters.sets
    before = [p.detach().clone() for p in sets[2].parameters()]
    means = [m for block in backbone.merge_means for m in block]
    backbone.pulling = True
    backbone.train()
    features = backbone.forward_features(torch.randn(2, 1, 16, 16))
    assert features.shape == (2, 32)  # training: the current set only
    for now, start, mean in zip(sets[2].parameters(), before, means):  # 3 blocks: 3 pulls
        torch.testing.assert_close(now.detach(), mean + 0.9 ** 3 * (start - mean), rtol=1e-5, atol=1e-6)
    backbone.eval()
    assert backbone.forward_features(torch.randn(2, 1, 16, 16)).shape == (2, 96)


def test_the_orthogonality_loss_is_pilots():
    from incremental.strategies.mos import MOS

    rng = np.random.default_rng(3)
    means, features = rng.standard_normal((4, 6)), rng.standard_normal((5, 6))
    strategy = MOS.__new__(MOS)
    strategy.config = type("Config", (), {"orth_temperature": 0.8})()
    strategy.means = torch.from_numpy(means)
    loss = float(strategy.orthogonality_loss(torch.from_numpy(features).float()))
    stacked = np.concatenate([means, features])
    logits = stacked @ stacked.T / 0.8
    expected = np.mean([np.log(np.exp(row - row.max()).sum()) + row.max() - row[i] for i, row in enumerate(logits)])
    assert loss == pytest.approx(expected, rel=1e-5)


MOS = "{name: mos, bottleneck: 8, ca_epochs: 2, ca_samples_per_class: 16}"


def _state(run_dir, experience: int | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if experience is None:
        return load_file(str(run_dir / "model.safetensors"))
    return torch.load(run_dir / "checkpoints" / f"experience_00{experience}.pt", weights_only=False)["model"]


def _set(state: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    marker = f".adapters.sets.{index}."
    return {k.split(marker)[1]: v for k, v in state.items() if marker in k}


def test_the_vit_and_the_stored_sets_stay_and_the_prototypes_are_set_zeros_class_means(pretrained, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from test_pretrained_methods import _saved_features

    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", MOS, "output.checkpoint=all")
    states = [_state(tmp_path / "run", e) for e in (0, 1)] + [_state(tmp_path / "run")]
    for name, value in load_file(str(weights)).items():
        assert torch.equal(states[-1][f"backbone.vit.{name}"], value), name
    for e in (0, 1):  # a set, once its experience is over, is never written again
        kept = _set(states[e], e)
        assert kept and all(torch.equal(kept[k], v) for k, v in _set(states[-1], e).items())
    assert not torch.equal(_set(states[-1], 0)["0.up.weight"], _set(states[-1], 2)["0.up.weight"])
    model, features, labels, ranges = _saved_features(tmp_path / "run")
    adapter = model.output_adapter
    assert adapter.class_tasks.tolist() == [e for e, r in enumerate(ranges) for _ in r]
    width = model.backbone.dim
    for label in range(len(adapter.prototypes)):  # eval: set 0's features first
        torch.testing.assert_close(adapter.prototypes[label], features[labels == label, :width].mean(0),
                                   rtol=1e-4, atol=1e-5)


def test_a_momentum_of_one_makes_every_set_the_first(pretrained, tmp_path):  # noqa: F811
    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", "{name: mos, bottleneck: 8, ca_epochs: 0, adapter_momentum: 1.0, "
               "merge: per_step}")
    state = _state(tmp_path / "run")
    first = _set(state, 0)
    assert float(first["0.up.weight"].abs().sum()) > 0  # set 0 trained
    for index in (1, 2):
        assert all(torch.equal(first[k], v) for k, v in _set(state, index).items())
