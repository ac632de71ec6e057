"""experiments/crosscheck/reference.py without a reference checkout: it says what it needs in
one line (the side-by-side runs themselves need LAMDA-PILOT, which the tests do not fetch), and
the data it serves PILOT's learners is the toolkit's, in the toolkit's class order."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from conftest import script_in_fork

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "crosscheck" / "reference.py"


def test_without_a_reference_checkout_it_says_what_it_needs(tmp_path):
    err = tmp_path / "stderr"
    assert script_in_fork(SCRIPT, stderr=err) == 2
    assert "--pilot-root must name a checkout of LAMDA-PILOT" in err.read_text()
    assert script_in_fork(SCRIPT, "--pilot-root", str(tmp_path), stderr=err) == 2
    assert script_in_fork(SCRIPT, "--methods", "proof", stderr=err) == 2
    assert "--proof-root must name a checkout of PROOF" in err.read_text()
    assert script_in_fork(SCRIPT, "--methods", "dsal", stderr=err) == 2
    assert "--acl-root must name a checkout of Analytic-continual-learning" in err.read_text()
    assert script_in_fork(SCRIPT, "--methods", "inflora", stderr=err) == 2
    assert "--inflora-root must name a checkout of InfLoRA" in err.read_text()


def test_the_analytic_references_buffer_is_the_toolkits_run_s(tmp_path):
    """The reference's random buffer gets the expansion the toolkit's run saved in its checkpoint."""
    sys.path.insert(0, str(SCRIPT.parent))
    from analytic_references import expansion_of

    expansion = torch.randn(6, 4, dtype=torch.float64)
    torch.save({"plugins": [None, {"expansion": expansion, "streams": []}]}, tmp_path / "checkpoint.pt")
    assert torch.equal(expansion_of(tmp_path), expansion)


def test_exemplars_come_back_as_the_reference_stores_them():
    """PILOT's and PROOF's learners keep exemplars as image arrays and labels (``appendent``)."""
    sys.path.insert(0, str(SCRIPT.parent))
    import reference
    from clip_references import ProofData

    manager = reference.DigitsManager(1993)
    images, labels, _ = manager.get_dataset(np.arange(0, 1), source="train", mode="test", ret_data=True)
    memory = manager.get_dataset([], source="train", mode="test", appendent=(images[:3], labels[:3]))
    assert len(memory) == 3 and memory.labels.tolist() == [0, 0, 0]
    torch.testing.assert_close(memory[2][1], torch.from_numpy(images[2]))
    mixed = manager.get_dataset(np.arange(1, 2), source="train", mode="train", appendent=(images[:3], labels[:3]))
    assert sorted(set(mixed.labels.tolist())) == [0, 1] and (mixed.labels == 0).sum() == 3
    rgb = ProofData(manager, ["a photo of a {}."]).get_dataset(np.arange(0, 1), source="test", mode="test")
    grey = manager.get_dataset(np.arange(0, 1), source="test", mode="test")
    assert rgb[0][1].shape[0] == 3 and torch.equal(rgb[0][1], grey[0][1].expand(3, -1, -1))


def test_each_checkout_imports_its_own_packages(tmp_path):
    """PILOT and PROOF both have top-level ``models`` and ``utils``: switching checkouts must not
    leave the other one's modules in the import cache."""
    sys.path.insert(0, str(SCRIPT.parent))
    from clip_references import use_checkout

    for name in ("first", "second"):
        (tmp_path / name / "utils").mkdir(parents=True)
        (tmp_path / name / "utils" / "__init__.py").write_text(f"CHECKOUT = {name!r}\n")
    try:
        for name in ("first", "second", "first"):
            use_checkout(tmp_path / name)
            import utils

            assert utils.CHECKOUT == name
    finally:
        for name in ("first", "second"):
            if str((tmp_path / name).resolve()) in sys.path:
                sys.path.remove(str((tmp_path / name).resolve()))
        sys.modules.pop("utils", None)


def test_pilots_data_are_the_toolkits_digits_in_its_class_order():
    sys.path.insert(0, str(SCRIPT.parent))
    import reference

    from incremental.config import load_config
    from incremental.data import build_dataset
    from incremental.protocol import make_class_split

    manager = reference.DigitsManager(1994)
    cfg, _ = load_config("digits_b0_5steps", ["seed=1994", "protocol.order_seed=1994"])
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    order = make_class_split(cfg.protocol, 10, 1994).class_order
    assert [manager.get_task_size(t) for t in range(manager.nb_tasks)] == [2] * 5
    first = manager.get_dataset(np.arange(0, 2), source="test", mode="test")
    expected = [i for i, t in enumerate(splits.test.targets) if int(t) == order[0]]
    expected += [i for i, t in enumerate(splits.test.targets) if int(t) == order[1]]
    # class by class, as PILOT's DataManager serves test images (its batchwise prompts read that)
    assert first.labels.tolist() == [0] * first.labels.tolist().count(0) + [1] * first.labels.tolist().count(1)
    assert len(first) == len(expected) and set(first.labels.tolist()) == {0, 1}
    last_index, last_image, last_label = first[len(first) - 1]
    torch.testing.assert_close(last_image, splits.eval_transform(splits.test[expected[-1]][0]))
    assert order[last_label] == int(splits.test.targets[expected[-1]])
    index, image, label = first[0]
    torch.testing.assert_close(image, splits.eval_transform(splits.test[expected[0]][0]))
    assert order[label] == int(splits.test.targets[expected[0]])


def test_each_command_rewrites_only_the_sections_it_covers(tmp_path):
    """reference.md holds one section per command, its markers naming its methods: a command
    replaces the sections whose methods it covers and adds its own otherwise, keeping the others
    and the hand-written reading."""
    sys.path.insert(0, str(SCRIPT.parent))
    import reference

    def body(group: str, methods: str, rows: str) -> str:
        return f"<!-- begin {group}: {methods} -->\n{rows}\n<!-- end {group} -->"

    path = tmp_path / "reference.md"
    path.write_text(f"# title\n\n{body('pilot', 'simplecil ranpac_frozen', 'old rows')}\n\n## Reading\n\nkept words\n")
    reference.write_sections(path, [body("clip", "proof", "PROOF rows")])
    reference.write_sections(path, [body("pilot", "aper_adapter", "APER rows")])
    text = path.read_text()
    assert text.index("old rows") < text.index("PROOF rows") < text.index("APER rows") < text.index("kept words")
    reference.write_sections(path, [body("pilot", "simplecil ranpac_frozen aper_adapter", "all rows")])
    text = path.read_text()
    assert "all rows" in text and "old rows" not in text and "APER rows" not in text and "PROOF rows" in text
    assert text.count("<!-- begin") == 2 and text.index("all rows") < text.index("PROOF rows")
    assert reference.group_of("ranpac_frozen") == "pilot" and reference.group_of("proof") == "clip"


def test_codas_prompt_loss_starts_as_it_does_on_a_gpu():
    """PILOT's CODA ViT adds to ``torch.zeros((1,), requires_grad=True).to(device)`` in place: on a
    GPU a copy, on the CPU the leaf itself, where the add fails. The harness's stand-in gives the
    copy, so the loss sums and its gradient reaches what was added."""
    sys.path.insert(0, str(SCRIPT.parent))
    from pilot_models import TorchAsOnAGPU

    weight = torch.tensor([2.0], requires_grad=True)
    with np.testing.assert_raises(RuntimeError):  # torch's own on the CPU
        torch.zeros((1,), requires_grad=True).to(device="cpu").add_(weight * 3)
    loss = TorchAsOnAGPU().zeros((1,), requires_grad=True).to(device="cpu")
    loss += weight * 3
    loss.sum().backward()
    assert loss.item() == 6.0 and weight.grad.item() == 3.0
    assert TorchAsOnAGPU().zeros(2).is_leaf and TorchAsOnAGPU().float32 is torch.float32


def test_the_fused_qkv_splits_as_pilots_adapter_vits_read_it():
    """``split_qkv``: q, k and v projections that reproduce timm's fused one, and the MLP's fc*."""
    import timm

    sys.path.insert(0, str(SCRIPT.parent))
    from pilot_models import split_qkv

    vit = timm.models.vision_transformer.VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1,
                                                           num_heads=2, num_classes=0)
    state = split_qkv(vit.state_dict())
    x = torch.randn(3, 5, 16)
    fused = vit.blocks[0].attn.qkv(x)
    parts = [x @ state[f"blocks.0.attn.{p}_proj.weight"].T + state[f"blocks.0.attn.{p}_proj.bias"] for p in "qkv"]
    torch.testing.assert_close(torch.cat(parts, dim=-1), fused)
    assert "blocks.0.fc1.weight" in state and not any(".qkv." in k or ".mlp." in k for k in state)


def test_pilots_coda_gets_the_toolkits_batches_and_schedule_when_asked():
    """codaprompt_reference_toolkit_schedule: PILOT's loader keeps the last partial batch, and
    the LR before each step is the toolkit's half-cosine over the task's iterations (written
    here from its definition), with PILOT's own per-epoch scheduler off."""
    import math
    import types

    import pytest

    sys.path.insert(0, str(SCRIPT.parent))
    import reference

    kept = reference.in_process_loader(list(range(5)), batch_size=2, drop_last=True, num_workers=4, keep_last=True)
    assert len(kept) == 3 and kept.num_workers == 0
    assert len(reference.in_process_loader(list(range(5)), batch_size=2, drop_last=True)) == 2  # PILOT's own drop
    weight = torch.nn.Parameter(torch.zeros(1))
    learner = types.SimpleNamespace(get_optimizer=lambda: torch.optim.Adam([weight], lr=0.1),
                                    train_loader=[None] * 3, args={"tuned_epoch": 2})
    reference.toolkit_schedule(learner)
    optimizer = learner.get_optimizer()
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones(1)
        optimizer.step()
    assert rates == pytest.approx([0.1 * 0.5 * (1 + math.cos(math.pi * i / 6)) for i in range(6)])
    assert learner.get_scheduler(optimizer) is None


def test_infloras_reference_gets_the_toolkits_schedule_when_asked():
    """In place of InfLoRA's per-epoch quarter cosine: after every optimizer step the LR is the
    toolkit's half-cosine at that iteration, written from its definition; the per-epoch step
    does nothing."""
    import math
    from types import SimpleNamespace

    sys.path.insert(0, str(SCRIPT.parent))
    from inflora_reference import ToolkitCosine

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([weight], lr=0.5)
    schedule = ToolkitCosine(SimpleNamespace(train_loader=[0, 1, 2]), optimizer, K=4)
    seen = []
    for step in range(12):
        optimizer.zero_grad()
        weight.sum().backward()
        optimizer.step()
        if step % 3 == 2:
            schedule.step()
        seen.append(optimizer.param_groups[0]["lr"])
    expected = [0.5 * 0.5 * (1 + math.cos(math.pi * (k + 1) / 12)) for k in range(12)]
    assert all(math.isclose(a, b, abs_tol=1e-12) for a, b in zip(seen, expected))
