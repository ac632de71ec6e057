"""MEMO's mathematics: the split ViT equal to the ViT it came from (bit for bit), the specialised
copies' features concatenated, PyTorch's default draws for the random specialised block, the head
grown as PILOT's update_fc grows it, the auxiliary targets as PILOT's; and a run where the frozen
parts stay bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.nn import functional as F

from incremental.strategies.memo import SpecialisedViT, auxiliary_targets
from incremental.strategies.pretrained import grow_head


def _vit(pool: str) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=8, patch_size=4, in_chans=3, num_classes=0, embed_dim=16, depth=3, num_heads=2,
                             global_pool=pool, fc_norm=None)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_with_pretrained_copies_the_first_experiences_feature_is_the_vits(pool):
    vit = _vit(pool).eval()
    original = copy.deepcopy(vit)
    split = SpecialisedViT(vit, sets=3, specialised_blocks=1, init="pretrained", aux_classes=4).eval()
    x = torch.randn(5, 3, 8, 8)
    features = split.forward_features(x)
    assert features.shape == (5, 48) and len(split.vit.blocks) == 2
    assert torch.equal(features[:, :16], original.forward_head(original.forward_features(x), pre_logits=True))
    assert torch.count_nonzero(features[:, 16:]) == 0


def test_later_experiences_concatenate_every_copy_so_far():
    vit = _vit("token").eval()
    split = SpecialisedViT(vit, sets=3, specialised_blocks=2, init="pretrained", aux_classes=4).eval()
    with torch.no_grad():
        for parameter in split.specialised[1].parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    split.current.fill_(1)
    x = torch.randn(4, 3, 8, 8)
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    tokens = vit.blocks(tokens)  # the one generalised block
    expected = []
    for copy_ in split.specialised[:2]:
        out = copy_["norm"](copy_["blocks"](tokens))[:, 0]
        expected.append(copy_["fc_norm"](out))
    features = split.forward_features(x)
    torch.testing.assert_close(features[:, :32], torch.cat(expected, 1), rtol=0, atol=0)
    assert torch.count_nonzero(features[:, 32:]) == 0
    split.train()
    split.forward_features(x)
    assert torch.equal(split.aux_outputs[0], split.aux_head(expected[1]))  # copy 1's, through the auxiliary head


def test_the_random_specialised_block_has_pytorchs_default_draws_and_the_pretrained_norm():
    vit = _vit("token")
    block, norm = copy.deepcopy(vit.blocks[-1]), copy.deepcopy(vit.norm)
    split = SpecialisedViT(vit, sets=2, specialised_blocks=1, init="random", aux_classes=3)
    drawn = split.specialised[0]["blocks"][0]
    assert torch.equal(split.specialised[0]["norm"].weight, norm.weight)
    assert not torch.equal(drawn.attn.qkv.weight, block.attn.qkv.weight)
    for linear in (drawn.attn.qkv, drawn.attn.proj, drawn.mlp.fc1, drawn.mlp.fc2):  # nn.Linear's init
        bound = 1 / linear.in_features ** 0.5
        assert linear.weight.abs().max() <= bound and linear.weight.abs().max() > 0.9 * bound
        assert linear.bias.abs().max() <= bound
    assert torch.equal(drawn.norm1.weight, torch.ones(16)) and torch.equal(drawn.norm1.bias, torch.zeros(16))


def test_the_head_grows_as_pilots_update_fc():
    """Old rows keep their weights on the earlier copies and their bias; their columns on the new
    copy and the new rows are SimpleLinear's draws at the new width; unused columns are 0."""
    torch.manual_seed(1)
    head = torch.nn.Linear(3 * 4, 5)
    before = head.weight.detach().clone(), head.bias.detach().clone()
    grow_head(head, range(0, 2), range(2, 5), width=4, sets_used=2)
    weight, bias = head.weight.detach(), head.bias.detach()
    assert torch.equal(weight[:2, :4], before[0][:2, :4]) and torch.equal(bias[:2], before[1][:2])
    bound = (3 / 8) ** 0.5
    for block in (weight[:2, 4:8], weight[2:, :8]):
        assert block.abs().max() <= bound and not torch.equal(block, torch.zeros_like(block))
    assert torch.count_nonzero(weight[:, 8:]) == 0 and torch.count_nonzero(bias[2:]) == 0


def test_the_auxiliary_targets_are_pilots():
    labels = torch.tensor([0, 3, 4, 5, 7, 2])
    known = 4
    pilot = torch.where(labels - known + 1 > 0, labels - known + 1, 0)
    assert torch.equal(auxiliary_targets(labels, known), pilot)
    assert auxiliary_targets(labels, known).tolist() == [0, 0, 1, 2, 4, 0]


def test_the_loss_adds_the_auxiliary_cross_entropy_on_the_new_copys_features():
    from types import SimpleNamespace

    from incremental.strategies.memo import MEMO
    from incremental.strategies.options import MEMOConfig

    vit = _vit("token")
    split = SpecialisedViT(vit, sets=2, specialised_blocks=1, init="random", aux_classes=4).train()
    split.current.fill_(1)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 2])
    head = torch.nn.Linear(32, 5)
    features = split.forward_features(x)
    logits = head(features)
    plugin = MEMO.__new__(MEMO)
    plugin.config = MEMOConfig(aux_weight=0.7)
    plugin.context = SimpleNamespace(class_split=SimpleNamespace(label_ranges=lambda: [range(0, 2), range(2, 5)]))
    strategy = SimpleNamespace(model=SimpleNamespace(backbone=split), loss=F.cross_entropy(logits, y), mb_y=y,
                               experience=SimpleNamespace(current_experience=1))
    plugin.before_backward(strategy)
    aux_logits = split.aux_head(features[:, 16:])[:, :4]  # copy 1's: the 3 new classes and "old"
    expected = F.cross_entropy(logits, y) + 0.7 * F.cross_entropy(aux_logits, torch.tensor([0, 0, 1, 2, 3, 1]))
    torch.testing.assert_close(strategy.loss, expected)
    assert split.aux_outputs is None  # the graph goes with the loss


def _state(run_dir, experience: int | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if experience is None:
        return load_file(str(run_dir / "model.safetensors"))
    return torch.load(run_dir / "checkpoints" / f"experience_00{experience}.pt", weights_only=False)["model"]


def test_a_run_freezes_the_generalised_blocks_and_each_copy_after_its_experience(tmp_path):
    from conftest import run_tiny

    metrics = run_tiny(tmp_path, "run", "strategy={name: memo, specialised_init: pretrained}", "training.epochs=1",
                       "output.checkpoint=all")
    assert metrics["status"] == "complete" and metrics["memory"][-1]["exemplars"] == 30
    first, second, last = _state(tmp_path / "run", 0), _state(tmp_path / "run", 1), _state(tmp_path / "run")
    generalised = [k for k in first if k.startswith("backbone.vit.")]
    assert generalised and all(torch.equal(first[k], last[k]) for k in generalised)
    copy0 = [k for k in first if k.startswith("backbone.specialised.0.")]
    assert copy0 and all(torch.equal(first[k], last[k]) for k in copy0)
    copy1 = [k for k in second if k.startswith("backbone.specialised.1.")]
    assert all(torch.equal(second[k], last[k]) for k in copy1)  # frozen after experience 1
    assert any(not torch.equal(second[k], second[k.replace(".1.", ".0.", 1)]) for k in copy1)  # it trained


def test_ders_expansion_is_a_whole_vit_per_experience():
    """PILOT's DERNet: experience 0's feature is the pre-trained ViT's own (bit for bit); later
    ones concatenate every copy's, embeddings included."""
    from incremental.strategies.expandable_representation import ExpandedViT

    vit = _vit("token").eval()
    original = copy.deepcopy(vit)
    expanded = ExpandedViT(vit, sets=3, aux_classes=3).eval()
    x = torch.randn(4, 3, 8, 8)
    own = original.forward_head(original.forward_features(x), pre_logits=True)
    assert torch.equal(expanded.forward_features(x)[:, :16], own)
    with torch.no_grad():
        expanded.specialised[1].patch_embed.proj.weight.mul_(1.5)
    expanded.current.fill_(1)
    features = expanded.forward_features(x)
    second = expanded.specialised[1]
    assert torch.equal(features[:, :16], own)
    assert torch.equal(features[:, 16:32], second.forward_head(second.forward_features(x), pre_logits=True))
    assert not torch.equal(features[:, 16:32], own) and torch.count_nonzero(features[:, 32:]) == 0


def test_a_der_run_freezes_each_copy_after_its_experience(tmp_path):
    from conftest import run_tiny

    metrics = run_tiny(tmp_path, "run", "strategy=expandable_representation", "training.epochs=1",
                       "output.checkpoint=all")
    assert metrics["status"] == "complete" and metrics["memory"][-1]["exemplars"] == 30
    first, last = _state(tmp_path / "run", 0), _state(tmp_path / "run")
    copy0 = [k for k in first if k.startswith("backbone.specialised.0.")]
    assert any(".patch_embed." in k for k in copy0)  # the embeddings are the copy's own
    assert copy0 and all(torch.equal(first[k], last[k]) for k in copy0)
    copy1 = [k.replace(".0.", ".1.", 1) for k in copy0]
    assert any(not torch.equal(last[k], first[k.replace(".1.", ".0.", 1)]) for k in copy1)
