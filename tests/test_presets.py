"""Reference presets: a preset fills in the keys the config leaves out, and each one does what
its reference does (DyTox's balanced finetuning, the adversarial-training OOD evaluation);
every probe records the exact parameters it ran with."""

from __future__ import annotations

import pytest
import torch

from incremental.config import dump_yaml, load_config, parse_dataclass
from incremental.errors import ConfigError
from incremental.strategies.options import BalancedFinetuningConfig, DistillationConfig, ViTILConfig


def test_a_preset_fills_what_the_config_leaves_out():
    dytox = parse_dataclass(BalancedFinetuningConfig, {"preset": "dytox"})
    assert (dytox.params, dytox.schedule, dytox.epochs, dytox.lr_scale) == ("frozen_encoder", "constant", 20, 0.1)
    mine = parse_dataclass(BalancedFinetuningConfig, {"preset": "dytox", "epochs": 5})
    assert (mine.epochs, mine.params) == (5, "frozen_encoder")  # an explicit key wins
    assert parse_dataclass(DistillationConfig, {"preset": "pycil"}).weight == 0.25
    with pytest.raises(ConfigError, match=r"unknown preset 'dytx' \(did you mean 'dytox'\?\)") as info:
        parse_dataclass(ViTILConfig, {"balanced_finetuning": {"preset": "dytx"}})
    assert info.value.key == "balanced_finetuning.preset"


def test_a_resolved_preset_reads_back_the_same(write_yaml):
    config = write_yaml("extends: digits_b0_5steps\nstrategy: {name: vitil, balanced_finetuning: {preset: dytox}}\n")
    cfg, _ = load_config(str(config))
    again = write_yaml(dump_yaml(cfg), "resolved.yaml")
    assert load_config(str(again))[0] == cfg


def test_dytox_finetuning_freezes_the_encoder_in_eval_mode_and_keeps_the_lr():
    """freeze_ft [sab]: patch embedding (a conv stem here, with batch norms), position
    embedding and all blocks but the last are bit-identical afterwards, batch-norm statistics
    included (eval mode); the last block, the class token and the head train."""
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset

    from incremental.config import Component, OptimizerConfig, SchedulerConfig
    from incremental.training.finetune import balanced_finetune
    from incremental.models.net import build_model
    from incremental.models.options import ViTConfig
    from incremental.training.optim import lr_factor

    torch.manual_seed(0)
    spec = Component("vit", ViTConfig(patch_size=4, embed_dim=32, depth=3, num_heads=2, stem="conv",
                                      drop_path_rate=0.0), None)
    model = build_model(spec, in_chans=1, img_size=16, initial_classes=4)
    model.head.active_units[:] = 1  # as Avalanche's adaptation marks the units of trained classes
    data = torch.utils.data.TensorDataset(torch.randn(40, 1, 16, 16), torch.arange(40) % 4)
    dataset = _make_taskaware_classification_dataset(data, targets=(torch.arange(40) % 4).tolist(), task_labels=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    balanced_finetune(model, dataset, epochs=2, lr=1e-2, batch_size=8, params="frozen_encoder", schedule="constant",
                      optimizer=OptimizerConfig(), device="cpu", seed=0)
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("backbone.patch_embed.", "backbone.blocks.0.", "backbone.blocks.1."))
              or k == "backbone.pos_embed"]
    assert any("running_mean" in k for k in frozen)  # the conv stem's batch norms are among them
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    for trained in ("backbone.blocks.2.attn.qkv.weight", "backbone.cls_token", "head.classifier.weight"):
        assert not torch.equal(before[trained], after[trained]), trained
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards
    constant = [lr_factor(SchedulerConfig(name="constant"), iteration=i, iters_per_epoch=5, epochs=2) for i in range(10)]
    assert constant == [1.0] * 10


def test_frozen_encoder_needs_a_vit(write_yaml, capsys):
    from incremental.cli import main

    config = write_yaml("extends: digits_b0_5steps\nbackbone: {name: resnet32}\n"
                        "strategy: {name: vitil, balanced_finetuning: {preset: dytox}}\n")
    assert main(["run", str(config), "--quiet", "--out", str(config.parent / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "strategy.balanced_finetuning.params: frozen_encoder (DyTox's freeze_ft [sab]) needs a ViT" in err


def test_the_at_ebm_preset_runs_torchattacks_apgd_and_records_it():
    """APGD-CE, L2, eps 1.0, 100 iterations, 5 restarts on the OOD images; what it ran with is
    in the result. Its attacked OOD images stay within the L2 ball and score higher."""
    pytest.importorskip("torchattacks")
    from torch import nn

    from incremental.probes.attacks import apgd_score
    from incremental.probes.options import OodConfig

    cfg = parse_dataclass(OodConfig, {"preset": "at_ebm"})
    assert (cfg.attack, cfg.norm, cfg.eps, cfg.steps, cfg.restarts, cfg.worst_case) == ("apgd_ce", "l2", 1.0, 100, 5,
                                                                                         True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()
    images = torch.rand(12, 3, 8, 8)
    score = lambda logits: logits.max(1).values  # noqa: E731
    attacked = apgd_score(model, images, score=score, eps=cfg.eps, norm=cfg.norm, steps=cfg.steps,
                          restarts=cfg.restarts, seed=0)
    assert float((attacked - images).flatten(1).norm(dim=1).max()) <= 1.0 + 1e-4
    assert float(attacked.min()) >= 0 and float(attacked.max()) <= 1
    with torch.no_grad():
        assert (score(model(attacked)) > score(model(images))).all()
