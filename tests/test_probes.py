"""Robustness probes: the corruptions against the reference package, the attack and score
maths on models whose answers are known, the state-unchanged guarantee of every probe, and
a digits run with every probe into metrics.json and TensorBoard."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from incremental.cli import main
from incremental.config import Component, load_config, parse_dataclass
from incremental.probes.options import ProbeOptions
from incremental.data import build_dataset
from incremental.models.net import build_model
from incremental.probes.adversarial import band_fractions, dct_energy, dct_matrix
from incremental.probes.attacks import deepfool, pgd
from incremental.probes.base import PixelModel, ProbeData, untouched
from incremental.probes.corruptions import CORRUPTIONS, corrupt, corruption_errors
from incremental.probes.fourier import fourier_basis
from incremental.probes.masking import cutout, patch_drop
from incremental.probes.ood import auroc_fpr95, fpr_at_tpr, to_run_format
from incremental.probes.suite import ProbeSuite
from incremental.protocol import make_class_split
from incremental.registry import PROBES, load_builtins

sys.path.insert(0, str(Path(__file__).parent))
from corruption_reference import load_reference  # noqa: E402

load_builtins("probes", "datasets", "backbones")


# ----------------------------------------------------------------------------- corruptions


def _test_images(n: int, size: int, channels: int = 3) -> torch.Tensor:
    """Smooth gradients, a flat block and mild noise: content every corruption acts on."""
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for i in range(n):
        base = torch.stack([0.5 + 0.3 * torch.sin(2 * (i + 1) * xx + c + 3 * yy) for c in range(channels)])
        base[:, size // 4: size // 2, size // 3: 2 * size // 3] = torch.rand(channels, 1, 1, generator=gen)
        images.append(base + 0.03 * torch.randn(base.shape, generator=gen))
    return (torch.stack(images).clamp(0, 1) * 255).round() / 255  # 8-bit, as the reference works


REFERENCE = load_reference()
# Deterministic corruptions must match pixel by pixel; random ones in distribution.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "jpeg_compression"}


@pytest.mark.skipif(REFERENCE is None, reason="the imagecorruptions package is not installed")
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_matches_the_reference_package(name):
    from PIL import Image

    # fog and frost add one random field per image (a fractal, a frost plate) whose mean
    # varies a lot from image to image: their statistics need more images.
    images = _test_images(60 if name in ("fog", "frost") else 10, 48)
    clean = images.permute(0, 2, 3, 1).numpy()
    as_uint8 = (clean * 255).round().astype(np.uint8)
    for severity in (1, 3, 5):
        np.random.seed(severity)
        reference = np.stack([
            np.asarray(getattr(REFERENCE, name)(Image.fromarray(im) if name in ("jpeg_compression", "pixelate")
                                                 else im, severity), dtype=np.float64) / 255
            for im in as_uint8])
        ours = corrupt(images, name, severity, generator=torch.Generator().manual_seed(severity),
                       parameters="imagenet").permute(0, 2, 3, 1).double().numpy()
        assert ours.shape == reference.shape
        where = f"{name} severity {severity}"
        if name in DETERMINISTIC:
            assert np.abs(ours - reference).mean() < 0.004, where
        # Same strength (mean distance from the clean image) and same statistics.
        change_ref, change_ours = np.abs(reference - clean).mean(), np.abs(ours - clean).mean()
        assert abs(change_ours - change_ref) <= 0.12 * change_ref + 0.004, (where, change_ours, change_ref)
        assert abs(ours.mean() - reference.mean()) < 0.025, (where, ours.mean(), reference.mean())
        spread = 0.2 if name == "frost" else 0.08  # frost: generated textures, not the photographs
        assert abs(ours.std() - reference.std()) <= spread * reference.std(), (where, ours.std(), reference.std())


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_keeps_shape_range_and_grows_with_severity(name):
    for channels in (1, 3):
        images = _test_images(6, 32, channels)
        results = [corrupt(images, name, s, generator=torch.Generator().manual_seed(1)) for s in (1, 5)]
        for out in results:
            assert out.shape == images.shape and out.dtype == torch.float32
            assert float(out.min()) >= 0 and float(out.max()) <= 1
        change = [float((out - images).abs().mean()) for out in results]
        assert min(change) > 0, (name, channels, change)
        if name != "elastic_transform":  # CIFAR-10-C's severity 1 is a pure affine warp, larger than 5's
            assert change[1] > change[0], (name, channels, change)
        again = corrupt(images, name, 5, generator=torch.Generator().manual_seed(1))
        assert torch.equal(again, results[1])  # a seed fixes the corruption


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_on_the_gpu_matches_the_cpu(name):
    images = _test_images(4, 32)
    on_cpu = corrupt(images, name, 3, generator=torch.Generator().manual_seed(2))
    on_gpu = corrupt(images.cuda(), name, 3, generator=torch.Generator().manual_seed(2))
    assert on_gpu.is_cuda
    assert (on_gpu.cpu() - on_cpu).abs().mean() < 1e-3  # the same random draws, float rounding apart


def test_corrupt_rejects_bad_arguments():
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ValueError, match="did you mean 'gaussian_noise'"):
        corrupt(images, "gausian_noise", 1)
    with pytest.raises(ValueError, match="severity must be 1..5"):
        corrupt(images, "fog", 6)
    with pytest.raises(ValueError, match="expected images of shape"):
        corrupt(torch.rand(2, 2, 16, 16), "fog", 1)


def test_corruption_error_is_relative_to_the_reference():
    accuracy = {"fog": [80.0, 60.0], "snow": [90.0, 90.0]}
    reference = {"clean_accuracy": 100.0, "accuracy": {"fog": [60.0, 20.0], "snow": [90.0, 90.0]}}
    errors = corruption_errors(accuracy, clean=100.0, reference=reference)
    assert errors["ce"]["fog"] == pytest.approx(100 * (20 + 40) / (40 + 80))
    assert errors["ce"]["snow"] == pytest.approx(100.0)
    assert errors["mce"] == pytest.approx((50.0 + 100.0) / 2)
    assert corruption_errors(accuracy, 100.0, None)["mce"] is None


# ----------------------------------------------------------------------------- maths


class Linear(nn.Module):
    """logits = W x + b on flattened images: attacks have closed-form answers here."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def test_pgd_stays_in_budget_and_lowers_accuracy():
    gen = torch.Generator().manual_seed(0)
    model = Linear(torch.randn(3, 48, generator=gen), torch.zeros(3))
    images = torch.rand(64, 3, 4, 4, generator=gen) * 0.5 + 0.25
    labels = model(images).argmax(1)
    for norm, eps in (("linf", 0.05), ("l2", 0.3)):
        adversarial = pgd(model, images, labels, eps=eps, norm=norm, steps=10, generator=gen)
        delta = (adversarial - images).flatten(1)
        size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= eps + 1e-5
        assert float(adversarial.min()) >= 0 and float(adversarial.max()) <= 1
        assert (model(adversarial).argmax(1) == labels).float().mean() < 0.9
    assert all(p.grad is None for p in model.parameters())  # only the input is differentiated


def test_deepfool_finds_the_closest_boundary_of_a_linear_model():
    w = torch.zeros(2, 12)
    w[0, 0], w[1, 0] = 1.0, -1.0  # the boundary is x0 = 0.5 (with the bias below)
    model = Linear(w, torch.tensor([-0.5, 0.5]))
    images = torch.full((5, 3, 2, 2), 0.5)
    images[:, 0, 0, 0] = torch.tensor([0.6, 0.7, 0.8, 0.9, 0.55])
    adversarial = deepfool(model, images, overshoot=0.02)
    assert (model(adversarial).argmax(1) == 1).all()
    distance = (adversarial - images).flatten(1).norm(dim=1)
    expected = (images[:, 0, 0, 0] - 0.5) * 1.02  # |f| / ||w|| per unit, with the overshoot
    assert torch.allclose(distance, expected, atol=2e-3)


def test_fourier_basis_is_one_real_unit_frequency():
    basis = fourier_basis(16, 16, row=8 + 3, col=8 - 2)  # fftshifted index of frequency (3, -2)
    assert float(basis.norm()) == pytest.approx(1.0)
    spectrum = torch.fft.fft2(basis).abs()
    peaks = {tuple(i) for i in torch.nonzero(spectrum > 0.5 * spectrum.max()).tolist()}
    assert peaks == {(3, 14), (13, 2)}  # (3, -2) and its mirror (-3, 2)


def test_dct_bands_place_smooth_and_checkerboard_perturbations():
    d = dct_matrix(8)
    assert torch.allclose(d @ d.T, torch.eye(8), atol=1e-5)
    def basis(u: int, v: int) -> torch.Tensor:
        coefficients = torch.zeros(8, 8)
        coefficients[u, v] = 1
        return (d.T @ coefficients @ d).view(1, 1, 8, 8)

    low, high = band_fractions(dct_energy(basis(0, 1))), band_fractions(dct_energy(basis(7, 6)))
    assert low["low"] > 0.99 and high["high"] > 0.99
    assert sum(low.values()) == pytest.approx(1.0)


def test_masks_cover_the_asked_fraction():
    gen = torch.Generator().manual_seed(0)
    images = torch.ones(8, 1, 20, 20)
    holes = (cutout(images, 0.25, gen) == 0).flatten(1).sum(1)
    assert holes.tolist() == [100] * 8  # a 10 x 10 hole in every image
    dropped = (patch_drop(images, 0.25, (4, 4), gen) == 0).flatten(1).sum(1)
    assert dropped.tolist() == [4 * 25] * 8  # 4 of 16 cells of 5 x 5 pixels


def test_auroc_and_fpr95():
    inside = np.linspace(1, 2, 100)
    assert auroc_fpr95(inside, np.linspace(-1, 0, 50)) == (100.0, 0.0)
    auroc, fpr = auroc_fpr95(inside, inside.copy())
    assert auroc == pytest.approx(50.0) and fpr == pytest.approx(95.0)


def test_fpr95_is_the_ood_literatures_definition():
    """Hand-computed cases of Hendrycks et al.'s FPR at the TPR nearest 95%: the threshold is an
    in-distribution score, the lowest with that rate; a percentile would interpolate instead."""
    # 10 in-distribution scores: 90% (k = 9) is nearer 95% than 100% in floating point
    # (0.04999... against 0.05000...), and its lowest threshold lies just above the 10th score 1.0
    ten, outside = np.array([10, 9, 8, 7, 6, 5, 4, 3, 2, 1.0]), np.array([1.2, 1.0, 0.5, 9.5])
    assert fpr_at_tpr(ten, outside) == 0.5  # 1.2 and 9.5 lie above 1.0; 1.0 itself does not
    # 20 scores: 19/20 is 95% exactly; the threshold keeps what lies above the 20th score, 0
    assert fpr_at_tpr(np.arange(20, 0, -1) - 1.0, np.array([0.5, 0.0, -1.0, 3.0])) == 0.5
    # every score kept: the highest threshold with 100% is the lowest score, inclusive
    assert fpr_at_tpr(np.array([3.0, 2.0]), np.array([2.0, 1.0, 2.5, 0.0])) == 0.5
    # ties among in-distribution scores: 2 of 3 (0.67) is not achievable, so 3 of 3 is chosen
    assert fpr_at_tpr(np.array([5.0, 1.0, 1.0]), np.array([1.0, 0.9])) == 0.5
    # np.percentile(inside, 5), the earlier definition, interpolates to 1.45 and keeps only 9.5
    assert float((outside >= np.percentile(ten, 5)).mean()) == 0.25


def test_other_datasets_are_brought_to_the_run_format():
    rgb = torch.rand(2, 3, 32, 32)
    gray = to_run_format(rgb, 16, 1)
    assert gray.shape == (2, 1, 16, 16) and float(gray.max()) <= 1
    assert to_run_format(torch.rand(2, 1, 8, 8), 8, 3).shape == (2, 3, 8, 8)


# ----------------------------------------------------------------------------- probes on a model

SMALL_PROBES = {  # every probe, at sizes that keep a test to seconds
    "corruptions": {"corruptions": ["gaussian_noise", "glass_blur", "fog", "jpeg_compression"], "severities": [1, 5]},
    "masking": {"fractions": [0.1, 0.5]},
    "fourier": {"stride": 4},
    "adversarial": {"linf_eps": [0.03], "l2_eps": [0.5], "steps": 3},
    "dct_spectrum": {"steps": 3, "deepfool_iterations": 5, "deepfool_candidates": 3},
    "ood": {"worst_case": True, "steps": 3, "scores": ["msp", "energy"]},
}


def _spec(name: str, **options) -> Component:
    entry = PROBES.get(name)
    common = {k: options.pop(k) for k in ("num_samples", "batch_size", "every", "label") if k in options}
    return Component(name, parse_dataclass(entry.config_cls, {**SMALL_PROBES[name], **options}),
                     parse_dataclass(ProbeOptions, {"num_samples": 24, "batch_size": 16, **common}))


@pytest.fixture(scope="module")
def digits_setup():
    # The conv stem has batch norms: probing in train mode would move their running statistics.
    cfg, _ = load_config("digits_b0_5steps", ["dataset.image_size=16", "backbone.embed_dim=32", "backbone.depth=1",
                                              "backbone.num_heads=2", "backbone.stem=conv"])
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
    torch.manual_seed(0)
    model = build_model(cfg.backbone, in_chans=1, img_size=16, initial_classes=4)
    return splits, split, model


def test_patch_grid_comes_from_the_token_backbone(digits_setup):
    from incremental.probes.base import patch_grid

    assert patch_grid(digits_setup[2]) == (4, 4)
    assert patch_grid(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("name", sorted(SMALL_PROBES))
def test_probe_leaves_model_modes_and_random_streams_unchanged(name, digits_setup):
    splits, split, model = digits_setup
    suite = ProbeSuite([_spec(name)], ProbeData(splits, split.class_order, split.classes_per_experience, seed=5),
                       num_experiences=split.num_experiences)
    model.train()
    model.head.eval()  # a mix of modes, which must come back as it was
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()

    results = suite.run(model, step=1, device=torch.device("cpu"))

    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state[1]) and random.getstate() == python_state
    summary = results[name]["summary"]
    assert summary and all(np.isfinite(v) for v in summary.values())
    assert results[name]["num_samples"] == 24
    again = suite.run(model, step=1, device=torch.device("cpu"))
    assert again[name]["summary"] == summary  # probes draw from their own seeded stream


def test_untouched_restores_state_after_an_error(digits_setup):
    model = digits_setup[2]
    model.train()
    with pytest.raises(RuntimeError):
        with untouched(model):
            assert not model.training
            raise RuntimeError("probe failed")
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_ood_against_another_dataset(digits_setup):
    splits, split, model = digits_setup
    spec = _spec("ood", worst_case=False)
    spec.config = parse_dataclass(type(spec.config), {"source": "dataset", "dataset": {
        "name": "synthetic", "num_classes": 4, "image_size": 24, "channels": 3}})
    suite = ProbeSuite([spec], ProbeData(splits, split.class_order, split.classes_per_experience, seed=5),
                       num_experiences=split.num_experiences)
    result = suite.run(digits_setup[2], step=4, device=torch.device("cpu"))["ood"]  # the last step has no future
    assert result["source"] == "dataset" and result["num_ood"] == 24
    assert 0 <= result["summary"]["auroc/msp"] <= 100


def test_pixel_model_undoes_the_normalisation(digits_setup):
    splits, split, model = digits_setup
    data = ProbeData(splits, split.class_order, split.classes_per_experience, seed=0)
    images, labels = data.load(data.indices(0, 8), torch.device("cpu"))
    assert float(images.min()) >= 0 and float(images.max()) <= 1 and (labels < 2).all()
    normalised = torch.stack([splits.eval_transform(data.test[int(i)][0]) for i in data.indices(0, 8)])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(PixelModel(model, splits.mean, splits.std)(images), model(normalised), atol=1e-5)


# ----------------------------------------------------------------------------- configs

ALL_PROBES_RUN = """
extends: {tiny}
training: {{epochs: 2}}
probes:
  - {{name: corruptions, num_samples: 16, corruptions: [gaussian_noise, frost, pixelate], severities: [2, 4]}}
  - {{name: masking, num_samples: 16}}
  - {{name: fourier, num_samples: 8, stride: 4}}
  - {{name: adversarial, num_samples: 16, steps: 2, linf_eps: [0.03], l2_eps: [0.5]}}
  - {{name: dct_spectrum, num_samples: 8, steps: 2, deepfool_iterations: 3, deepfool_candidates: 3}}
  - {{name: ood, num_samples: 16, worst_case: true, steps: 2, every: 2}}
"""


@pytest.mark.parametrize("override, key, message", [
    ("probes=[corrupsions]", "probes.0.name", "did you mean 'corruptions'"),
    ("probes=[{name: corruptions, corruptions: [fog, sonw]}]", "probes.0.corruptions.1", "did you mean 'snow'"),
    ("probes=[{name: corruptions, severities: [6]}]", "probes.0.severities.0", "must be <= 5, got 6"),
    ("probes=[{name: masking, fractions: [1.5]}]", "probes.0.fractions.0", "must be < 1, got 1.5"),
    ("probes=[masking, masking]", "probes.1.label", "listed twice"),
    ("probes=[{name: ood, source: dataset}]", "probes.0.dataset", "needs a 'dataset' section"),
    ("probes=[{name: ood, num_sample: 3}]", "probes.0.num_sample", "did you mean 'num_samples'"),
    ("probes=[{name: fourier, eps: -1}]", "probes.0.eps", "must be > 0"),
])
def test_probe_config_errors_name_the_key(override, key, message, tiny_config, capsys):
    assert main(["check", str(tiny_config), "--no-data", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{key}: " in err and message in err and "Traceback" not in err


def test_missing_reference_run_and_ood_dataset_folder_are_one_line_errors(tiny_config, tmp_path, capsys):
    for override, key in ((f"probes=[{{name: corruptions, reference: {tmp_path / 'nope'}}}]", "probes.0.reference"),
                          (f"probes=[{{name: ood, source: dataset, dataset: {{name: cifar100, root: {tmp_path}}}}}]",
                           "probes.0.dataset.root")):
        assert main(["run", str(tiny_config), "--quiet", "--out", str(tmp_path / "run"), "--set", override]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{key}: " in err, err


# ----------------------------------------------------------------------------- end to end


def test_digits_run_with_every_probe_writes_metrics_tensorboard_and_reprobes(write_yaml, tiny_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_yaml(ALL_PROBES_RUN.format(tiny=tiny_config), "all.yaml")
    run_dir = tmp_path / "run"
    assert main(["run", str(config), "--quiet", "--out", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    steps = metrics["num_experiences"]
    assert set(metrics["probes"]) == set(SMALL_PROBES)
    for label, per_step in metrics["probes"].items():
        assert len(per_step) == steps
        if label == "ood":  # every: 2 -> after experiences 1 and 2 (the last); step 2 has no future classes
            assert per_step[0] is None and per_step[1]["summary"]["worst_auroc/msp"] <= 100
            assert per_step[2]["skipped"]
        else:
            assert all(result["summary"] and result["time_s"] > 0 for result in per_step)
    assert all(w["probes"] > 0 for w in metrics["wall_time_s"])
    masking_clean = [r["summary"]["clean_accuracy"] for r in metrics["probes"]["masking"]]
    assert masking_clean == [r["summary"]["clean_accuracy"] for r in metrics["probes"]["corruptions"]]

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    mean_corrupted = events.Scalars("probes/corruptions/mean_accuracy")
    assert [e.step for e in mean_corrupted] == list(range(steps))
    assert [e.value for e in mean_corrupted] == pytest.approx(
        [r["summary"]["mean_accuracy"] for r in metrics["probes"]["corruptions"]])
    images = set(events.Tags()["images"])
    assert {"probes/fourier/error_map", "probes/corruptions/accuracy", "probes/dct_spectrum/pgd_energy",
            "probes/dct_spectrum/deepfool_energy"} <= images
    assert [e.step for e in events.Images("probes/fourier/error_map")] == list(range(steps))

    # Probing the saved model again gives the run's own numbers at its last step, and a
    # corruptions probe referenced to the run itself has a corruption error of exactly 100.
    out = tmp_path / "again.json"
    first = metrics["probes"]["corruptions"][0]
    assert main(["probe", str(run_dir), "--quiet", "--out", str(out), "--set",
                 "probes=[{name: corruptions, num_samples: 16, corruptions: [gaussian_noise, frost, pixelate], "
                 f"severities: [2, 4], reference: {run_dir}}}, {{name: masking, num_samples: 16}}]"]) == 0
    again = json.loads(out.read_text())
    assert again["experience"] == steps - 1
    assert again["probes"]["masking"]["summary"] == metrics["probes"]["masking"][-1]["summary"]
    assert again["probes"]["corruptions"]["accuracy"] == metrics["probes"]["corruptions"][-1]["accuracy"]
    assert again["probes"]["corruptions"]["mce"] == pytest.approx(100.0)
    assert (tmp_path / "again-corruptions-accuracy.png").is_file()
    assert first["summary"]["clean_accuracy"] >= 0


def test_probes_do_not_change_training(tiny_config, tmp_path):
    """The same seed with and without probes gives the same losses and accuracy matrix."""
    common = ["--quiet", "--set", "training.epochs=2", "--set", "output.tensorboard=false"]
    probes = "probes=[{name: masking, num_samples: 16}, {name: ood, num_samples: 16, worst_case: true, steps: 2}]"
    assert main(["run", str(tiny_config), "--out", str(tmp_path / "plain"), *common]) == 0
    assert main(["run", str(tiny_config), "--out", str(tmp_path / "probed"), *common, "--set", probes]) == 0
    plain, probed = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("plain", "probed"))
    assert probed["probes"]["masking"][-1]["summary"] and not plain["probes"]
    for key in ("accuracy_matrix", "train_loss_per_epoch", "prediction_matrix"):
        assert probed[key] == plain[key], key
    from safetensors.torch import load_file

    weights = [load_file(str(tmp_path / name / "model.safetensors")) for name in ("plain", "probed")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # running statistics included


def test_probe_command_errors(tmp_path, tiny_config, capsys):
    assert main(["probe", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    assert main(["run", str(tiny_config), "--quiet", "--out", str(run_dir), "--set", "training.epochs=1",
                 "--set", "protocol.increment=6"]) == 0
    capsys.readouterr()
    # no probes in the run and none named: the default suite, said in one line; the OOD probe
    # after the last experience has no unseen classes, and its line says so
    assert main(["probe", str(run_dir), "--out", str(tmp_path / "default.json"), "--set", "training.device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "the run lists no probes: the default suite (corruptions, masking, ood)" in out
    assert "probe ood: skipped: no unseen classes left to serve as OOD data" in out
    assert set(json.loads((tmp_path / "default.json").read_text())["probes"]) == {"corruptions", "masking", "ood"}
    assert main(["probe", str(run_dir), "--set", "probes=[masking]", "--out", str(tmp_path / "no" / "p.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("--out: cannot write") and "is not a folder" in err and len(err.splitlines()) == 1
    (run_dir / "model.safetensors").write_bytes(b"not a model")
    assert main(["probe", str(run_dir), "--set", "probes=[masking]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "RUN_DIR: " in err and "is not a model saved by" in err and len(err.splitlines()) == 1


SMALL_DETERMINISTIC = ("defocus_blur", "zoom_blur", "contrast", "brightness", "pixelate", "jpeg_compression")


@pytest.mark.skipif(REFERENCE is None, reason="the imagecorruptions package is not installed")
@pytest.mark.parametrize("table, size", [("cifar", 32), ("tiny", 64)])
@pytest.mark.parametrize("name", [*SMALL_DETERMINISTIC, "fog"])
def test_small_image_corruptions_match_their_reference_scripts(table, size, name):
    """CIFAR-10-C at 32 px and Tiny-ImageNet-C at 64 px against make_cifar_c.py's and
    make_tinyimagenet_c.py's functions (tests/small_c_reference.py), on the same images and
    with the same tables: deterministic ones pixel by pixel, fog in strength and spread (its
    fractal is made at the image's own size: made at 256 and cropped, it was 3.6x flatter)."""
    from incremental.probes.corruptions import TABLES

    from small_c_reference import reference_functions

    reference_fn = reference_functions(REFERENCE)[name]
    images = _test_images(60 if name == "fog" else 8, size)
    clean = images.permute(0, 2, 3, 1).numpy()
    as_uint8 = (clean * 255).round().astype(np.uint8)
    for severity in (1, 3, 5):
        np.random.seed(severity)
        c = TABLES[table][name][severity - 1]
        reference = np.stack([reference_fn(im, c, size) for im in as_uint8]) / 255
        ours = corrupt(images, name, severity, generator=torch.Generator().manual_seed(severity),
                       parameters=table).permute(0, 2, 3, 1).double().numpy()
        where = f"{table} {name} severity {severity}"
        if name in SMALL_DETERMINISTIC:
            assert np.abs(ours - reference).mean() < 0.004, where
        else:
            # the fog layer's texture: the spread of each image's change around its own mean
            def texture(out: np.ndarray) -> float:
                change = (out - clean).mean(axis=3)
                return float((change - change.mean(axis=(1, 2), keepdims=True)).std(axis=(1, 2)).mean())

            assert abs(texture(ours) - texture(reference)) <= 0.2 * texture(reference), \
                (where, texture(ours), texture(reference))
            change_ref, change_ours = np.abs(reference - clean).mean(), np.abs(ours - clean).mean()
            assert abs(change_ours - change_ref) <= 0.15 * change_ref + 0.004, (where, change_ours, change_ref)


def test_auto_tables_follow_the_image_size():
    from incremental.probes.corruptions import table_name

    assert [table_name(s) for s in (16, 32, 48, 64, 96, 224)] == ["cifar", "cifar", "tiny", "tiny", "imagenet",
                                                                  "imagenet"]


def test_every_probe_records_the_parameters_it_ran_with(digits_setup):
    splits, split, model = digits_setup
    suite = ProbeSuite([_spec(name) for name in sorted(SMALL_PROBES)],
                       ProbeData(splits, split.class_order, split.classes_per_experience, seed=5),
                       num_experiences=split.num_experiences)
    results = suite.run(model, step=1, device=torch.device("cpu"))
    assert results["fourier"]["parameters"]["eps"] == 4.0  # resolved from null at 16 px
    assert results["corruptions"]["parameters"]["parameters"] == "cifar"
    assert results["adversarial"]["parameters"]["step_size"]["linf/0.03"] == pytest.approx(2.5 * 0.03 / 3)
    assert results["ood"]["parameters"]["steps"] == 3 and results["ood"]["parameters"]["attack"] == "pgd"
    assert results["masking"]["parameters"]["fractions"] == [0.1, 0.5]


@pytest.mark.parametrize("name", sorted(SMALL_PROBES))
def test_each_probe_bar_has_the_total_it_runs(name, digits_setup):
    """A probe's bar counts the batches it runs through the network against the total it declares
    beforehand: equal, except DeepFool, which stops early once every image is misclassified."""
    splits, split, model = digits_setup
    specs = [_spec(name, num_samples=21, batch_size=8)]  # 3 batches, the last of 5
    if name == "masking":
        specs.append(_spec("masking", patch_drop=False, label="no_drop", num_samples=21, batch_size=8))
    suite = ProbeSuite(specs, ProbeData(splits, split.class_order, split.classes_per_experience, seed=5),
                       num_experiences=split.num_experiences)
    suite.run(model, step=1, device=torch.device("cpu"))
    for label, (done, planned) in suite.last_passes.items():
        assert planned > 0
        if name == "dct_spectrum":
            assert 0 < done <= planned
        else:
            assert done == planned, (label, done, planned)
