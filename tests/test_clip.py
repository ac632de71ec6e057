"""Vision-language backbones (open_clip) and the class-name strategies, on the digits.

No CLIP weights can be fetched here, so the module trains the toolkit's small ``clip-tiny``
with CLIP's contrastive loss on the digits' training images captioned "a photo of a {name}."
(a few seconds), saves it as an open_clip checkpoint, and every run loads it through
``backbone.pretrained``. The expected numbers are computed with open_clip's own model, tokenizer
and zero-shot classifier, outside the toolkit.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from conftest import (comparable, load_run_model, resume_from_first_checkpoint, same_weights, write_cifar100,
                      write_image_folder)
from incremental.cli import main

SIZE = 16
TEMPLATE = "a photo of a {}."


def open_clip_model(image_size: int = SIZE, **options) -> torch.nn.Module:
    from incremental.models.clip import TOOLKIT_ARCHITECTURES

    cfg = copy.deepcopy(TOOLKIT_ARCHITECTURES["clip-tiny"])
    cfg["vision_cfg"]["image_size"] = image_size
    return open_clip.CLIP(**cfg, **options)


def digits(split: str = "train"):
    """The digits as a run sees them (eval transform: normalised, 1 channel) and their labels."""
    from incremental.data import build_dataset
    from incremental.data.options import DigitsConfig

    splits = build_dataset("digits", DigitsConfig(image_size=SIZE))
    data = getattr(splits, split)
    images = torch.stack([splits.eval_transform(data[i][0]) for i in range(len(data))])
    return images, torch.tensor(data.targets), splits.class_names


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """An open_clip checkpoint of clip-tiny, contrastively trained on the digits (all classes)."""
    from incremental.models.clip import pretrain_contrastive

    torch.manual_seed(0)
    model = open_clip_model()
    images, labels, names = digits("train")
    losses = pretrain_contrastive(model, images.expand(-1, 3, -1, -1), [TEMPLATE.format(n) for n in names], labels,
                                  steps=60, seed=0)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0
    path = tmp_path_factory.mktemp("clip") / "clip_tiny_digits.pt"
    torch.save(model.state_dict(), path)  # open_clip's own key layout: visual.*, transformer.*, ...
    return path


def reference_model(weights: Path) -> torch.nn.Module:
    model = open_clip_model()
    model.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


CLIP_RUN = """
name: clip_tiny
seed: 3
dataset: {{name: digits, image_size: 16}}
protocol: {{initial_classes: 4, increment: 3, class_order: random, memory: {{total: 30}}}}
backbone: {{name: clip, model: clip-tiny, pretrained: {weights}}}
strategy: continual_clip
training: {{epochs: 1, batch_size: 32, eval_batch_size: 128, optimizer: {{name: adamw, lr: 1.0e-3}}}}
output: {{tensorboard: false}}
"""


def run_clip(tmp_path: Path, weights: Path, name: str, *sets: str) -> Path:
    config = tmp_path / "clip.yaml"
    config.write_text(CLIP_RUN.format(weights=weights))
    args = ["run", str(config), "--out", str(tmp_path / name), "--quiet"]
    for value in sets:
        args += ["--set", value]
    assert main(args) == 0
    return tmp_path / name


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def zero_shot_predictions(model: torch.nn.Module, names: list[str], images: torch.Tensor) -> torch.Tensor:
    """open_clip's zero-shot classifier over ``names`` on ``images`` (1 channel, normalised)."""
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=24)
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, names, [TEMPLATE], device="cpu")
        features = model.encode_image(images.expand(-1, 3, -1, -1), normalize=True)
    return (features @ classifier).argmax(dim=1)


# ----------------------------------------------------------------------------- the backbone


def test_the_image_tower_is_open_clips_behind_timms_contract(weights):
    from incremental.models.clip import build_clip
    from incremental.models.options import CLIPConfig
    from incremental.models.pretrained import load_pretrained

    backbone = build_clip(CLIPConfig(model="clip-tiny"), in_chans=1, img_size=SIZE).eval()
    report = load_pretrained(backbone, weights)
    assert report["tensors"] == len(backbone.state_dict()) and not report["resized"]
    reference = reference_model(weights)
    images = digits("test")[0][:8]
    features = backbone.forward_features(images)
    assert torch.equal(features, reference.encode_image(images.expand(-1, 3, -1, -1)))
    pooled = backbone.forward_head(features, pre_logits=True)
    assert backbone.num_features == 64 and pooled.shape == (8, 64)
    assert torch.allclose(pooled.norm(dim=1), torch.ones(8), atol=1e-6)


def test_quick_gelu_runs_open_clips_quick_gelu_model(weights):
    """quick_gelu: true builds open_clip's QuickGELU model: the same weights give its image and
    text features exactly, and not the GELU model's."""
    from incremental.models.clip import build_clip
    from incremental.models.options import CLIPConfig
    from incremental.models.pretrained import load_pretrained

    backbone = build_clip(CLIPConfig(model="clip-tiny", quick_gelu=True), in_chans=1, img_size=SIZE).eval()
    load_pretrained(backbone, weights)
    reference = open_clip_model(quick_gelu=True)
    reference.load_state_dict(torch.load(weights, weights_only=True))
    reference.eval()
    images = digits("test")[0][:8]
    features = backbone.forward_features(images)
    assert torch.equal(features, reference.encode_image(images.expand(-1, 3, -1, -1)))
    assert not torch.allclose(features, reference_model(weights).encode_image(images.expand(-1, 3, -1, -1)))
    tokens = backbone.tokenize(["a photo of a zero."])
    assert torch.equal(backbone.encode_text(tokens), reference.encode_text(tokens))


@pytest.mark.parametrize("model, tag, expected", [
    ("ViT-B-32", None, "GELU"),                          # the architecture's own config
    ("ViT-B-32", "openai", "QuickGELU"),                 # open_clip's pretrained config for the tag
    ("ViT-B-32", "ViT-B-32.laion400m_e32", "QuickGELU"),
    ("ViT-B-32", "ViT-B-32.laion2b_s34b_b79k", "GELU"),
    ("ViT-B-16", "ViT-B-16.laion400m_e32", "GELU"),      # PROOF's weights: GELU, as open_clip says
    ("ViT-B-32", "my-own-finetune", "GELU"),             # a tag open_clip does not know: the architecture's
    ("ViT-B-32-quickgelu", None, "QuickGELU"),           # the architecture's config says so
])
def test_the_activation_follows_open_clips_config_for_the_tag(model, tag, expected):
    from incremental.errors import ConfigError
    from incremental.models.clip import model_config, quick_gelu
    from incremental.models.options import CLIPConfig

    cfg = CLIPConfig(model=model)
    assert ("QuickGELU" if quick_gelu(cfg, model_config(cfg), tag) else "GELU") == expected
    if tag in (None, "my-own-finetune"):
        return  # nothing to contradict
    with pytest.raises(ConfigError, match="would run them with the other activation"):
        quick_gelu(CLIPConfig(model=model, quick_gelu=expected == "GELU"), model_config(cfg), tag)


def test_a_built_clip_backbone_has_the_tags_activation():
    """Through build_backbone, as a run builds it: OpenAI's ViT-B-32 weights get QuickGELU modules."""
    from incremental.config import load_config
    from incremental.models.net import build_backbone

    cfg, _ = load_config("digits_b0_5steps", ["backbone={name: clip, model: ViT-B-32, pretrained_tag: openai}"])
    backbone = build_backbone(cfg.backbone, in_chans=1, img_size=32)
    assert {type(m).__name__ for m in backbone.modules() if "GELU" in type(m).__name__} == {"QuickGELU"}


def test_text_embeddings_are_open_clips_prompt_ensemble(weights):
    """Real class names through the BPE tokenizer that ships with open_clip; each template
    encoded, normalised, averaged and normalised again."""
    from incremental.models.clip import build_clip
    from incremental.models.options import CLIPConfig
    from incremental.models.pretrained import load_pretrained

    backbone = build_clip(CLIPConfig(model="clip-tiny"), in_chans=1, img_size=SIZE)
    load_pretrained(backbone, weights)
    names, templates = ["aquarium fish", "maple tree", "seven"], ["a photo of a {}.", "a blurry photo of the {}."]
    tokens = backbone.tokenize(["a photo of a aquarium fish."])
    assert torch.equal(tokens, open_clip.tokenize(["a photo of a aquarium fish."], context_length=24))
    assert tokens[0, 0] == 49406 and 49407 in tokens[0].tolist()  # start and end of text
    reference = reference_model(weights)
    expected = []
    with torch.no_grad():
        for name in names:
            encoded = reference.encode_text(open_clip.tokenize([t.format(name) for t in templates], context_length=24))
            mean = F.normalize(encoded, dim=-1).mean(dim=0)
            expected.append(mean / mean.norm())
    assert torch.allclose(backbone.text_embeddings(names, templates), torch.stack(expected), atol=1e-6)


def test_weights_of_another_image_size_are_resized_by_open_clip(tmp_path):
    from incremental.models.clip import build_clip
    from incremental.models.options import CLIPConfig
    from incremental.models.pretrained import load_pretrained

    path = tmp_path / "clip32.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in open_clip_model(32).state_dict().items()}}, path)
    backbone = build_clip(CLIPConfig(model="clip-tiny"), in_chans=3, img_size=SIZE)
    report = load_pretrained(backbone, path)
    assert report["resized"] == ["model.visual.positional_embedding"]
    assert backbone.model.visual.positional_embedding.shape == (1 + (SIZE // 8) ** 2, 64)


def test_an_architecture_from_an_open_clip_config_file(tmp_path):
    from incremental.models.clip import build_clip
    from incremental.models.options import CLIPConfig

    (tmp_path / "mini.json").write_text(json.dumps({
        "embed_dim": 16, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "patch_size": 4, "head_width": 16},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}))
    backbone = build_clip(CLIPConfig(config_file=str(tmp_path / "mini.json")), in_chans=3, img_size=SIZE)
    assert backbone.num_features == 16 and backbone.model.visual.image_size == (SIZE, SIZE)
    assert backbone.forward_features(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, 16)
    assert backbone.text_embeddings(["one"], [TEMPLATE]).shape == (1, 16)


def test_a_resnet_clip_is_built_from_its_open_clip_config(tmp_path):
    """open_clip's ModifiedResNet image tower (CLIP's RN50 family), shrunk: the wrapper does not
    care which tower open_clip builds."""
    from open_clip.modified_resnet import ModifiedResNet

    from incremental.models.clip import build_clip
    from incremental.models.options import CLIPConfig

    (tmp_path / "rn.json").write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}))
    backbone = build_clip(CLIPConfig(config_file=str(tmp_path / "rn.json")), in_chans=1, img_size=32).eval()
    assert isinstance(backbone.model.visual, ModifiedResNet)
    images = torch.rand(3, 1, 32, 32)
    assert torch.equal(backbone.forward_features(images), backbone.model.encode_image(images.expand(-1, 3, -1, -1)))
    assert backbone.num_features == 32


def test_named_template_sets_are_open_clips():
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    from incremental.models.clip import prompt_templates

    expanded = prompt_templates(["simple_imagenet", "a sketch of a {}."])
    assert expanded == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES] + ["a sketch of a {}."]
    assert len(expanded) == 8 and all(t.count("{}") == 1 for t in expanded)


def test_the_shipped_clip_protocols_carry_the_references_settings():
    """PROOF's protocol: CLIP's 18 CIFAR templates (the first is what PROOF trains with) and the
    repository's batch fusion, PROOF's default; Continual-CLIP's: its one template, no memory."""
    from incremental.config import load_config
    from incremental.models.clip import prompt_templates

    proof, _ = load_config("cifar100_224_b0_10steps_clip", [])
    templates = prompt_templates(proof.protocol.templates)
    assert len(templates) == len(set(templates)) == 18 and templates[0] == "a photo of a {}."
    assert all(t.count("{}") == 1 and t.endswith(" {}.") for t in templates)
    assert proof.strategy.name == "proof" and proof.strategy.config.fusion == "batch"
    assert load_config("cifar100_224_b0_10steps_clip", ["strategy=proof"])[0].strategy.config.fusion == "batch"
    continual, _ = load_config("cifar100_224_b0_10steps_continual_clip", [])
    assert continual.strategy.name == "continual_clip" and continual.protocol.templates == ["a bad photo of a {}."]
    assert not continual.protocol.memory.total


# ----------------------------------------------------------------------------- class names


def test_every_dataset_names_its_classes(tmp_path):
    from incremental.data import build_dataset
    from incremental.data.options import Cifar100Config, DigitsConfig, ImageFolderConfig

    assert build_dataset("digits", DigitsConfig()).class_names[:3] == ["zero", "one", "two"]
    folder = write_cifar100(tmp_path / "cifar", n_train=100, n_test=100)
    assert build_dataset("cifar100", Cifar100Config(root=str(folder))).class_names[5] == "class5"
    root = write_image_folder(tmp_path / "imgs", classes=("n01", "n02", "n03"), per_class=1)
    (tmp_path / "synsets.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish\nn03 great white shark, white shark\n")
    (tmp_path / "names.json").write_text(json.dumps({"n01": "tench", "n02": "goldfish", "n03": "shark"}))
    (tmp_path / "index.json").write_text(json.dumps({"0": ["n01", "tench"], "1": ["n02", "goldfish"],
                                                     "2": ["n03", "shark"]}))
    for file, third in (("synsets.txt", "great white shark"), ("names.json", "shark"), ("index.json", "shark")):
        splits = build_dataset("imagefolder", ImageFolderConfig(root=str(root), class_names=str(tmp_path / file)))
        assert splits.class_names == ["tench", "goldfish", third]


def test_names_reach_the_text_encoder_in_class_order(tmp_path):
    """CIFAR's underscores read as spaces, and label l is named after class class_order[l]."""
    from incremental.config import load_config
    from incremental.data import build_dataset
    from incremental.protocol import build_benchmark, make_class_split
    from incremental.strategy import StrategyContext

    folder = write_cifar100(tmp_path / "cifar", n_train=100, n_test=100)
    meta = {b"fine_label_names": [f"class_{i}_x".encode() for i in range(100)], b"coarse_label_names": []}
    import pickle

    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    (tmp_path / "c.yaml").write_text(f"dataset: {{name: cifar100, root: {folder}}}\nprotocol: {{class_order: random}}\n")
    cfg, _ = load_config(str(tmp_path / "c.yaml"))
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
    context = StrategyContext(config=cfg, class_split=split, benchmark=build_benchmark(splits, split), device="cpu",
                              splits=splits)
    assert context.class_texts()[:3] == [f"class {c} x" for c in split.class_order[:3]]
    assert split.class_order[:3] != (0, 1, 2)


# ----------------------------------------------------------------------------- strategies


def test_text_initialised_rows_are_the_scaled_normalised_text_embeddings(weights, tmp_path):
    """continual_clip trains nothing, so after the run every head row is still what
    ``head_init: text`` wrote when its class arrived."""
    run = run_clip(tmp_path, weights, "continual")
    state = load_file(str(run / "model.safetensors"))
    reference = reference_model(weights)
    names = metrics(run)["class_names"]  # in class order
    with torch.no_grad():
        text = F.normalize(reference.encode_text(open_clip.tokenize([TEMPLATE.format(n) for n in names],
                                                                    context_length=24)), dim=-1)
    expected = text.numpy() * np.exp(reference.logit_scale.item())
    np.testing.assert_allclose(state["head.classifier.weight"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert not state["head.classifier.bias"].any()


def test_zeroshot_never_changes_a_weight_and_is_open_clips_classifier(weights, tmp_path):
    run = run_clip(tmp_path, weights, "zeroshot", "strategy=zeroshot")
    state = load_file(str(run / "model.safetensors"))
    loaded = torch.load(weights, weights_only=True)
    assert all(torch.equal(state[f"backbone.model.{k}"], v) for k, v in loaded.items())
    matrix = metrics(run)["accuracy_matrix"]  # row i: after experience i, on experiences 0..i
    for j in range(len(matrix)):  # one fixed classifier over every class: each column is constant
        assert len({row[j] for row in matrix[j:]}) == 1
    images, labels, names = digits("test")
    predicted = zero_shot_predictions(reference_model(weights), names, images)
    expected = 100.0 * int((predicted == labels).sum()) / len(labels)
    assert metrics(run)["last_accuracy"] == pytest.approx(expected, abs=1e-9)
    assert expected > 60  # the contrastively trained clip-tiny reads the digits' names


def test_continual_clip_classifies_among_the_names_seen_so_far(weights, tmp_path):
    run = run_clip(tmp_path, weights, "continual")
    record = metrics(run)
    _, _, split, _, _ = load_run_model(run)
    images, labels, names = digits("test")
    reference = reference_model(weights)
    order = list(split.class_order)
    remapped = torch.tensor([order.index(int(y)) for y in labels])
    for step, seen in enumerate(np.cumsum(split.classes_per_experience)):
        keep = remapped < seen
        predicted = zero_shot_predictions(reference, [names[c] for c in order[:seen]], images[keep])
        expected = 100.0 * int((predicted == remapped[keep]).sum()) / int(keep.sum())
        assert record["accuracy"][step] == pytest.approx(expected, abs=1e-9)
    # zeroshot with classes: seen is the same classifier
    same = run_clip(tmp_path, weights, "zeroshot_seen", "strategy={name: zeroshot, classes: seen}")
    assert metrics(same)["accuracy_matrix"] == record["accuracy_matrix"]


def test_clip_replay_trains_the_image_tower_only_and_distills_through_old_text(weights, tmp_path):
    run = run_clip(tmp_path, weights, "replay", "strategy=clip_replay", "training.epochs=2")
    state, loaded = load_file(str(run / "model.safetensors")), torch.load(weights, weights_only=True)
    text_keys = [k for k in loaded if not k.startswith("visual.")]
    assert text_keys and all(torch.equal(state[f"backbone.model.{k}"], loaded[k]) for k in text_keys)
    assert not torch.equal(state["backbone.model.visual.proj"], loaded["visual.proj"])
    assert metrics(run)["memory"][-1]["exemplars"] == 30


def test_the_distillation_term_is_the_kl_of_text_aligned_logits(weights):
    from types import SimpleNamespace

    from incremental.models.net import build_model
    from incremental.strategies.clip import CLIPReplay
    from incremental.strategies.options import CLIPReplayConfig

    plugin = CLIPReplay.__new__(CLIPReplay)
    plugin.config = CLIPReplayConfig(distill_weight=0.5, temperature=2.0)
    student = build_model(_clip_spec(weights), in_chans=1, img_size=SIZE, initial_classes=4)
    teacher = copy.deepcopy(student).eval()
    with torch.no_grad():
        for p in student.backbone.model.visual.parameters():
            p.add_(0.01 * torch.randn_like(p))
    text = F.normalize(torch.randn(4, 64), dim=-1)
    plugin.teacher, plugin.old_text, plugin.scale = teacher, text, 20.0
    plugin.head_inputs = SimpleNamespace(pooled=None)
    x = digits("test")[0][:6]
    plugin.head_inputs.pooled = student.forward_head(student.forward_features(x), pre_logits=True)
    strategy = SimpleNamespace(mb_x=x, loss=torch.tensor(1.0))
    plugin.before_backward(strategy)
    with torch.no_grad():
        old = 20.0 * teacher.forward_head(teacher.forward_features(x), pre_logits=True) @ text.T / 2.0
        new = 20.0 * plugin.head_inputs.pooled @ text.T / 2.0
    p_old, p_new = old.softmax(1).numpy().astype(np.float64), new.softmax(1).detach().numpy().astype(np.float64)
    kl = np.mean(np.sum(p_old * (np.log(p_old) - np.log(p_new)), axis=1))
    assert float(strategy.loss.detach()) == pytest.approx(1.0 + 0.5 * 4.0 * kl, rel=1e-4)


def _clip_spec(weights: Path):
    return load_config_text(f"backbone: {{name: clip, model: clip-tiny, pretrained: {weights}}}\n").backbone


def load_config_text(text: str):
    import tempfile

    from incremental.config import load_config

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(text)
        return load_config(str(path))[0]


# ----------------------------------------------------------------------------- PROOF


def _proof(dim: int = 8, classes: int = 5, fusion: str = "instance"):
    from incremental.models.proof import ProofOutput

    torch.manual_seed(0)
    module = ProofOutput(dim, prompt_length=3, dropout=0.1, fusion=fusion)
    module.prototypes = torch.randn(classes, dim)
    module.text_features = F.normalize(torch.randn(2, classes, dim), dim=-1)
    module.add_experience()
    module.add_experience()
    return module.eval()


def test_proofs_fusion_attention_is_its_scaled_dot_product_with_residual_and_norm():
    module = _proof()
    tokens = torch.randn(3, 7, 8)
    attention = module.attention
    t = tokens.double().numpy()
    q, k, v = (t @ layer.weight.double().detach().numpy().T for layer in (attention.query, attention.key, attention.value))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(8)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ v) @ attention.out.weight.double().detach().numpy().T + attention.out.bias.double().detach().numpy()
    residual = out + t
    normed = (residual - residual.mean(-1, keepdims=True)) / np.sqrt(residual.var(-1, keepdims=True) + 1e-5)
    expected = normed * attention.norm.weight.double().detach().numpy() + attention.norm.bias.double().detach().numpy()
    np.testing.assert_allclose(attention(tokens).detach().numpy(), expected, atol=1e-5)


def test_proofs_logits_are_its_three_terms_and_instance_fusion_ignores_the_batch():
    module = _proof()
    pooled = F.normalize(torch.randn(6, 8), dim=-1)
    with torch.no_grad():
        text_logits, prototype_logits, zero_shot, image, text = module.logits_parts(pooled)
        assert torch.allclose(module(pooled, None), text_logits + prototype_logits + zero_shot)
        # the projections are summed over experiences, then normalised
        summed = sum(p(pooled) for p in module.image_projections)
        assert torch.allclose(image, F.normalize(summed, dim=-1), atol=1e-6)
        assert torch.allclose(zero_shot, image @ text.T)
        alone = torch.cat([module(pooled[i:i + 1], None) for i in range(6)])
        assert torch.allclose(alone, module(pooled, None), atol=1e-5)
        # fusion: batch averages the fused text tokens over the batch (the repository's code)
        batch = _proof(fusion="batch")
        batch.load_state_dict({**module.state_dict(), "batch_fusion": torch.tensor(True)})
        fused_image, fused_text, _ = batch.fuse(image, text, batch.project(batch.image_projections, batch.prototypes))
        _, per_image, _ = module.fuse(image, text, module.project(module.image_projections, module.prototypes))
        assert torch.allclose(fused_text[0], per_image.mean(dim=0), atol=1e-6)
        assert not torch.allclose(batch(pooled, None), module(pooled, None))


def test_proof_keeps_clip_and_old_image_projections_frozen(weights, tmp_path):
    run = run_clip(tmp_path, weights, "proof", "strategy=proof", "output.checkpoint=all")
    state, loaded = load_file(str(run / "model.safetensors")), torch.load(weights, weights_only=True)
    assert all(torch.equal(state[f"backbone.model.{k}"], v) for k, v in loaded.items() if k != "logit_scale")
    assert not torch.equal(state["backbone.model.logit_scale"], loaded["logit_scale"])  # trained, as in PROOF
    first = torch.load(run / "checkpoints" / "experience_000.pt", weights_only=True)["model"]
    for key in ("output_adapter.image_projections.0.weight", "output_adapter.context_prompts.0"):
        assert torch.equal(first[key], state[key])
    assert not torch.equal(first["output_adapter.text_projections.0.weight"],
                           state["output_adapter.text_projections.0.weight"])
    assert state["output_adapter.prototypes"].shape == (10, 64)
    assert state["output_adapter.text_features"].shape == (1, 10, 64)
    assert len([k for k in state if k.startswith("output_adapter.image_projections.") and k.endswith("weight")]) == 3


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("strategy", ["clip_replay", "proof", "continual_clip"])
def test_a_stopped_and_resumed_clip_run_is_identical(weights, tmp_path, strategy):
    full = run_clip(tmp_path, weights, "full", f"strategy={strategy}", "output.checkpoint=all")
    stopped = tmp_path / "stopped"
    resume_from_first_checkpoint(full, stopped)
    assert comparable(stopped) == comparable(full)
    assert same_weights(stopped, full)


@pytest.mark.parametrize("strategy", ["finetune", "simplecil", "replay", "lwf", "icarl"])
def test_existing_strategies_run_on_the_clip_image_tower(weights, tmp_path, strategy):
    record = metrics(run_clip(tmp_path, weights, strategy, f"strategy={strategy}"))
    assert record["status"] == "complete" and len(record["accuracy"]) == 3


def test_every_clip_strategy_runs_the_digits_protocol_from_the_command_line(weights, tmp_path, capsys):
    """The command line's entry point in this process (the wheel check of .ci/run runs one in a
    fresh interpreter): each strategy's run prints its summary and records its name."""
    config = tmp_path / "clip.yaml"
    config.write_text(CLIP_RUN.format(weights=weights))
    for strategy in ("zeroshot", "continual_clip", "clip_replay", "proof"):
        assert main(["run", str(config), "--out", str(tmp_path / strategy), "--set", f"strategy={strategy}"]) == 0
        assert "average incremental accuracy" in capsys.readouterr().out
        assert metrics(tmp_path / strategy)["strategy"] == strategy


SYNTHETIC_OOD = "{name: synthetic, num_classes: 4, test_per_class: 10, image_size: 16, channels: 1}"


def test_the_ood_probe_scores_with_text_prototypes(weights, tmp_path):
    """MCM's score: softmax(cos / T) with T = 1 by default. For continual_clip the run's logits
    are the logit scale times the same cosines, so the text head at T = 1 / scale agrees with
    them exactly; at T = 1 the max-logit ranking (and its AUROC) is the same, and MSP's is not.
    `incremental probe` on the saved model agrees with the run's last step."""
    scale = float(reference_model(weights).logit_scale.exp().clamp(max=100.0))
    assert scale > 2  # trained away from 1, so T = 1 and T = 1 / scale differ
    run = run_clip(tmp_path, weights, "ood", "probes=[{name: ood, head: text, num_samples: 60}, "
                                             f"{{name: ood, label: ood_scaled, head: text, num_samples: 60, "
                                             f"temperature: {1 / scale!r}}}, "
                                             "{name: ood, label: ood_logits, num_samples: 60}, "
                                             f"{{name: ood, label: ood_synthetic, head: text, num_samples: 40, "
                                             f"source: dataset, dataset: {SYNTHETIC_OOD}}}]")
    probes = metrics(run)["probes"]
    mcm, scaled, logits = probes["ood"][0], probes["ood_scaled"][0], probes["ood_logits"][0]
    assert mcm["head"] == scaled["head"] == "text" and logits["head"] == "logits"
    for key, value in scaled["summary"].items():
        assert logits["summary"][key] == pytest.approx(value, abs=1e-6)
    assert mcm["summary"]["auroc/max_logit"] == pytest.approx(logits["summary"]["auroc/max_logit"], abs=1e-9)
    assert mcm["summary"]["auroc/msp"] != pytest.approx(logits["summary"]["auroc/msp"], abs=1e-3)
    assert mcm["summary"]["auroc/msp"] > 60  # the trained clip-tiny tells seen digits from unseen ones
    assert main(["probe", str(run), "--quiet", "--set", f"probes=[{{name: ood, label: ood_synthetic, head: text, "
                 f"num_samples: 40, source: dataset, dataset: {SYNTHETIC_OOD}}}]",
                 "--out", str(tmp_path / "offline.json")]) == 0
    offline = json.loads((tmp_path / "offline.json").read_text())["probes"]["ood_synthetic"]
    assert offline["summary"] == probes["ood_synthetic"][-1]["summary"]
