"""The pre-trained-model methods checked on their mathematics: prototypes are class means,
RanPAC's head is a ridge least-squares solve, ACIL's recursion is the least-squares solution on
all data seen and DS-AL's second stream fits the first one's residual, frozen weights stay bit-identical, adapters and
SSF start as the identity, L2P picks the top-k keys by cosine, CODA mixes its components by
its attention weights, SLCA samples from the Gaussians it stored; and every method runs from
the CLI on a small pre-trained ViT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_RUN

from incremental.cli import main

VIT = "{name: vit, patch_size: 4, embed_dim: 32, depth: 3, num_heads: 2, global_pool: token, drop_path_rate: 0.0}"
METHODS = {
    "simplecil": "simplecil",
    "aper_adapter": "{name: aper, tuning: {name: adapter, bottleneck: 8}}",
    "aper_ssf": "{name: aper, tuning: ssf}",
    "aper_vpt": "{name: aper, tuning: {name: vpt_deep, length: 2}}",
    "aper_finetune": "{name: aper, tuning: finetune}",
    "ranpac": "{name: ranpac, projection_dim: 300}",
    "slca": "{name: slca, ca_samples_per_class: 16}",
    "cofima": "{name: cofima, ca_samples_per_class: 16}",
    "l2p": "{name: l2p, pool_size: 6, length: 2, top_k: 2}",
    "dualprompt": "{name: dualprompt, g_layers: [0], e_layers: [1, 2]}",
    "codaprompt": "{name: codaprompt, pool_size: 6, length: 4, layers: [0, 1, 2], ortho_weight: 0.01}",
    "ease": "{name: ease, bottleneck: 8}",
    "acil": "{name: acil, expansion_size: 128}",
    "dsal_finetune": "{name: dsal, expansion_size: 128, tuning: finetune}",
    "aper_lora": "{name: aper, tuning: {name: lora, rank: 4}}",
    "fecam": "{name: fecam, tuning: {name: adapter, bottleneck: 8}}",
    "inflora": "{name: inflora, rank: 4}",
    "lae": "{name: lae, tuning: {name: prefix, length: 2}, freeze_epochs: 0}",
    "mos": "{name: mos, bottleneck: 8, ca_epochs: 2, ca_samples_per_class: 16}",
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    """tiny.yaml, and a 'pre-trained' encoder file: a ViT of the run's shape trained by nothing
    but its seed (the methods' maths does not need good weights)."""
    from incremental.config import load_config
    from incremental.models.net import build_backbone

    root = tmp_path_factory.mktemp("pretrained")
    (root / "tiny.yaml").write_text(TINY_RUN)
    cfg, _ = load_config(str(root / "tiny.yaml"), [f"backbone={VIT}"])
    torch.manual_seed(7)
    encoder = build_backbone(cfg.backbone, in_chans=1, img_size=16)
    weights = root / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(weights))
    return root / "tiny.yaml", weights


def run_method(config: Path, weights: Path, out: Path, strategy: str, *sets: str) -> dict:
    args = ["run", str(config), "--out", str(out), "--quiet", "--set", f"backbone={VIT}",
            "--set", f"backbone.pretrained={weights}", "--set", f"strategy={strategy}",
            "--set", "training.epochs=1", "--set", "output.tensorboard=false", "--set", "protocol.memory={}"]
    for value in sets:
        args += ["--set", value]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_from_the_cli(method, pretrained, tmp_path):
    config, weights = pretrained
    metrics = run_method(config, weights, tmp_path / method, METHODS[method])
    assert metrics["status"] == "complete" and len(metrics["accuracy_matrix"]) == 3
    assert metrics["backbone_report"]["pretrained"]["sha256"] == _sha256(weights)
    trained, encoder = metrics["trained_params"], metrics["backbone_report"]["params"]
    if method in ("simplecil", "acil"):  # no gradient step at all
        assert trained == [0, 0, 0]
    elif method.startswith(("aper", "ranpac", "dsal", "fecam")):  # the first session only
        assert trained[0] > 0 and trained[1:] == [0, 0]
    else:  # every step; prompts, adapters and SLCA's slow backbone, never more than the whole
        assert all(t > 0 for t in trained)
    if method not in ("aper_finetune", "slca", "cofima", "dsal_finetune"):  # parameter-efficient: a fraction of the encoder
        assert max(trained) < encoder / 2, (trained, encoder)


def test_the_first_session_cosine_head_is_pilots_cosine_linear():
    """sigma cos(x[:, columns], w_c), rows drawn as nn.Linear draws them (PILOT's CosineLinear:
    uniform in +-1/sqrt(d)), sigma a parameter from 1, unseen classes masked as Avalanche's."""
    from incremental.strategies.pretrained import CosineIncrementalClassifier

    torch.manual_seed(0)
    head = CosineIncrementalClassifier(8, 3, columns=slice(4, 8))
    assert head.classifier.in_features == 4 and float(head.sigma.detach()) == 1.0
    assert head.classifier.weight.abs().max() <= 0.5 and "sigma" in dict(head.named_parameters())
    head.active_units[:2] = 1
    with torch.no_grad():
        head.sigma.fill_(2.5)
    x = torch.randn(5, 8)
    out = head(x).detach().numpy()
    half, w = x[:, 4:].numpy(), head.classifier.weight.detach().numpy()
    expected = 2.5 * (half / np.linalg.norm(half, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    assert np.allclose(out[:, :2], expected[:, :2], atol=1e-6) and (out[:, 2] == -1000).all()


@pytest.mark.parametrize("head, width", [("cosine", 32), ("linear", 64)])
def test_apers_first_session_trains_pilots_cosine_head_on_the_adapted_half(pretrained, tmp_path, head, width):
    config, weights = pretrained
    strategy = f"{{name: aper, tuning: {{name: adapter, bottleneck: 8}}, first_session_head: {head}}}"
    run_method(config, weights, tmp_path / "run", strategy)
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert saved["head.classifier.weight"].shape == (10, width)  # grown to every class, as Avalanche grows it
    if head == "cosine":  # the scale was learnt in the first session, then fixed with the rest
        assert float(saved["head.sigma"]) != 1.0
    else:
        assert "head.sigma" not in saved
    model, _, _, _ = _saved_features(tmp_path / "run")  # the saved model loads into the head it was built with
    assert type(model.head).__name__ == ("CosineIncrementalClassifier" if head == "cosine" else "IncrementalClassifier")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _saved_features(run_dir: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, list[range]]:
    """The saved model, the pooled features and labels of all training images (eval transforms)."""
    from conftest import load_run_model

    from incremental.protocol import OrderedClassSubset

    _, splits, split, model, _ = load_run_model(run_dir)
    train = OrderedClassSubset(splits.train, split.class_order)
    images = torch.stack([splits.eval_transform(train[i][0]) for i in range(len(train))])
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    return model, features, torch.tensor(train.targets), split.label_ranges()


def test_the_current_class_loss_is_pilots_masked_loss_sliced():
    """The template's loss for a strategy that trains on the current classes: the logits from
    the experience's first class on, labels shifted. Without smoothing it is PILOT's L2P loss
    (older logits at -inf) and its gradient; with smoothing it stays finite, which -inf does not."""
    from types import SimpleNamespace

    from incremental.training.template import IncrementalTemplate

    torch.manual_seed(0)
    logits = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([3, 4, 6, 5, 3, 6])
    masked = logits.clone()
    masked[:, :3] = float("-inf")
    for smoothing in (0.0, 0.1):
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
        state = SimpleNamespace(loss_classes_from=3, is_training=True, mb_output=logits, mb_y=labels,
                                _criterion=criterion)
        sliced = IncrementalTemplate.criterion(state)
        reference = criterion(masked, labels)
        if smoothing:
            assert torch.isinf(reference) and torch.isfinite(sliced)
            continue
        torch.testing.assert_close(sliced, reference, rtol=0, atol=1e-12)
        (grad,) = torch.autograd.grad(sliced, logits)
        (reference_grad,) = torch.autograd.grad(reference, logits)
        torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-12)
        assert not grad[:, :3].any()  # the older classes' logits get no gradient


@pytest.mark.parametrize("method", ["l2p", "slca", "ease"])
def test_the_current_class_methods_train_with_label_smoothing(method, pretrained, tmp_path):
    """Under -inf masking, label smoothing made the loss infinite from the second experience on,
    and the run stopped with "lower the learning rate"."""
    import math

    config, weights = pretrained
    metrics = run_method(config, weights, tmp_path / method, METHODS[method], "training.label_smoothing=0.1")
    assert metrics["status"] == "complete" and all(math.isfinite(loss) for loss in metrics["train_loss"])


@pytest.mark.parametrize("method", ["l2p", "dualprompt"])
def test_prompt_heads_start_as_timms_vit_head_and_e_prompts_from_the_previous_task(method, pretrained, tmp_path):
    """With a learning rate too small to move them, the saved weights are the initial ones: every
    class's head row from N(0, 0.02) (timm's trunc_normal_ cuts at +-2, so in effect untruncated)
    with a zero bias, PILOT's timm head, where nn.Linear's default is uniform +-1/sqrt(32) (std
    0.10) with a bias; and DualPrompt's E-prompt t a copy of E-prompt t-1 (PILOT's
    shared_prompt_pool). head_init: linear and e_prompt_init: random are the other choices."""
    config, weights = pretrained
    metrics = run_method(config, weights, tmp_path / method, METHODS[method], "training.optimizer.lr=1.0e-12")
    assert metrics["status"] == "complete"
    state = load_file(str(tmp_path / method / "model.safetensors"))
    weight, bias = state["head.classifier.weight"], state["head.classifier.bias"]
    assert weight.shape == (10, 32) and bias.abs().max() < 1e-6
    assert 0.015 < float(weight.std()) < 0.025 and abs(float(weight.mean())) < 0.005
    if method == "dualprompt":
        e = state["backbone.prompter.e"]  # (layers, key/value, pool, length, dim)
        torch.testing.assert_close(e[:, :, 1], e[:, :, 0], rtol=0, atol=1e-6)
        torch.testing.assert_close(e[:, :, 2], e[:, :, 1], rtol=0, atol=1e-6)
    other = {"l2p": "{name: l2p, pool_size: 6, length: 2, top_k: 2, head_init: linear}",
             "dualprompt": "{name: dualprompt, g_layers: [0], e_layers: [1, 2], head_init: linear, "
                           "e_prompt_init: random}"}[method]
    run_method(config, weights, tmp_path / "other", other, "training.optimizer.lr=1.0e-12")
    state = load_file(str(tmp_path / "other" / "model.safetensors"))
    assert float(state["head.classifier.weight"].std()) > 0.07 and state["head.classifier.bias"].abs().max() > 0.01
    if method == "dualprompt":
        e = state["backbone.prompter.e"]
        assert (e[:, :, 1] - e[:, :, 0]).abs().max() > 0.5


def _slca_unaligned_heads(run_dir: Path) -> list[dict]:
    """SLCA's record, per experience's checkpoint, of the head as it was before alignment."""
    heads = []
    for path in sorted((run_dir / "checkpoints").glob("experience_*.pt")):
        plugins = torch.load(path, weights_only=True)["plugins"]
        heads.append(next(state for state in plugins if isinstance(state, dict) and "unaligned" in state)["unaligned"])
    return heads


def test_slca_restores_the_head_before_alignment_and_freezes_older_rows(pretrained, tmp_path):
    """PILOT's SLCA: fc.backup() before alignment, fc.recall() after evaluation, old heads frozen
    while the slow learner trains. So the older classes' rows at the end of experience 2's slow
    learner are exactly those before experience 1's alignment; with head_after_alignment: keep and
    freeze_old_heads: false they are not."""
    config, weights = pretrained
    run_method(config, weights, tmp_path / "pilot", METHODS["slca"], "output.checkpoint=all",
               "training.optimizer.weight_decay=0.1")
    heads = _slca_unaligned_heads(tmp_path / "pilot")
    assert len(heads) == 3
    seen = heads[1]["weight"].shape[0]  # classes of experiences 0 and 1
    for name in ("weight", "bias"):
        assert torch.equal(heads[2][name][:seen], heads[1][name])
    aligned = load_file(str(tmp_path / "pilot" / "model.safetensors"))["head.classifier.weight"]
    assert not torch.equal(aligned[:seen], heads[1]["weight"])  # the run's last row used the aligned head
    run_method(config, weights, tmp_path / "kept", "{name: slca, ca_samples_per_class: 16, head_after_alignment: keep, "
               "freeze_old_heads: false}", "output.checkpoint=all", "training.optimizer.weight_decay=0.1")
    kept = _slca_unaligned_heads(tmp_path / "kept")
    assert not torch.equal(kept[2]["weight"][:seen], kept[1]["weight"])


def test_simplecil_prototypes_are_the_class_means_and_the_backbone_is_untouched(pretrained, tmp_path):
    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", "simplecil")
    model, features, labels, _ = _saved_features(tmp_path / "run")
    means = torch.stack([features[labels == c].mean(0) for c in range(10)])
    assert torch.allclose(model.output_adapter.prototypes, means, atol=1e-5)
    saved, original = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(weights))
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in original.items())  # bit-identical


def test_ranpac_head_is_the_ridge_least_squares_solution(pretrained, tmp_path):
    """W = argmin ||H W^T - Y||^2 + lambda ||W||^2 over every image seen, H = ReLU(F W_rand),
    with lambda the last one chosen: numpy's lstsq on [H; sqrt(lambda) I] gives the same W."""
    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", "{name: ranpac, projection_dim: 64, tuning: frozen}")
    model, features, labels, _ = _saved_features(tmp_path / "run")
    adapter = model.output_adapter
    ridge = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["plugins"][0]["ridges"][-1]
    hidden = torch.relu(features.double() @ adapter.projection.double()).numpy()
    onehot = np.eye(10)[labels.numpy()]
    m = hidden.shape[1]
    stacked = np.vstack([hidden, np.sqrt(ridge) * np.eye(m)])
    solution = np.linalg.lstsq(stacked, np.vstack([onehot, np.zeros((m, 10))]), rcond=None)[0].T
    assert np.allclose(adapter.weights.numpy(), solution, rtol=1e-3, atol=1e-4 * np.abs(solution).max())
    # the classifier: RanPAC's and PILOT's CosineLinear over those weights, cos(h, W_c)
    logits = adapter(features, None).double().numpy()
    cosine = (hidden / np.linalg.norm(hidden, axis=1, keepdims=True)) @ \
        (solution / np.linalg.norm(solution, axis=1, keepdims=True)).T
    assert bool(adapter.cosine) and np.allclose(logits, cosine, atol=1e-4)


def test_ranpacs_linear_classifier_is_the_regressions_prediction(pretrained, tmp_path):
    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", "{name: ranpac, projection_dim: 64, tuning: frozen, classifier: linear}")
    model, features, _, _ = _saved_features(tmp_path / "run")
    adapter = model.output_adapter
    hidden = torch.relu(features.float() @ adapter.projection.float())
    assert not bool(adapter.cosine)
    torch.testing.assert_close(adapter(features, None), hidden @ adapter.weights.float().T)


def test_ranpacs_float32_precision_is_the_references_arithmetic(pretrained, tmp_path):
    """precision: float32 keeps G and Q in fp32 and solves them by LU in fp32, as RanPAC's and
    PILOT's code do: the saved weights are torch's fp32 solve of the saved G and Q at the chosen
    lambda, bit for bit, and differ from the fp64 default's."""
    config, weights = pretrained
    run_method(config, weights, tmp_path / "fp32", "{name: ranpac, projection_dim: 64, tuning: frozen, precision: float32}")
    state = torch.load(tmp_path / "fp32" / "checkpoint.pt", weights_only=True)["plugins"][0]
    assert state["gram"].dtype == state["targets"].dtype == torch.float32
    model, _, _, _ = _saved_features(tmp_path / "fp32")
    system = state["gram"] + state["ridges"][-1] * torch.eye(64)
    assert torch.equal(model.output_adapter.weights.cpu(), torch.linalg.solve(system, state["targets"]).T)
    run_method(config, weights, tmp_path / "fp64", "{name: ranpac, projection_dim: 64, tuning: frozen}")
    default = torch.load(tmp_path / "fp64" / "checkpoint.pt", weights_only=True)["plugins"][0]
    assert default["gram"].dtype == torch.float64 and not torch.equal(default["gram"].float(), state["gram"])


def test_ranpacs_reference_ridge_choice_is_one_lu_solve_per_lambda_in_the_features_dtype():
    from incremental.strategies.ranpac import RIDGES, reference_ridge

    gen = torch.Generator().manual_seed(3)
    hidden = torch.relu(torch.randn(120, 16, generator=gen) @ torch.randn(16, 40, generator=gen))
    onehot = torch.eye(3)[torch.randint(0, 3, (120,), generator=gen)]
    fit, held = hidden[:96].numpy(), hidden[96:].numpy()
    errors = [np.mean((held @ np.linalg.solve(fit.T @ fit + np.float32(r) * np.eye(40, dtype=np.float32),
                                               fit.T @ onehot[:96].numpy()) - onehot[96:].numpy()) ** 2)
              for r in RIDGES]
    assert reference_ridge(hidden, onehot, 0.2) == RIDGES[int(np.argmin(errors))]


def test_ranpac_accumulates_to_the_solve_over_the_union():
    from incremental.strategies.ranpac import ridge_solve

    gen = torch.Generator().manual_seed(0)
    h1, h2 = torch.rand(30, 8, generator=gen, dtype=torch.float64), torch.rand(20, 8, generator=gen, dtype=torch.float64)
    y1, y2 = torch.eye(4, dtype=torch.float64)[torch.randint(0, 4, (30,), generator=gen)], \
        torch.eye(4, dtype=torch.float64)[torch.randint(0, 4, (20,), generator=gen)]
    accumulated = ridge_solve(h1.T @ h1 + h2.T @ h2, h1.T @ y1 + h2.T @ y2, 0.5)
    union = torch.cat([h1, h2])
    assert torch.allclose(accumulated.double(), ridge_solve(union.T @ union, union.T @ torch.cat([y1, y2]), 0.5).double(),
                          atol=1e-5)


def test_prompt_methods_leave_the_pretrained_vit_bit_identical(pretrained, tmp_path):
    config, weights = pretrained
    original = load_file(str(weights))
    for method in ("l2p", "dualprompt", "codaprompt"):
        run_method(config, weights, tmp_path / method, METHODS[method])
        saved = load_file(str(tmp_path / method / "model.safetensors"))
        inner = {k.replace(".attn.inner.", ".attn."): v for k, v in saved.items() if k.startswith("backbone.vit.")}
        assert all(torch.equal(inner[f"backbone.vit.{k}"], v) for k, v in original.items()), method
        assert any(k.startswith("backbone.prompter.") for k in saved)


def _tiny_transformer(kind: str) -> torch.nn.Module:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    if kind == "vit":
        return VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=0, embed_dim=32, depth=2,
                                 num_heads=2).eval()
    return SwinTransformer(img_size=16, patch_size=2, in_chans=1, num_classes=0, embed_dim=16, depths=(2, 2),
                           num_heads=(1, 2), window_size=4).eval()


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_adapters_and_ssf_start_as_the_identity(kind):
    from incremental.models.peft import add_adapters, add_ssf, tuning_off

    model = _tiny_transformer(kind)
    x = torch.randn(3, 1, 16, 16)
    before = model(x)
    add_adapters(model, bottleneck=8, scale=0.1)
    add_ssf(model)
    assert len(model.adapters.sets[0]) == (2 if kind == "vit" else 4) and len(model.ssf) > 4
    assert torch.equal(model(x), before)
    with torch.no_grad():  # once they change, the output does, and switching them off restores it
        for p in [*model.adapters.parameters(), *model.ssf.parameters()]:
            p.add_(0.1)
    assert not torch.allclose(model(x), before)
    with tuning_off(model):
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_ssf_starts_as_pilots_and_scales_the_patch_embedding(kind):
    """tuning: ssf as PILOT's vit_ssf: scales from N(1, 0.02), shifts from N(0, 0.02), and a scale
    and shift on the patch embedding too; init: identity with patch_embed: false is the
    pre-trained model itself at the start."""
    from incremental.config import load_config
    from incremental.models.peft import apply_tuning, tuning_off

    def tuning(value: str):
        return load_config("digits_b0_5steps", [f"strategy={{name: aper, tuning: {value}}}"])[0].strategy.config.tuning

    torch.manual_seed(0)
    model = _tiny_transformer(kind)
    x = torch.randn(3, 1, 16, 16)
    before = model(x)
    apply_tuning(model, tuning("ssf"))
    assert "patch_embed_proj" in model.ssf
    gammas = torch.cat([layer.gamma.detach() for layer in model.ssf.values()])
    betas = torch.cat([layer.beta.detach() for layer in model.ssf.values()])
    assert abs(float(gammas.mean()) - 1) < 0.005 and 0.015 < float(gammas.std()) < 0.025
    assert abs(float(betas.mean())) < 0.005 and 0.015 < float(betas.std()) < 0.025
    assert not torch.allclose(model(x), before)
    with tuning_off(model):
        assert torch.equal(model(x), before)
    plain = _tiny_transformer(kind)
    reference = plain(x)
    apply_tuning(plain, tuning("{name: ssf, init: identity, patch_embed: false}"))
    assert "patch_embed_proj" not in plain.ssf and torch.equal(plain(x), reference)


def test_adapters_drop_their_bottleneck_activations_in_training_as_pilots():
    """PILOT's adapters (vit_adapter, vit_ease) apply dropout 0.1 to the bottleneck's ReLU output:
    in training about 10% of those activations reach the up projection as zeros and the rest
    scaled by 1 / 0.9; in evaluation none. The tuning options and EASE build them at 0.1."""
    from incremental.config import load_config
    from incremental.models.peft import Adapter

    torch.manual_seed(0)
    adapter = Adapter(32, 64, scale=0.1, dropout=0.1)
    torch.nn.init.normal_(adapter.up.weight)
    seen = []
    adapter.up.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    x = torch.randn(4000, 32)
    active = torch.relu(adapter.down(x)).detach()
    adapter.eval()
    adapter(x)
    assert torch.equal(seen[-1], active)
    adapter.train()
    adapter(x)
    dropped = (seen[-1] == 0) & (active > 0)
    assert abs(float(dropped.sum()) / float((active > 0).sum()) - 0.1) < 0.01
    kept = seen[-1] != 0
    torch.testing.assert_close(seen[-1][kept], active[kept] / 0.9)
    cfg, _ = load_config("digits_b0_5steps", ["strategy={name: aper, tuning: adapter}"])
    assert cfg.strategy.config.tuning.config.dropout == 0.1
    assert load_config("digits_b0_5steps", ["strategy=ease"])[0].strategy.config.adapter_dropout == 0.1


def test_prefixes_in_a_shifted_swin_window_are_the_explicit_softmax():
    """Each window attends to [its image's prefix; its own tokens]; the relative position
    bias and the shift mask apply to the window's tokens only."""
    from incremental.models.peft import add_prefix_attention, transformer_blocks

    swin = _tiny_transformer("swin")
    block = transformer_blocks(swin)[1]  # the shifted one of stage 0: its mask is not None
    assert block.attn_mask is not None
    inner = block.attn
    wrapped = add_prefix_attention(swin, [1])[0]
    images, windows_per_image, n, c, heads, length = 2, block.attn_mask.shape[0], inner.window_area, 16, 1, 3
    x = torch.randn(images * windows_per_image, n, c)
    keys, values = torch.randn(images, heads, length, c // heads), torch.randn(images, heads, length, c // heads)
    wrapped.prefix = (keys, values)
    out = wrapped(x, mask=block.attn_mask)
    qkv = inner.qkv(x).reshape(len(x), n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    bias = inner._get_rel_pos_bias()[0]
    for w in range(len(x)):
        image, shift = divmod(w, windows_per_image)
        q, k, v = qkv[0][w], torch.cat([keys[image], qkv[1][w]], 1), torch.cat([values[image], qkv[2][w]], 1)
        logits = q @ k.transpose(-1, -2) * inner.scale
        logits[..., length:] += bias + block.attn_mask[shift]
        expected = inner.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(n, c))
        assert torch.allclose(out[w], expected, atol=1e-5), w
    wrapped.prefix = None
    assert torch.equal(wrapped(x, mask=block.attn_mask), inner(x, mask=block.attn_mask))


SWIN = "{name: swin, embed_dim: 16, depths: [2, 2], num_heads: [1, 2], drop_path_rate: 0.0}"


@pytest.mark.parametrize("method", ["aper_adapter", "aper_ssf", "ranpac", "ease"])
def test_the_tuning_methods_run_on_a_swin(method, tmp_path):
    """Adapters and SSF attach to every block of every Swin stage, at that stage's width."""
    (tmp_path / "tiny.yaml").write_text(TINY_RUN)
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "tiny.yaml"), "--out", str(out), "--quiet", "--set", f"backbone={SWIN}",
                 "--set", f"strategy={METHODS[method]}", "--set", "training.epochs=1",
                 "--set", "output.tensorboard=false", "--set", "protocol.memory={}"]) == 0
    saved = load_file(str(out / "model.safetensors"))
    tuned = {k for k in saved if ".adapters." in k or ".ssf." in k}
    assert tuned or method == "ranpac"
    if ".adapters." in " ".join(tuned):
        widths = {saved[k].shape[0] for k in tuned if k.endswith("up.weight")}
        assert widths == {16, 32}  # stage 0 and stage 1


def test_l2p_selects_the_top_k_keys_by_cosine_similarity():
    from incremental.models.prompts import L2PPool

    torch.manual_seed(0)
    pool = L2PPool(dim=6, pool_size=5, length=2, top_k=2, batchwise=False)
    query = torch.randn(4, 6)
    cosine = torch.nn.functional.cosine_similarity(query.unsqueeze(1), pool.keys.unsqueeze(0), dim=2)
    expected = cosine.argsort(dim=1, descending=True)[:, :2]
    out = pool.eval()(query)
    chosen = torch.stack([torch.stack([torch.nonzero((pool.prompts == t).all(-1).all(-1))[0, 0]
                                       for t in tokens.view(2, 2, 6)]) for tokens in out.tokens])
    assert torch.equal(chosen, expected)
    pull = (torch.nn.functional.normalize(pool.keys, dim=1)[expected]
            * torch.nn.functional.normalize(query, dim=1).unsqueeze(1)).sum() / 4
    assert torch.allclose(-out.loss, pull)


def test_l2p_evaluates_per_image_unless_told_to_take_the_batchs_majority_keys():
    """In evaluation each image keeps its own top-k keys; ``eval_batchwise`` (PILOT's test-time
    rule, for the leak measurement only) gives every image the batch's k most frequent ones."""
    from incremental.models.prompts import L2PPool, top_k_keys

    torch.manual_seed(1)
    pool = L2PPool(dim=6, pool_size=5, length=2, top_k=2, batchwise=True).eval()
    query = torch.randn(8, 6)
    own, _ = top_k_keys(query, pool.keys, 2, batchwise=False)
    majority, _ = top_k_keys(query, pool.keys, 2, batchwise=True)
    assert not torch.equal(own, majority)  # the batch disagrees, so the two rules differ here
    assert torch.equal(pool(query).tokens, pool.prompts[own].reshape(8, -1, 6))
    pool.eval_batchwise = True
    assert torch.equal(pool(query).tokens, pool.prompts[majority].reshape(8, -1, 6))
    assert (majority == majority[0]).all()


def test_the_leak_measurements_per_image_way_is_the_runs_own_last_accuracy(pretrained, tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "crosscheck"))
    from l2p_batchwise_leak import measure

    config, weights = pretrained
    metrics = run_method(config, weights, tmp_path / "run", METHODS["l2p"])
    measured = measure(tmp_path / "run", seed=0, batch_size=16)
    assert measured["per image"] == pytest.approx(metrics["accuracy"][-1], abs=1e-6)
    assert all(0 <= value <= 100 for value in measured.values())


def test_coda_prompt_is_the_attention_weighted_sum_of_its_components():
    from incremental.models.prompts import CodaPrompts

    torch.manual_seed(0)
    coda = CodaPrompts(dim=8, heads=2, pool_size=6, length=4, layers=[0], tasks=3, ortho_weight=0.0)
    coda.start_task(1)
    coda.eval()
    query = torch.randn(5, 8)
    prompt, alpha = coda.mix(query, 0)
    k = 4  # (task + 1) * components per task
    keys, attention, components = coda.keys[0, :k], coda.attention[0, :k], coda.components[0, :k]
    for b in range(5):
        weights = torch.stack([torch.nn.functional.cosine_similarity(query[b] * attention[j], keys[j], dim=0)
                               for j in range(k)])
        assert torch.allclose(alpha[b], weights, atol=1e-6)
        assert torch.allclose(prompt[b], (weights[:, None, None] * components).sum(0), atol=1e-5)
    # a new task's components are orthonormal to each other and to the earlier ones'
    flat = coda.keys[0, :k]
    assert torch.allclose(flat @ flat.T, torch.eye(k), atol=1e-5)


def test_slca_alignment_samples_come_from_the_stored_gaussians():
    from incremental.strategies.slca import alignment_samples

    gen = torch.Generator().manual_seed(0)
    means = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    root = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    covariances = root @ root.transpose(1, 2) + 0.1 * torch.eye(3, dtype=torch.float64)
    torch.manual_seed(0)
    samples, labels = alignment_samples(means, covariances, class_experience=[0, 1], current=1, per_class=20000)
    for label, factor in ((0, 0.9 + 0.1 * 1 / 2), (1, 0.9 + 0.1 * 2 / 2)):
        own = samples[labels == label].double()
        assert torch.allclose(own.mean(0), means[label] * factor, atol=0.05)
        assert torch.allclose(torch.cov(own.T), covariances[label], atol=0.08)


def test_ease_complements_old_prototypes_from_the_new_classes():
    from incremental.strategies.ease import complement

    gen = torch.Generator().manual_seed(0)
    prototypes = torch.randn(5, 2, 4, generator=gen)
    old, new = range(0, 2), range(2, 5)
    got = complement(prototypes, old, new, own=0, target=1)
    for i in old:
        weights = torch.softmax(torch.stack([torch.nn.functional.cosine_similarity(prototypes[i, 0], prototypes[j, 0], dim=0)
                                             for j in new]), dim=0)
        assert torch.allclose(got[i], (weights[:, None] * prototypes[2:5, 1]).sum(0), atol=1e-6)


def test_eases_earlier_choices_give_one_cosine_over_the_concatenation_and_a_linear_head(pretrained, tmp_path):
    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", "{name: ease, bottleneck: 8, use_reweight: false, recalc_sim: false, "
               "training_head: linear}")
    model, _, _, _ = _saved_features(tmp_path / "run")
    assert type(model.output_adapter).__name__ == "PrototypeOutput" and not hasattr(model.head, "sigma")


def _numpy_complement(p: np.ndarray, old: range, reference: range, own: int, target: int) -> np.ndarray:
    unit = p[:, own] / np.linalg.norm(p[:, own], axis=1, keepdims=True)
    similarity = unit[old.start:old.stop] @ unit[reference.start:reference.stop].T
    weights = np.exp(similarity) / np.exp(similarity).sum(axis=1, keepdims=True)
    return weights @ p[reference.start:reference.stop, target]


@pytest.mark.parametrize("recalc_sim", [True, False])
def test_ease_recalc_sim_complements_every_later_subspace_from_the_classes_that_have_it(recalc_sim):
    """PILOT's solve_sim_reset: after experience t, old experience i's classes in subspace d
    (i < d <= t) from the classes of experiences d..t, compared in subspace i; without
    recalc_sim (solve_similarity) only subspace t, from experience t's classes."""
    from incremental.strategies.ease import complement_old_classes

    gen = torch.Generator().manual_seed(1)
    ranges = [range(0, 2), range(2, 5), range(5, 7)]
    prototypes = torch.randn(7, 3, 4, generator=gen, dtype=torch.float64)
    before = prototypes.numpy().copy()
    complement_old_classes(prototypes, ranges, 2, recalc_sim)
    expected = before.copy()
    for i in range(2):
        for d in (range(i + 1, 3) if recalc_sim else [2]):
            reference = range(ranges[d].start, 7) if recalc_sim else ranges[2]
            expected[ranges[i].start:ranges[i].stop, d] = _numpy_complement(before, ranges[i], reference, i, d)
    assert np.allclose(prototypes.numpy(), expected, atol=1e-12)
    assert recalc_sim or np.array_equal(prototypes.numpy()[0:2, 1], before[0:2, 1])  # earlier complement kept


def test_ease_reweights_the_subspaces_logits_as_pilots_forward_reweight():
    """Class c of experience i: cos in its own subspace i, plus alpha / t times the cosines in
    every other subspace seen (t = the last experience); subspaces not trained yet count 0."""
    from incremental.models.net import SubspaceReweightOutput
    from incremental.strategies.ease import subspace_weights

    gen = torch.Generator().manual_seed(2)
    ranges, sets, dim, t, alpha = [range(0, 2), range(2, 4), range(4, 6)], 4, 3, 2, 0.1
    prototypes, x = torch.randn(6, sets * dim, generator=gen), torch.randn(5, sets * dim, generator=gen)
    out = SubspaceReweightOutput(prototypes, subspace_weights(ranges, t, sets, alpha), dim)(x, None).numpy()
    xs, ps = x.view(5, sets, dim).numpy(), prototypes.view(6, sets, dim).numpy()
    expected = np.zeros((5, 6))
    for i, classes in enumerate(ranges):
        for c in classes:
            for j in range(t + 1):
                cosine = xs[:, j] @ ps[c, j] / np.linalg.norm(xs[:, j], axis=1) / np.linalg.norm(ps[c, j])
                expected[:, c] += cosine if j == i else alpha / t * cosine
    assert np.allclose(out, expected, atol=1e-5)
    assert torch.equal(subspace_weights(ranges[:1], 0, sets, alpha), torch.tensor([[1.0, 0, 0, 0]] * 2))


def test_ease_adapter_dropout_acts_in_training_and_the_vit_stays_in_eval():
    """PILOT's EASE trains with its adapters' dropout (0.1) on; the pre-trained ViT keeps its eval
    behaviour (no drop path)."""
    import timm

    from incremental.strategies.ease import SubspaceViT

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, in_chans=1, num_classes=0,
                            embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.5)
    backbone = SubspaceViT(vit, sets=2, bottleneck=4, scale=1.0, dropout=0.5)
    with torch.no_grad():
        for p in vit.adapters.parameters():
            p.normal_()
    x = torch.randn(3, 1, 16, 16)
    backbone.train()
    assert not vit.training and vit.adapters.training
    assert not torch.equal(backbone.subspace(x, 0), backbone.subspace(x, 0))  # the adapters' dropout
    with torch.no_grad():
        for p in vit.adapters.parameters():
            p.zero_()
    assert torch.equal(backbone.subspace(x, 0), backbone.subspace(x, 0))  # nothing else draws (drop path off)
    backbone.eval()
    assert not vit.adapters.training


def test_ease_trains_each_experience_its_own_adapter_set_only(pretrained, tmp_path):
    """After experience t, set t has moved from its start and sets < t are bit-identical to
    what they were after their own experience; the pre-trained ViT never moves."""
    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", METHODS["ease"], "output.checkpoint=all")
    states = [torch.load(tmp_path / "run" / "checkpoints" / f"experience_{t:03d}.pt", weights_only=True)["model"]
              for t in range(3)]

    def adapter_set(state: dict, index: int) -> dict:
        prefix = f"backbone.vit.adapters.sets.{index}."
        return {k: v for k, v in state.items() if k.startswith(prefix)}

    original = load_file(str(weights))
    from incremental.strategies.ease import subspace_weights

    for t, state in enumerate(states):  # PILOT's defaults: reweighted subspaces, a cosine training head
        ranges = [range(0, 4), range(4, 7), range(7, 10)]
        assert torch.equal(state["output_adapter.class_weights"].cpu(), subspace_weights(ranges, t, 3, 0.1))
        assert "head.sigma" in state
    for t, state in enumerate(states):
        assert all(torch.equal(state[f"backbone.vit.{k}"], v) for k, v in original.items())
        for earlier in range(t):
            assert all(torch.equal(v, states[earlier][k]) for k, v in adapter_set(state, earlier).items())
        if t:
            assert any(not torch.equal(v, states[t - 1][k]) for k, v in adapter_set(state, t).items())


@pytest.mark.parametrize("n, m", [(270, 600), (400, 64)], ids=["dual (n < M)", "primal (n >= M)"])
def test_ranpacs_ridge_choice_equals_one_primal_solve_per_lambda(n, m):
    """The lambdas are scored from one eigendecomposition (of F F^T when n < M, else of F^T F);
    numpy's primal solve (F^T F + lambda I)^-1 F^T Y per lambda, the previous implementation, gives
    the same validation errors (to 1e-6, for lambda >= 1e-3: below that numpy's solve of a
    rank-deficient system is rounding noise) and the same choice."""
    from incremental.strategies.ranpac import RIDGES, choose_ridge, spectral_fit

    gen = torch.Generator().manual_seed(n)
    hidden = torch.relu(torch.randn(n, 32, generator=gen, dtype=torch.float64)
                        @ torch.randn(32, m, generator=gen, dtype=torch.float64))
    onehot = torch.eye(4, dtype=torch.float64)[torch.randint(0, 4, (n,), generator=gen)]
    split = int(n * 0.8)
    fit, held, y = hidden[:split].numpy(), hidden[split:].numpy(), onehot.numpy()
    errors = [np.mean((held @ np.linalg.solve(fit.T @ fit + r * np.eye(m), fit.T @ y[:split]) - y[split:]) ** 2)
              for r in RIDGES]
    s, left, right = spectral_fit(hidden[:split], hidden[split:], onehot[:split])
    ours = [float(torch.mean((left @ (right / (s + r).unsqueeze(1)) - onehot[split:]) ** 2)) for r in RIDGES]
    usable = [i for i, r in enumerate(RIDGES) if r >= 1e-3]
    assert np.allclose(np.array(ours)[usable], np.array(errors)[usable], rtol=1e-6, atol=0)
    assert choose_ridge(hidden, onehot, 0.2) == RIDGES[int(np.argmin(errors))]


def test_ranpacs_final_solve_equals_numpy_and_survives_an_indefinite_gram():
    """Cholesky inside G's memory (G + lambda I is positive definite): numpy's solve to 1e-6; a
    Gram matrix that rounding left indefinite falls back to a pivoted L D L^T factorisation, also
    in place, and still solves as numpy's LU does; G's lower triangle and diagonal, which define
    it, are kept bit for bit (G is made exactly symmetric here), and its upper triangle is scratch:
    a second solve of the same G gives the same weights bit for bit."""
    from incremental.strategies.ranpac import ridge_solve

    gen = torch.Generator().manual_seed(1)
    h = torch.rand(50, 30, generator=gen, dtype=torch.float64)
    q = torch.rand(30, 5, generator=gen, dtype=torch.float64)
    gram = h.T @ h
    gram = (gram + gram.T) / 2
    before = gram.clone()
    expected = np.linalg.solve(gram.numpy() + 0.1 * np.eye(30), q.numpy()).T
    first = ridge_solve(gram, q, 0.1)
    assert np.allclose(first.double().numpy(), expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(torch.tril(gram), torch.tril(before))
    assert not torch.equal(gram, before)  # the factor is left in the upper triangle
    assert torch.equal(ridge_solve(gram, q, 0.1), first)
    shifted = before - 1e-3 * torch.eye(30, dtype=torch.float64) * before.diagonal().max()
    indefinite = shifted.clone()
    expected = np.linalg.solve(indefinite.numpy() + 1e-8 * np.eye(30), q.numpy()).T
    assert np.allclose(ridge_solve(indefinite, q, 1e-8).double().numpy(), expected, rtol=1e-4)
    assert torch.equal(torch.tril(indefinite), torch.tril(shifted))


def _two_restore_ridge_solve(gram: torch.Tensor, targets: torch.Tensor, ridge: float) -> torch.Tensor:
    """The solve as it was before G's upper triangle became scratch (78d5211): G made whole again
    after the factorisation, one more M x M triangle copy per solve."""
    from scipy.linalg import lapack

    from incremental.strategies.ranpac import _restore_upper

    matrix, rhs = gram.numpy(), targets.double().numpy()
    diagonal = matrix.diagonal().copy()
    try:
        _restore_upper(matrix, diagonal + ridge)
        factor, info = lapack.dpotrf(matrix.T, lower=1, clean=0, overwrite_a=1)
        solution, info = lapack.dpotrs(factor, rhs, lower=1)
    finally:
        _restore_upper(matrix, diagonal)
    return torch.from_numpy(solution).T.float()


def test_ranpacs_accumulated_solves_equal_the_two_copy_solve_bit_for_bit():
    """Experience after experience (G += H^T H by addmm_, whose upper and lower triangles need not
    agree to the last bit, then a solve), leaving G's upper triangle as scratch gives the weights
    the old solve gave, which copied G whole again after each factorisation."""
    from incremental.strategies.ranpac import ridge_solve

    gen = torch.Generator().manual_seed(2)
    new_gram, old_gram = (torch.zeros(300, 300, dtype=torch.float64) for _ in range(2))
    q = torch.zeros(300, 7, dtype=torch.float64)
    for experience in range(4):
        h = torch.relu(torch.randn(90, 300, generator=gen, dtype=torch.float64))
        y = torch.nn.functional.one_hot(torch.randint(0, 7, (90,), generator=gen), 7).double()
        for gram in (new_gram, old_gram):
            gram.addmm_(h.T, h)
        q.addmm_(h.T, y)
        ridge = 10.0 ** (experience - 2)
        assert torch.equal(ridge_solve(new_gram, q, ridge), _two_restore_ridge_solve(old_gram, q, ridge))
    assert torch.equal(torch.tril(new_gram), torch.tril(old_gram))


def test_codas_new_task_components_are_classical_gram_schmidt_of_fresh_draws():
    """CODA-Prompt's reference re-initialises a task's components by classical Gram-Schmidt: each
    fresh normal draw minus its projections onto every earlier row (trained, so no longer
    orthogonal) and onto the task's rows before it, then unit length. Written here in numpy."""
    import numpy as np

    from incremental.models.prompts import CodaPrompts

    torch.manual_seed(0)
    coda = CodaPrompts(dim=6, heads=2, pool_size=6, length=2, layers=[0], tasks=3, ortho_weight=0.0)
    with torch.no_grad():  # what training leaves: task 0's rows no longer orthonormal
        for tensor in (coda.components, coda.keys, coda.attention):
            tensor[0, :2] += torch.randn_like(tensor[0, :2])
    before = [t.detach()[0, :2].reshape(2, -1).double().numpy().copy()
              for t in (coda.components, coda.keys, coda.attention)]
    torch.manual_seed(1)
    coda.start_task(1)
    torch.manual_seed(1)  # the same draws, in the same order
    for basis, tensor in zip(before, (coda.components, coda.keys, coda.attention)):
        draws = torch.randn(2, basis.shape[1]).double().numpy()
        rows = list(basis)
        for draw in draws:
            vector = draw - sum((draw @ u) / (u @ u) * u for u in rows)
            rows.append(vector / np.linalg.norm(vector))
        after = tensor.detach()[0].reshape(6, -1).double().numpy()
        np.testing.assert_allclose(after[2:4], np.stack(rows[2:]), atol=1e-5)
        np.testing.assert_allclose(after[:2], basis)  # the earlier rows kept


def _ridge(inputs: np.ndarray, targets: np.ndarray, gamma: float) -> np.ndarray:
    return np.linalg.solve(inputs.T @ inputs + gamma * np.eye(inputs.shape[1]), inputs.T @ targets)


def test_recursive_least_squares_in_blocks_is_the_ridge_solution_on_all_rows():
    """ACIL's equations 9-10, block after block of any size: R and W equal the batch ridge
    inverse and solution over every row given (numpy), and the blocks' partition does not matter."""
    from incremental.strategies.acil import RecursiveLeastSquares

    gen = np.random.default_rng(0)
    x, y = gen.standard_normal((70, 12)), np.eye(5)[gen.integers(0, 5, 70)]
    for blocks in ([70], [25, 25, 20], [1] * 70):
        rls = RecursiveLeastSquares(12, 5, gamma=0.3)
        for part_x, part_y in zip(np.split(x, np.cumsum(blocks)[:-1]), np.split(y, np.cumsum(blocks)[:-1])):
            rls.fit(torch.from_numpy(part_x), torch.from_numpy(part_y))
        assert np.allclose(rls.weights.numpy(), _ridge(x, y, 0.3), atol=1e-10)
        assert np.allclose(rls.inverse.numpy(), np.linalg.inv(x.T @ x + 0.3 * np.eye(12)), atol=1e-10)


def _expanded(run_dir: Path):
    model, features, labels, ranges = _saved_features(run_dir)
    adapter = model.output_adapter
    expanded = (features.double() @ adapter.expansion.T).numpy()
    return adapter, features, labels.numpy(), ranges, expanded


def test_acils_head_is_the_ridge_solution_on_every_image_seen(pretrained, tmp_path):
    """After the last experience, blocks of 16 rows: W = (X^T X + gamma I)^-1 X^T Y over all
    training images, X = ReLU(f B^T) with B the saved expansion (drawn as nn.Linear draws, in
    +-1/sqrt(d)); the logits are X W over the classes seen; the backbone is bit-identical."""
    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", "{name: acil, expansion_size: 96, gamma: 0.5, rls_batch_size: 16}")
    adapter, features, labels, _, expanded = _expanded(tmp_path / "run")
    assert type(adapter).__name__ == "AnalyticOutput" and adapter.expansion.dtype == torch.float64
    assert adapter.expansion.shape == (96, features.shape[1])
    assert float(adapter.expansion.abs().max()) <= 1 / np.sqrt(features.shape[1])
    hidden = np.maximum(expanded, 0)
    solution = _ridge(hidden, np.eye(10)[labels], 0.5)
    assert np.allclose(adapter.main.numpy(), solution.T, atol=1e-8 * np.abs(solution).max())
    logits = adapter(features, None).double().numpy()
    assert np.allclose(logits, hidden @ solution, atol=1e-4)
    saved, original = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(weights))
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in original.items())


def test_dsals_compensation_stream_fits_the_main_streams_residual_on_the_current_classes(pretrained, tmp_path):
    """One block per experience: the main stream is ACIL's ridge on ReLU(z); the compensation
    stream the ridge on tanh(z) onto, per experience, Y minus the main stream's prediction just
    after that experience, zero outside the experience's classes; the logits main + C comp."""
    config, weights = pretrained
    run_method(config, weights, tmp_path / "run",
               "{name: dsal, expansion_size: 80, gamma: 0.5, gamma_comp: 2.0, compensation_ratio: 0.7}")
    adapter, features, labels, ranges, expanded = _expanded(tmp_path / "run")
    onehot, residuals = np.eye(10)[labels], []
    for seen in ranges:
        upto, now = np.isin(labels, np.arange(seen.stop)), np.isin(labels, np.arange(seen.start, seen.stop))
        main = _ridge(np.maximum(expanded[upto], 0), onehot[upto], 0.5)
        residual = onehot[now] - np.maximum(expanded[now], 0) @ main
        residual[:, : seen.start], residual[:, seen.stop:] = 0.0, 0.0
        residuals.append((np.tanh(expanded[now]), residual))
    compensation = _ridge(np.vstack([r[0] for r in residuals]), np.vstack([r[1] for r in residuals]), 2.0)
    scale = np.abs(compensation).max()
    assert np.allclose(adapter.main.numpy(), main.T, atol=1e-8 * np.abs(main).max())
    assert np.allclose(adapter.compensation.numpy(), compensation.T, atol=1e-8 * scale)
    expected = np.maximum(expanded, 0) @ main + 0.7 * np.tanh(expanded) @ compensation
    assert np.allclose(adapter(features, None).double().numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_lora_starts_as_the_pretrained_model_and_adds_its_low_rank_product(kind):
    """tuning: lora: only A and B train; with B = 0 the model is the pre-trained one; once they
    change, each target layer computes x (W + (alpha / r) B A)^T + b, the pre-trained W and b
    untouched; tuning_off switches the branch off."""
    from incremental.config import load_config
    from incremental.models.peft import apply_tuning, tuning_off

    lora = load_config("digits_b0_5steps", [
        "strategy={name: aper, tuning: {name: lora, rank: 3, alpha: 6.0, targets: [attn.qkv, mlp.fc2]}}"])[0]
    model = _tiny_transformer(kind)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 1, 16, 16)
    before = model(x)
    apply_tuning(model, lora.strategy.config.tuning)
    blocks = 2 if kind == "vit" else 4
    assert len(model.lora) == 2 * blocks and torch.equal(model(x), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("lora.") for n in trainable)
    with torch.no_grad():
        for update in model.lora.values():
            update.b.normal_()
    name = next(iter(model.lora))
    layer = model.get_submodule(name.replace("_", "."))  # registered under the layer's name
    update = model.lora[name]
    inputs = torch.randn(5, layer.in_features)
    merged = torch.nn.functional.linear(inputs, layer.weight + 2.0 * update.b @ update.a, layer.bias)
    torch.testing.assert_close(layer(inputs), merged)
    torch.testing.assert_close(update.delta_weight(), 2.0 * update.b @ update.a)
    assert not torch.allclose(model(x), before)
    with tuning_off(model):
        assert torch.equal(model(x), before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in pretrained.items())


def _numpy_fecam(features: np.ndarray, labels: np.ndarray, shrinkage: str, alpha: float, normalization: str):
    """Per class: the mean and pinv(S) from the definitions, in numpy."""
    means, precisions = [], []
    for c in range(int(labels.max()) + 1):
        x = features[labels == c]
        cov = np.cov(x.T)
        if shrinkage == "identity":
            shrunk = cov + alpha * np.eye(len(cov))
        else:
            off = cov[~np.eye(len(cov), dtype=bool)]
            v2 = off[off != 0].mean()
            shrunk = cov + alpha * np.diag(cov).mean() * np.eye(len(cov)) + alpha * v2 * (1 - np.eye(len(cov)))
        if normalization == "rows_correlation":
            matrix = np.corrcoef(shrunk)  # numpy's corrcoef also takes rows as variables
        else:
            sd = np.sqrt(np.diag(shrunk))
            matrix = shrunk / np.outer(sd, sd)
        means.append(x.mean(axis=0))
        precisions.append(np.linalg.pinv(matrix))
    return np.stack(means), np.stack(precisions)


def _numpy_distances(features: np.ndarray, means: np.ndarray, precisions: np.ndarray) -> np.ndarray:
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    centres = means / np.linalg.norm(means, axis=1, keepdims=True)
    return np.stack([np.einsum("nd,de,ne->n", unit - centres[c], precisions[c], unit - centres[c])
                     for c in range(len(means))], axis=1)


def test_fecams_scores_are_minus_pilots_mahalanobis_distances(pretrained, tmp_path):
    """A frozen ViT, PILOT's defaults: each class's pinv(corrcoef(Sigma + 100 I)) and the
    distance between L2-normalised feature and mean, recomputed in numpy from the saved model's
    features; the scores are minus those distances, so the argmin is the prediction."""
    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", "{name: fecam, tuning: frozen}")
    model, features, labels, _ = _saved_features(tmp_path / "run")
    adapter = model.output_adapter
    means, precisions = _numpy_fecam(features.double().numpy(), labels.numpy(), "identity", 100.0, "rows_correlation")
    assert np.allclose(adapter.class_means.numpy(), means, atol=1e-5)
    assert np.allclose(adapter.precisions.numpy(), precisions, atol=1e-4 * np.abs(precisions).max())
    scores = adapter(features, None).double().numpy()
    assert np.allclose(-scores, _numpy_distances(features.double().numpy(), means, precisions), atol=1e-3)
    saved, original = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(weights))
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in original.items())


def test_fecams_paper_shrinkage_normalisation_and_tukey_transform_follow_their_definitions():
    from incremental.models.net import MahalanobisOutput
    from incremental.strategies.fecam import normalized, shrunk_covariance, tukey

    gen = np.random.default_rng(1)
    features = np.abs(gen.standard_normal((60, 6))) * np.array([1, 2, 3, 1, 1, 4])
    labels = np.repeat([0, 1, 2], 20)
    transformed = features ** 0.5
    means, precisions = _numpy_fecam(transformed, labels, "fecam", 1.0, "correlation")
    ours = [torch.linalg.pinv(normalized(shrunk_covariance(torch.from_numpy(transformed[labels == c]), "fecam", 1.0),
                                         "correlation")) for c in range(3)]
    assert np.allclose(torch.stack(ours).numpy(), precisions, atol=1e-8)
    assert torch.equal(tukey(torch.from_numpy(features), 0.5), torch.from_numpy(features).pow(0.5))
    output = MahalanobisOutput(torch.from_numpy(means).float(), torch.from_numpy(precisions).float(), 0.5)
    scores = output(torch.from_numpy(features).float(), None).double().numpy()
    assert np.allclose(-scores, _numpy_distances(transformed, means, precisions), atol=1e-4)


def test_inflora_down_projections_avoid_the_stored_subspace():
    """A_t from the covariance with the old subspace M removed is orthogonal to M (so B A x = 0
    for x in span M, whatever B learns); from a retained M, A's rows lie in span M; the first
    basis holds the threshold share of the spectrum (numpy's SVD, the reference's criterion)."""
    from incremental.strategies.inflora import design_down_projection, first_basis, update_basis

    gen = np.random.default_rng(0)
    mix = gen.standard_normal((16, 16)) * np.linspace(3, 0.1, 16)
    first = mix @ mix.T / 16
    basis, kind = first_basis(first, 0.95)
    s = np.linalg.svd(first, compute_uv=False)
    assert basis.shape[1] == max(int(np.sum(np.cumsum(s ** 2 / (s ** 2).sum()) < 0.95)), 1) and kind == "remove"
    second = (lambda m: m @ m.T / 16)(gen.standard_normal((16, 16)))
    a = design_down_projection(second, basis, kind, rank=3)
    assert a.shape == (3, 16) and np.abs(a @ basis).max() < 1e-10
    assert np.allclose(a @ a.T, np.eye(3) / 3)  # orthonormal rows over sqrt(3)
    grown, kind = update_basis(basis, kind, second, 0.97)
    assert grown.shape[1] >= basis.shape[1] and np.allclose(grown.T @ grown, np.eye(grown.shape[1]), atol=1e-8)
    flat, kind = first_basis(np.eye(16) + 0.01 * first, 0.95)  # most directions needed: their complement
    assert kind == "retain" and 0 < flat.shape[1] <= 8
    wide = np.linalg.qr(gen.standard_normal((16, 5)))[0]
    a = design_down_projection(second, wide, "retain", rank=2)
    assert np.allclose(a, a @ wide @ wide.T, atol=1e-10)


def test_inflora_trains_one_branch_a_task_orthogonal_to_the_old_inputs(pretrained, tmp_path):
    """Through a run: the ViT is bit-identical; task 0's B is unchanged by task 1; task 1's A is
    orthogonal to (remove) or inside (retain) each block's subspace stored after task 0."""
    config, weights = pretrained
    run_method(config, weights, tmp_path / "run", "{name: inflora, rank: 4}", "output.checkpoint=all")
    after_first = torch.load(tmp_path / "run" / "checkpoints" / "experience_000.pt", weights_only=True)
    first_state = next(p for p in after_first["plugins"] if isinstance(p, dict) and "bases" in p)
    first_model = after_first["model"]
    saved, original = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(weights))
    assert all(torch.equal(saved[f"backbone.{k}"], v) for k, v in original.items())
    blocks = len(first_state["bases"])
    for block in range(blocks):
        key = f"backbone.task_lora.b.{block}.0"
        assert torch.equal(saved[key], first_model[key]) and saved[key].abs().sum() > 0
        a1, basis = saved["backbone.task_lora.a"][block, 1].double().numpy(), first_state["bases"][block].numpy()
        if first_state["kinds"][block] == "remove":
            assert np.abs(a1 @ basis).max() < 1e-5
        else:
            assert np.abs(a1 - a1 @ basis @ basis.T).max() < 1e-5
