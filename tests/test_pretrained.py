"""Pretrained weights from local files, and MAE pretraining that produces them."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from incremental.cli import main
from incremental.config import Component, parse_dataclass
from incremental.errors import ConfigError
from incremental.config.schema import MAEOptions
from incremental.mae import MaskedAutoencoder
from incremental.models.net import build_backbone
from incremental.models.pretrained import load_pretrained, read_checkpoint
from incremental.registry import BACKBONES, load_builtins

load_builtins("backbones")


def make(name: str, size: int, in_chans: int = 3, **options):
    entry = BACKBONES.get(name)
    return build_backbone(Component(name, parse_dataclass(entry.config_cls, options)),
                          in_chans=in_chans, img_size=size)


@pytest.fixture(scope="module")
def vit_tiny_224_weights(tmp_path_factory):
    """What a user gets from timm.create_model('vit_tiny_patch16_224', pretrained=True) and
    safetensors.torch.save_file(model.state_dict(), ...): here with random weights."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)  # with its 1000-class head
    path = tmp_path_factory.mktemp("weights") / "vit_tiny_patch16_224.safetensors"
    save_file(model.state_dict(), str(path))
    return path, model.state_dict()


def test_timm_vit_at_32px_loads_224px_weights_resizing_pos_and_patch_embeddings(vit_tiny_224_weights):
    path, original = vit_tiny_224_weights
    backbone = make("timm_vit", 32, model="vit_tiny_patch16_224", patch_size=4)
    report = load_pretrained(backbone, path)
    assert report["resized"] == ["patch_embed.proj.weight", "pos_embed"]
    assert report["dropped"] == ["head.bias", "head.weight"]
    assert backbone.pos_embed.shape == (1, 1 + 8 * 8, 192)
    torch.testing.assert_close(backbone.cls_token, original["cls_token"])
    torch.testing.assert_close(backbone.blocks[3].mlp.fc1.weight, original["blocks.3.mlp.fc1.weight"])
    # the class token's position is kept; the 14x14 patch table is resampled to 8x8
    torch.testing.assert_close(backbone.pos_embed[0, 0], original["pos_embed"][0, 0])


def test_rgb_weights_load_into_a_grayscale_model_as_the_channel_sum(vit_tiny_224_weights):
    path, original = vit_tiny_224_weights
    backbone = make("timm_vit", 224, in_chans=1, model="vit_tiny_patch16_224")
    report = load_pretrained(backbone, path)
    assert report["resized"] == ["patch_embed.proj.weight (incl. input channels)"]
    torch.testing.assert_close(backbone.patch_embed.proj.weight,
                               original["patch_embed.proj.weight"].sum(dim=1, keepdim=True))


def test_torch_checkpoints_in_mae_and_ddp_layouts_load(vit_tiny_224_weights, tmp_path):
    path, original = vit_tiny_224_weights
    encoder = {k: v for k, v in original.items() if not k.startswith("head.")}
    mae_layout = tmp_path / "mae_pretrain.pth"  # facebookresearch/mae: {'model': encoder}
    torch.save({"model": encoder, "epoch": 799}, mae_layout)
    ddp_layout = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in encoder.items()}}, ddp_layout)
    for file in (mae_layout, ddp_layout):
        backbone = make("timm_vit", 32, model="vit_tiny_patch16_224", patch_size=4)
        load_pretrained(backbone, file)
        torch.testing.assert_close(backbone.norm.weight, original["norm.weight"])


def test_a_token_pooled_encoder_loads_into_an_average_pooled_model(vit_tiny_224_weights):
    """MAE's recipe: pretrain with the final norm, finetune with average pooling and fc_norm."""
    path, original = vit_tiny_224_weights
    backbone = make("timm_vit", 32, model="vit_tiny_patch16_224", patch_size=4, global_pool="avg")
    report = load_pretrained(backbone, path)
    assert report["renamed"] == ["norm.weight -> fc_norm.weight", "norm.bias -> fc_norm.bias"]
    torch.testing.assert_close(backbone.fc_norm.weight, original["norm.weight"])


def test_the_backbone_of_a_toolkit_model_loads_without_its_head(tmp_path):
    from incremental.models.net import IncrementalNet

    trained = IncrementalNet(make("resnet32", 32, width=8), initial_classes=7)
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    fresh = make("resnet32", 32, width=8)
    load_pretrained(fresh, path)
    torch.testing.assert_close(fresh.stem[0].weight, trained.backbone.stem[0].weight)


def test_swin_relative_position_tables_are_resized_to_smaller_windows(tmp_path):
    source = make("swin", 224, embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 3])
    path = tmp_path / "swin224.pth"
    torch.save(source.state_dict(), path)
    target = make("swin", 32, embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 3])
    report = load_pretrained(target, path)
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert table in report["resized"]
    assert target.state_dict()[table].shape == ((2 * 4 - 1) ** 2, 1)  # window 7 -> 4
    torch.testing.assert_close(target.layers[2].blocks[0].mlp.fc1.weight, source.layers[2].blocks[0].mlp.fc1.weight)


def test_loading_errors_are_one_line_and_name_the_key(vit_tiny_224_weights, tmp_path):
    vit = make("vit", 32, embed_dim=64, depth=2, num_heads=2)
    with pytest.raises(ConfigError, match="do not exist") as err:
        load_pretrained(vit, tmp_path / "nope.safetensors")
    assert err.value.key == "backbone.pretrained"
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ConfigError, match="cannot read .* as weights"):
        load_pretrained(vit, corrupt)
    resnet = tmp_path / "resnet.pt"
    torch.save(make("resnet32", 32).state_dict(), resnet)
    with pytest.raises(ConfigError, match=r"not a checkpoint of this VisionTransformer: \d+ missing .*unexpected"):
        load_pretrained(vit, resnet)
    wider = tmp_path / "wider.safetensors"  # same layout, another width
    save_file(make("vit", 32, embed_dim=96, depth=2, num_heads=2).state_dict(), str(wider))
    with pytest.raises(ConfigError, match="of another shape"):
        load_pretrained(vit, wider)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_pickled_objects_are_refused(tmp_path):
    """weights_only loading: a checkpoint that needs arbitrary code to unpickle is an error."""

    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"model": {"w": torch.zeros(1)}, "callback": pickle.Pickler}, f)
    with pytest.raises(ConfigError, match=r"holds objects, not just tensors, and was refused unread") as refused:
        read_checkpoint(path)
    assert "\n" not in str(refused.value) and "Weights only load failed" in refused.value.detail


def test_a_missing_pretrained_file_in_a_run_is_one_line_exit_2(tiny_config, tmp_path, capsys):
    code = main(["run", str(tiny_config), "--out", str(tmp_path / "run"), "--quiet",
                 "--set", "backbone.pretrained=/nowhere/mae.safetensors"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "backbone.pretrained: pretrained weights /nowhere/mae.safetensors do not exist" in err
    assert err.startswith("--set backbone.pretrained=")
    teacher = "backbone.compress.distill={teacher: {name: vit, pretrained: /nowhere/t.pt}}"
    assert main(["check", str(tiny_config), "--set", teacher]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "backbone.compress.distill.teacher.pretrained: pretrained weights /nowhere/t.pt do not exist")


# ----------------------------------------------------------------------------- MAE


def test_patchify_follows_the_token_order():
    encoder = make("vit", 16, in_chans=1, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    mae = MaskedAutoencoder(encoder, 1, MAEOptions())
    index = torch.arange(16.0).reshape(1, 1, 4, 4)
    images = torch.nn.functional.interpolate(index, scale_factor=4, mode="nearest")  # patch i holds value i
    patches = mae.patchify(images)
    assert patches.shape == (1, 16, 16)
    assert torch.equal(patches[0, :, 0], torch.arange(16.0))
    assert torch.all(patches.std(dim=-1) == 0)


def test_masking_keeps_a_quarter_and_the_loss_counts_masked_patches_only():
    encoder = make("vit", 16, in_chans=1, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    mae = MaskedAutoencoder(encoder, 1, MAEOptions(norm_pix_loss=False))
    images = torch.randn(3, 1, 16, 16)
    latent, mask, restore = mae.forward_encoder(images)
    assert latent.shape == (3, 1 + 4, 32)  # class token + 25% of 16 patches
    assert torch.all(mask.sum(dim=1) == 12)
    target = mae.patchify(images)
    prediction = torch.where(mask[..., None].bool(), target, torch.zeros_like(target))
    assert mae.loss(images, prediction, mask) == 0  # visible patches are not scored
    assert not encoder.pos_embed.requires_grad  # MAE's fixed sin-cos embedding


def test_pretrain_mae_loss_falls_and_the_encoder_runs_a_protocol(tiny_config, write_yaml, tmp_path):
    run_config = write_yaml(f"""
        extends: {tiny_config}
        backbone: {{name: vit, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, global_pool: avg}}
        """, "run.yaml")
    mae_config = write_yaml("""
        extends: run.yaml
        mae: {epochs: 12, batch_size: 32, base_lr: 4.0e-3, warmup_epochs: 1, decoder_embed_dim: 32,
              decoder_num_heads: 2}
        """, "mae.yaml")
    out = tmp_path / "mae"
    assert main(["pretrain-mae", str(mae_config), "--out", str(out), "--quiet"]) == 0
    log = json.loads((out / "mae_log.json").read_text())
    losses = log["epoch_loss"]
    assert log["status"] == "complete" and len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    assert len(log["classes"]) == 4  # the protocol's base classes only

    run = tmp_path / "run"
    assert main(["run", str(run_config), "--out", str(run), "--quiet", "--set", "training.epochs=1",
                 "--set", f"backbone.pretrained={out / 'encoder.safetensors'}"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "complete"
    assert metrics["backbone_report"]["pretrained"]["tensors"] == len(
        read_checkpoint(out / "encoder.safetensors"))


def test_pretrain_mae_needs_a_vit(tiny_config, write_yaml, tmp_path, capsys):
    config = write_yaml(f"extends: {tiny_config}\nbackbone: {{name: resnet32, width: 8}}\n", "mae_resnet.yaml")
    assert main(["pretrain-mae", str(config), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("backbone.name: MAE pretraining needs a ViT backbone (vit, timm_vit, vit_dlcl), not 'resnet32'")
    assert err.startswith(str(config))
