"""Pre-trained weights by name (incremental.models.hub), resolved offline by the real timm,
open_clip and huggingface_hub from a Hugging Face cache the tests lay out in the library's own
format (checked with huggingface_hub's ``scan_cache_dir``), holding tiny random weights of real
architectures: timm's ``test_vit`` and an open_clip CLIP built by open_clip itself."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_RUN, write_cifar100

from incremental.cli import main
from incremental.errors import ConfigError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TIMM_REPO = "timm/test_vit.r160_in1k"


def lay_out_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """A model repository in huggingface_hub's cache format: blobs named by their content hash,
    ``snapshots/<commit>/<file>`` symlinks to them, ``refs/main`` naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache that huggingface_hub reads, offline (what HF_HUB_CACHE and
    HF_HUB_OFFLINE=1 set when the library is imported)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def timm_test_vit_repo(cache: Path, tmp_path: Path) -> Path:
    """timm's own ``save_for_hf`` output (model.safetensors, config.json) of a random test_vit,
    as the snapshot of timm/test_vit.r160_in1k."""
    import timm
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False)
    saved = tmp_path / "saved"
    save_for_hf(model, str(saved), safe_serialization=True)
    snapshot = lay_out_repo(cache, TIMM_REPO, {name: (saved / name).read_bytes()
                                               for name in ("model.safetensors", "config.json")})
    from huggingface_hub import scan_cache_dir

    (repo,) = scan_cache_dir(cache).repos  # the library reads the layout as its own
    assert repo.repo_id == TIMM_REPO and {r.commit_hash for r in repo.revisions} == {COMMIT}
    return snapshot


TINY_CLIP = {"embed_dim": 32, "quick_gelu": True,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_CLIP_STATS = {"mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3]}


def open_clip_hub_repo(cache: Path) -> tuple[str, dict[str, torch.Tensor]]:
    """An open_clip repository as open_clip's ``push_to_hf_hub`` lays it out: the architecture and
    preprocessing in open_clip_config.json, the weights of the CLIP open_clip builds from it."""
    import open_clip

    torch.manual_seed(1)
    model = open_clip.CLIP(**TINY_CLIP)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights = cache.parent / "open_clip_model.safetensors"
    save_file(state, str(weights))
    config = {"model_cfg": TINY_CLIP, "preprocess_cfg": TINY_CLIP_STATS}
    repo_id = "test-org/clip-tiny-random"
    lay_out_repo(cache, repo_id, {"open_clip_config.json": json.dumps(config).encode(),
                                  "open_clip_model.safetensors": weights.read_bytes()})
    return repo_id, state


def spec_of(tmp_path: Path, body: str):
    from incremental.config.files import load_config

    (tmp_path / "tiny.yaml").write_text(TINY_RUN)
    config = tmp_path / "named.yaml"
    config.write_text("extends: tiny.yaml\n" + body)
    cfg, _ = load_config(str(config), [])
    return cfg


def test_names_and_paths_are_told_apart(tmp_path) -> None:
    from incremental.models.hub import weights_kind

    assert weights_kind("timm/vit_base_patch16_224.augreg_in21k", "vit") == "timm"
    assert weights_kind("hf-hub:timm/vit_small_patch16_224.augreg_in21k", "timm_vit") == "hf-hub"
    assert weights_kind("laion400m_e32", "clip") == "open_clip"
    assert weights_kind("ViT-B-32.laion400m_e32", "clip") == "open_clip"
    assert weights_kind("weights.safetensors", "clip") is None
    assert weights_kind("laion400m_e32", "vit") is None  # a timm backbone's bare word is a path
    local = tmp_path / "timm" / "vit.r1"
    local.parent.mkdir()
    local.write_bytes(b"x")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # an existing file always wins over a name it looks like
        assert weights_kind("timm/vit.r1", "vit") is None
    finally:
        os.chdir(cwd)


def test_a_timm_name_runs_from_the_cache_with_the_file_bit_identical_and_recorded(hub_cache, tmp_path) -> None:
    snapshot = timm_test_vit_repo(hub_cache, tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_RUN)
    config = tmp_path / "named.yaml"
    config.write_text("extends: tiny.yaml\nbackbone: {name: timm_vit, model: test_vit, "
                      f"pretrained: {TIMM_REPO}, drop_path_rate: 0.0}}\n")
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--set", "strategy=simplecil",
                 "--set", "output.tensorboard=false"]) == 0
    loaded = json.loads((out / "metrics.json").read_text())["backbone_report"]["pretrained"]
    weights = snapshot / "model.safetensors"
    assert loaded["named"]["name"] == TIMM_REPO and loaded["named"]["repo_id"] == TIMM_REPO
    assert loaded["named"]["revision"] == COMMIT
    assert loaded["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert loaded["named"]["mean"] == [0.5, 0.5, 0.5]  # timm's pretrained config for the tag

    from incremental.models.net import build_backbone

    cfg = spec_of(tmp_path, f"backbone: {{name: timm_vit, model: test_vit, pretrained: {TIMM_REPO}}}\n")
    backbone = build_backbone(cfg.backbone, in_chans=3, img_size=160)
    state = load_file(str(weights))
    own = backbone.state_dict()
    blocks = [k for k in state if k.startswith("blocks.")]
    assert blocks and all(torch.equal(own[k], state[k]) for k in blocks)
    assert torch.equal(own["pos_embed"], state["pos_embed"])  # at 160 px nothing is resized


def test_an_open_clip_hub_repository_sets_the_architecture_activation_and_normalisation(hub_cache, tmp_path) -> None:
    from open_clip.transformer import QuickGELU

    from incremental.data import build_dataset
    from incremental.models.net import build_backbone, resolve_backbone_weights

    repo_id, state = open_clip_hub_repo(hub_cache)
    cfg = spec_of(tmp_path, f"backbone: {{name: clip, model: clip-tiny, pretrained: 'hf-hub:{repo_id}'}}\n"
                  f"dataset: {{name: cifar100, root: {write_cifar100(tmp_path / 'data')}}}\n")
    weights = resolve_backbone_weights(cfg.backbone)
    assert weights.revision == COMMIT and weights.quick_gelu is True
    report: dict = {}
    backbone = build_backbone(cfg.backbone, in_chans=3, img_size=32, report=report, weights=weights)
    own = backbone.model.state_dict()
    assert own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in state)
    assert backbone.model.visual.transformer.width == 32  # the repository's architecture, not clip-tiny's 64
    assert any(isinstance(m, QuickGELU) for m in backbone.modules())
    assert report["pretrained"]["named"]["repo_id"] == repo_id
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config, weights.statistics())
    assert splits.mean == tuple(TINY_CLIP_STATS["mean"]) and splits.std == tuple(TINY_CLIP_STATS["std"])
    dataset_stats = build_dataset(cfg.dataset.name, cfg.dataset.config)  # auto without a name: the dataset's
    from incremental.data.cifar import CIFAR100_MEAN

    assert dataset_stats.mean == CIFAR100_MEAN


def test_an_open_clip_tag_resolves_through_open_clips_pretrained_config(hub_cache) -> None:
    """``laion400m_e32`` of ViT-B-32: open_clip's config gives the repository, QuickGELU and
    OpenAI's mean; the file comes from the cache. A quick_gelu that contradicts it is refused."""
    import open_clip

    from incremental.models.clip import quick_gelu
    from incremental.models.hub import resolve_weights
    from incremental.models.options import CLIPConfig

    pretrained_cfg = open_clip.get_pretrained_cfg("ViT-B-32", "laion400m_e32")
    repo_id = os.path.split(pretrained_cfg["hf_hub"])[0]
    payload = hub_cache.parent / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(payload))
    lay_out_repo(hub_cache, repo_id, {"open_clip_model.safetensors": payload.read_bytes()})
    weights = resolve_weights("laion400m_e32", "clip", CLIPConfig(model="ViT-B-32"))
    assert weights.path.name == "open_clip_model.safetensors" and weights.revision == COMMIT
    assert weights.repo_id == repo_id and weights.quick_gelu is True
    assert weights.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert quick_gelu(CLIPConfig(model="ViT-B-32"), {}, None, weights) is True
    with pytest.raises(ConfigError, match="trained with QuickGELU"):
        quick_gelu(CLIPConfig(model="ViT-B-32", quick_gelu=False), {}, None, weights)


def test_offline_with_nothing_cached_is_one_line_naming_the_cache_and_the_command(hub_cache) -> None:
    from incremental.models.hub import resolve_weights

    with pytest.raises(ConfigError) as caught:
        resolve_weights(TIMM_REPO, "timm_vit", None)
    message = str(caught.value)
    assert "\n" not in message and str(hub_cache) in message
    assert f"hf download {TIMM_REPO}" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(ConfigError, match="hf download timm/vit_base_patch32_clip_224.laion400m_e32"):
        from incremental.models.options import CLIPConfig

        resolve_weights("laion400m_e32", "clip", CLIPConfig(model="ViT-B-32"))


def test_unknown_tags_suggest_the_known_ones(hub_cache) -> None:
    from incremental.models.hub import resolve_weights
    from incremental.models.options import CLIPConfig

    with pytest.raises(ConfigError, match="unknown timm weights 'timm/test_vit.r16_in1k'.*r160_in1k"):
        resolve_weights("timm/test_vit.r16_in1k", "vit", None)
    with pytest.raises(ConfigError, match="unknown open_clip weights 'laion400m_e3' .*laion400m_e32"):
        resolve_weights("laion400m_e3", "clip", CLIPConfig(model="ViT-B-32"))


def test_a_swin_from_an_hf_hub_repository_loads_bit_identical_with_its_config_stats(hub_cache, tmp_path) -> None:
    """``hf-hub:<repo>`` with timm's files (model.safetensors, config.json whose pretrained_cfg
    gives the mean and std), for a Swin: the windows' tables load through timm's Swin filter."""
    from incremental.models.net import build_backbone, resolve_backbone_weights

    body = "backbone: {name: swin, embed_dim: 24, depths: [1, 1, 2, 1], num_heads: [1, 2, 3, 6]}\n"
    source = build_backbone(spec_of(tmp_path, body).backbone, in_chans=3, img_size=32)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    config = {"architecture": "swin_tiny_patch4_window7_224",
              "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}
    lay_out_repo(hub_cache, "test-org/tiny-swin", {"model.safetensors": weights.read_bytes(),
                                                   "config.json": json.dumps(config).encode()})
    cfg = spec_of(tmp_path, body.replace("}\n", ", pretrained: 'hf-hub:test-org/tiny-swin'}\n"))
    named = resolve_backbone_weights(cfg.backbone)
    assert named.statistics() == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)) and named.revision == COMMIT
    loaded = build_backbone(cfg.backbone, in_chans=3, img_size=32, weights=named).state_dict()
    expected = source.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
