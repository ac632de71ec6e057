"""LAE's mathematics: the compensatory prefix attention against its formula in numpy, the
max-softmax ensemble against numpy, the offline module's EMA and features; and through whole
runs: the pre-trained ViT stays bit-identical, a PET frozen for every epoch never moves, decay 0
makes the offline PET the online one, decay 1 keeps its first draw."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch

from test_pretrained_methods import VIT, pretrained, run_method  # noqa: F401 (a fixture)

from incremental.models.peft import add_prefix_tuning, compensated_attention, freeze
from incremental.models.net import MaxSoftmaxOutput
from incremental.strategies.lae import OnlineOfflineBackbone
from incremental.strategies.pretrained import SharedHeadClassifier, init_rows_kaiming


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_compensated_attention_renormalises_the_prefix_columns():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(shape) for shape in ((2, 3, 5, 4), (2, 3, 8, 4), (2, 3, 8, 4)))
    attention = _softmax(q @ k.transpose(0, 1, 3, 2) / 2.0)  # head_dim 4: scale 1/2
    attention[..., :3] /= attention[..., :3].sum(axis=-1, keepdims=True)
    out = compensated_attention(*(torch.from_numpy(a) for a in (q, k, v)), prefix_length=3)
    np.testing.assert_allclose(out.numpy(), attention @ v, rtol=1e-10)


def _vit(depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=0,
                             embed_dim=32, depth=depth, num_heads=2).eval()


@pytest.mark.parametrize("compensatory", [True, False])
def test_a_learned_prefix_block_is_pilots_prefix_attention_in_numpy(compensatory):
    """PILOT's vit_lae Attention: keys and values of the prefix (times their scalars) put before
    the tokens' in the projected space, split into heads by channel, softmax, then (compensatory)
    the prefix columns over their own sum."""
    vit = _vit()
    prefix = add_prefix_tuning(vit, length=3, blocks=1, compensatory=compensatory)[0]
    with torch.no_grad():
        prefix.key_scale.fill_(1.7)
        prefix.value_scale.fill_(0.6)
        prefix.keys.normal_()
    attention = vit.blocks[0].attn
    x = torch.randn(2, 5, 32)
    out = attention(x).detach().numpy().astype(np.float64)

    def w(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().astype(np.float64)
    inner = attention.inner
    qkv = w(x) @ w(inner.qkv.weight).T + w(inner.qkv.bias)
    q, k, v = np.split(qkv, 3, axis=-1)
    k = np.concatenate([np.broadcast_to(w(prefix.keys) * 1.7, (2, 3, 32)), k], axis=1)
    v = np.concatenate([np.broadcast_to(w(prefix.values) * 0.6, (2, 3, 32)), v], axis=1)
    heads = [slice(0, 16), slice(16, 32)]
    merged = []
    for h in heads:
        a = _softmax(q[..., h] @ k[..., h].transpose(0, 2, 1) * 16 ** -0.5)
        if compensatory:
            a[..., :3] /= a[..., :3].sum(axis=-1, keepdims=True)
        merged.append(a @ v[..., h])
    expected = np.concatenate(merged, axis=-1) @ w(inner.proj.weight).T + w(inner.proj.bias)
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5)


def test_prefix_tuning_covers_the_first_blocks_and_trains_only_the_prefixes():
    vit = _vit(depth=3)
    freeze(vit)
    prefixes = add_prefix_tuning(vit, length=4, blocks=5, compensatory=True)  # more than the ViT has: all 3
    assert len(prefixes) == 3 and all(p.keys.shape == (4, 32) for p in prefixes)
    assert min(float(p.keys.detach().min()) for p in prefixes) >= 0
    assert max(float(p.values.detach().max()) for p in prefixes) <= 0.01
    trainable = {name for name, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{b}.attn.learned.{n}" for b in range(3)
                         for n in ("keys", "values", "key_scale", "value_scale")}
    assert len(add_prefix_tuning(_vit(depth=3), length=4, blocks=2, compensatory=True)) == 2


def test_the_ensemble_scores_the_larger_softmax_of_the_shared_heads_members():
    torch.manual_seed(0)
    head = SharedHeadClassifier(6, initial_out_features=4)
    head.active_units[:3] = 1  # the fourth class is unseen: masked
    online, offline = torch.randn(5, 6), torch.randn(5, 6)
    single = head(online).detach()
    torch.testing.assert_close(single[:, :3], head.classifier(online).detach()[:, :3])
    logits = head(torch.cat([online, offline], dim=1)).detach()
    assert logits.shape == (5, 8)
    torch.testing.assert_close(logits[:, 4:], head(offline).detach())
    w, b = head.classifier.weight.detach().numpy(), head.classifier.bias.detach().numpy()
    probabilities = [_softmax(x.numpy() @ w.T[:, :3] + b[:3]) for x in (online, offline)]
    both = MaxSoftmaxOutput(2)(torch.cat([online, offline], dim=1), logits)
    np.testing.assert_allclose(both[:, :3].exp().numpy(), np.maximum(*probabilities), rtol=1e-5)
    assert torch.isfinite(both).all() and (both[:, 3] < both[:, :3].min()).all()


def test_kaiming_rows_are_pilots_simple_linear_draw():
    torch.manual_seed(3)
    layer = torch.nn.Linear(300, 10)
    before = layer.weight.detach().clone()
    init_rows_kaiming(layer, range(4, 10))
    assert torch.equal(layer.weight[:4], before[:4])
    rows = layer.weight[4:].detach()
    bound = (3 / 300) ** 0.5
    assert float(rows.abs().max()) <= bound and float(rows.abs().max()) > 0.9 * bound
    assert (layer.bias[4:] == 0).all()


def test_the_offline_module_is_an_ema_and_its_features_are_the_network_with_its_values():
    vit = _vit()
    freeze(vit)
    add_prefix_tuning(vit, length=3, blocks=2, compensatory=True)
    backbone = OnlineOfflineBackbone(vit)
    online = backbone.pet_parameters()
    assert [tuple(p.shape) for p in backbone.offline] == [tuple(p.shape) for p in online]
    start = [p.detach().clone() for p in online]
    with torch.no_grad():
        for p in online:
            p.add_(torch.randn_like(p))
    backbone.update_offline(0.75)
    for offline, first, now in zip(backbone.offline, start, online):
        torch.testing.assert_close(offline.detach(), 0.75 * first + 0.25 * now.detach())
    x = torch.randn(3, 1, 16, 16)
    backbone.eval()
    features = backbone.forward_features(x)
    assert features.shape == (3, 64)
    twin = copy.deepcopy(vit)
    with torch.no_grad():
        for p, value in zip(OnlineOfflineBackbone(twin).pet_parameters(), backbone.offline):
            p.copy_(value)
    torch.testing.assert_close(features[:, 32:], twin(x))
    torch.testing.assert_close(features[:, :32], vit(x))  # the online values are back in place
    backbone.train()
    assert backbone.forward_features(x).shape == (3, 32) and not vit.training


def _state(run_dir, experience: int | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if experience is None:
        return load_file(str(run_dir / "model.safetensors"))
    return torch.load(run_dir / "checkpoints" / f"experience_00{experience}.pt", weights_only=False)["model"]


PREFIX_ORDER = ("keys", "values", "key_scale", "value_scale")  # LearnedPrefix's parameters, in order


def _pets(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The online PET (in the module's parameter order, which the offline list follows; a
    safetensors file sorts its keys) and the offline one."""
    names = sorted((k for k in state if ".attn.learned." in k),
                   key=lambda k: (int(k.split(".blocks.")[1].split(".")[0]), PREFIX_ORDER.index(k.rsplit(".", 1)[1])))
    online = {k: state[k] for k in names}
    offline = [state[f"backbone.offline.{i}"] for i in range(len(online))]
    return online, offline


def test_the_pretrained_vit_stays_and_a_pet_frozen_every_epoch_never_moves(pretrained, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", "{name: lae, tuning: {name: prefix, length: 2}}",
               "output.checkpoint=all")  # 1 epoch an experience, the PET frozen for 3
    first, last = _state(tmp_path / "run", 0), _state(tmp_path / "run")
    encoder = load_file(str(weights))
    for name, value in encoder.items():
        key = f"backbone.backbone.{name}".replace(".attn.qkv.", ".attn.inner.qkv.").replace(
            ".attn.proj.", ".attn.inner.proj.")
        assert torch.equal(last[key], value), name
    online_first, _ = _pets(first)
    online_last, offline_last = _pets(last)
    assert online_first and all(torch.equal(online_first[k], online_last[k]) for k in online_first)
    for offline, online in zip(offline_last, online_last.values()):  # an EMA of an unchanged value
        torch.testing.assert_close(offline, online, rtol=1e-6, atol=1e-7)
    assert not torch.equal(first["head.classifier.weight"], last["head.classifier.weight"][:4])


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_decay_zero_follows_the_online_pet_and_decay_one_keeps_its_first_draw(pretrained, tmp_path, decay):  # noqa: F811
    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", f"{{name: lae, tuning: {{name: prefix, length: 2}}, "
               f"freeze_epochs: 0, ema_decay: {decay}}}", "output.checkpoint=all")
    first, last = _state(tmp_path / "run", 0), _state(tmp_path / "run")
    online, offline = _pets(last)
    _, offline_first = _pets(first)
    assert any(not torch.equal(a, b) for a, b in zip(_pets(first)[0].values(), online.values()))  # the PET trained
    if decay == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(offline, online.values()))
    else:
        assert all(torch.equal(a, b) for a, b in zip(offline, offline_first))
        assert any(not torch.equal(a, b) for a, b in zip(offline, online.values()))
