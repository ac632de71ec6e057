"""Generative replay: the GAN's parts, the generated batches the classifier sees, and runs
where replay is off (bit-identical to finetune) or on (a different run)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from incremental.cli import main
from incremental.config import load_config
from incremental.data import build_dataset
from incremental.memory.gan import (Generator, ProjectionDiscriminator, diff_augment, frechet_distance,
                                    generator_bytes, round_to_storage, widest_generator)
from incremental.protocol import build_benchmark, make_class_split
from incremental.strategy import StrategyContext, build_strategy

GAN_RUN = """
name: gan
seed: 4
dataset: {name: digits, image_size: 16}
protocol: {initial_classes: 4, increment: 3, memory: {bytes: 60000}}
backbone: {name: resnet32, width: 4}  # the smallest: these tests are about the GAN memory
strategy: {name: gan_replay, steps: 4, batch_size: 8, quality_samples: 4, grid_samples: 2}
training: {epochs: 1, batch_size: 32}
output: {tensorboard: false}
"""


@pytest.fixture
def plugin(write_yaml):
    """A gan_replay plugin built as a run builds it (real config, dataset, benchmark)."""
    cfg, _ = load_config(str(write_yaml(GAN_RUN)), [])
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
    context = StrategyContext(config=cfg, class_split=split, benchmark=build_benchmark(splits, split), device="cpu",
                              splits=splits)
    (built,) = build_strategy(context, torch.nn.Identity())
    return built


def test_the_generator_is_the_widest_that_fits_the_budget(plugin):
    shape = {"num_classes": 10, "channels": 1, "image_size": 16, "z_dim": 32}
    width = widest_generator(60000, storage="float32", **shape)
    assert plugin.generator.first_width == 2 * width and plugin.bytes <= 60000
    wider = Generator(width=width + 2, **shape)
    assert generator_bytes(wider, "float32") > 60000 or width == 128
    assert widest_generator(10 ** 9, storage="float32", max_width=16, **shape) == 16  # the cap on the search
    # the bytes are those of the tensors the checkpoint keeps
    kept = {k: v for k, v in plugin.state_dict()["generator"].items() if not k.endswith("num_batches_tracked")}
    assert sum(v.numel() * v.element_size() for v in kept.values()) == plugin.bytes


def test_generated_batches_have_the_requested_labels_shapes_and_normalisation(plugin):
    plugin.old = [0, 2, 3]
    plugin.replay_rng.manual_seed(0)
    x, y = plugin.generated_batch(50, "cpu")
    assert x.shape == (50, 1, 16, 16) and y.shape == (50,) and y.dtype == torch.long
    assert set(y.tolist()) <= {0, 2, 3} and len(set(y.tolist())) == 3
    assert x.min() >= -1.0 and x.max() <= 1.0  # digits normalise with mean 0.5, std 0.5
    # the images are those of the generator for these labels (its own stream, eval mode)
    plugin.replay_rng.manual_seed(0)
    x_again, y_again = plugin.generated_batch(50, "cpu")
    assert torch.equal(x, x_again) and torch.equal(y, y_again)


def test_solver_labels_are_the_previous_models_argmax_over_the_old_classes(plugin):
    """labels: solver (DGR): the same generated images, each labelled by the previous model's
    prediction among the old classes (a larger logit of a class outside them does not count)."""
    plugin.old = [0, 2, 3]
    plugin.replay_rng.manual_seed(0)
    x, conditioned = plugin.generated_batch(40, "cpu")

    class Solver(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(len(images), 10)
            logits[:, 5] = 100.0  # a new class: never a replay label
            logits[:, 2] = images.mean(dim=(1, 2, 3))  # old classes 2 and 3 compete per image
            logits[:, 3] = -images.mean(dim=(1, 2, 3))
            return logits

    plugin.solver = Solver()
    plugin.replay_rng.manual_seed(0)
    x_again, labels = plugin.generated_batch(40, "cpu")
    assert torch.equal(x_again, x)
    expected = torch.where(x.mean(dim=(1, 2, 3)) > 0, 2, 3)
    assert torch.equal(labels, expected) and not torch.equal(labels, conditioned)


def test_a_run_with_solver_labels_keeps_the_previous_model_as_its_labeller(write_yaml, tmp_path):
    """The previous model labels the generated samples from experience 1 on: the run completes
    and trains elsewhere than with the generator's conditions."""
    solver, solver_weights = _run(write_yaml, tmp_path, "solver", "strategy.labels=solver")
    condition, condition_weights = _run(write_yaml, tmp_path, "condition")
    assert solver["status"] == "complete"
    assert any(not torch.equal(solver_weights[k], condition_weights[k]) for k in condition_weights)


@pytest.mark.parametrize("ratio, added", [(0.5, 8), (0.75, 24), (0.0, 0)])
def test_each_training_batch_gets_the_configured_share_of_generated_samples(plugin, ratio, added):
    plugin.config.mix_ratio = ratio
    plugin.old = [1]
    x, y, t = torch.zeros(8, 1, 16, 16), torch.full((8,), 5), torch.zeros(8, dtype=torch.long)
    strategy = SimpleNamespace(mbatch=[x, y, t])
    plugin.before_training_iteration(strategy)
    new_x, new_y, new_t = strategy.mbatch
    assert len(new_x) == len(new_y) == len(new_t) == 8 + added
    assert torch.equal(new_x[:8], x) and torch.equal(new_y[:8], y)
    assert (new_y[8:] == 1).all() and (new_t[8:] == 0).all()
    if added:
        assert added / len(new_x) == pytest.approx(ratio)


def test_nothing_is_generated_before_there_are_old_classes(plugin):
    plugin.old = []
    batch = [torch.zeros(8, 1, 16, 16), torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)]
    strategy = SimpleNamespace(mbatch=list(batch))
    plugin.before_training_iteration(strategy)
    assert all(a is b for a, b in zip(strategy.mbatch, batch))


def test_projection_discriminator_and_diffaugment_are_differentiable():
    torch.manual_seed(0)
    d = ProjectionDiscriminator(num_classes=5, channels=3, image_size=16, width=8)
    x = torch.rand(6, 3, 16, 16, requires_grad=True)
    out = d(diff_augment(x), torch.arange(6) % 5)
    assert out.shape == (6,)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the projection term: swapping a label changes the score by <embed(y') - embed(y), h>
    d.eval()  # spectral norm's power iteration then stops, so every call uses the same weights
    with torch.no_grad():
        h = d.features(x).sum(dim=(2, 3))
        a, b = d(x, torch.zeros(6, dtype=torch.long)), d(x, torch.ones(6, dtype=torch.long))
        expected = ((d.embed(torch.ones(6, dtype=torch.long)) - d.embed(torch.zeros(6, dtype=torch.long))) * h).sum(1)
    assert torch.allclose(b - a, expected, atol=1e-5)


def test_float16_storage_rounds_every_weight_and_halves_the_bytes():
    g = Generator(num_classes=3, channels=1, image_size=8, width=4, z_dim=4)
    assert generator_bytes(g, "float16") * 2 == generator_bytes(g, "float32")
    round_to_storage(g, "float16")
    for p in g.parameters():
        assert torch.equal(p, p.half().float())


def test_the_fixed_frechet_space_is_the_images_pooled_to_8_by_8():
    from incremental.memory.gan import PooledPixels

    images = torch.rand(3, 1, 32, 32)
    features = PooledPixels(8).forward_head(PooledPixels(8).forward_features(images), pre_logits=True)
    expected = images.reshape(3, 1, 8, 4, 8, 4).mean(dim=(3, 5)).flatten(1)
    assert features.shape == (3, 64) and torch.allclose(features, expected, atol=1e-6)
    assert not list(PooledPixels(8).parameters())  # nothing in it can change between steps


def test_frechet_distance_matches_its_closed_form():
    torch.manual_seed(0)
    a = torch.randn(400, 3) @ torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 2.0]])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # b = 2a + 3: S_b = 4 S_a, (S_a S_b)^(1/2) = 2 S_a, so FD = ||mu_a - mu_b||^2 + tr(S_a)
    b = 2 * a + 3
    mu_gap = ((a.double().mean(0) - b.double().mean(0)) ** 2).sum().item()
    trace = torch.cov(a.double().T).trace().item()
    assert frechet_distance(a, b) == pytest.approx(mu_gap + trace, rel=1e-6)


def _run(write_yaml, tmp_path, name: str, *sets: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    config = write_yaml(GAN_RUN)
    out = tmp_path / name
    args = ["run", str(config), "--out", str(out), "--quiet"]
    for value in sets:
        args += ["--set", value]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text()), load_file(str(out / "model.safetensors"))


def test_no_replay_is_finetuning_to_the_bit_and_replay_changes_the_run(write_yaml, tmp_path):
    """With mix_ratio 0 the GAN still trains and is scored each experience, and the classifier
    ends bit-identical to finetune's: the GAN draws from its own random streams. With replay on,
    the classifier trains on generated samples and ends elsewhere."""
    off, off_weights = _run(write_yaml, tmp_path, "off", "strategy.mix_ratio=0.0")
    plain, plain_weights = _run(write_yaml, tmp_path, "finetune", "strategy=finetune", "protocol.memory={}")
    assert off["accuracy_matrix"] == plain["accuracy_matrix"]
    assert all(torch.equal(off_weights[k], plain_weights[k]) for k in plain_weights)
    on, on_weights = _run(write_yaml, tmp_path, "on", "strategy.mix_ratio=0.5")
    assert any(not torch.equal(on_weights[k], plain_weights[k]) for k in plain_weights)
    for row, seen in zip(on["memory"], (4, 7, 10)):
        assert row["codec"] == "gan" and row["exemplars"] == 0 and row["classes"] == seen
        assert row["bytes"] <= row["budget_bytes"] == 60000
        assert 0.0 <= row["generated_accuracy"] <= 100.0 and math.isfinite(row["frechet_distance"])
    assert off["memory"][0]["bytes"] == on["memory"][0]["bytes"]
    # the generators are the same in both runs and the classifiers are not: the Frechet distance,
    # measured in one fixed space (pooled pixels, not the current model's features), is the same
    assert [r["frechet_space"] for r in on["memory"]] == ["pixels_8x8"] * 3
    assert [r["frechet_distance"] for r in on["memory"]] == [r["frechet_distance"] for r in off["memory"]]


def test_tensorboard_gets_a_grid_of_samples_per_class(write_yaml, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_yaml(GAN_RUN.replace("output: {tensorboard: false}", "output: {tensorboard: true}"))
    out = tmp_path / "tb"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--set", "protocol.increment=6"]) == 0
    events = EventAccumulator(str(out), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    grids = [t for t in tags["images"] if t.startswith("memory/generated/class_")]
    assert len(grids) == 10  # every class seen by the end
    first = events.Images(grids[0])[0]
    assert first.width == 2 * 16 + 3 and first.height == 16 + 2  # 2 samples with torchvision's 1 px padding
    assert {"memory/bytes", "memory/generated_accuracy", "memory/frechet_distance"} <= set(tags["scalars"])


def test_the_gradient_penalty_of_a_linear_critic_is_its_closed_form():
    from incremental.memory.gan import _gradient_penalty

    class Linear(torch.nn.Module):  # D(x, y) = <w, x>: its gradient is w everywhere
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(1, 2, 4, 4))

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return (x * self.w).flatten(1).sum(1)

    critic = Linear()
    real, fake = torch.rand(5, 2, 4, 4), torch.rand(5, 2, 4, 4)
    penalty = _gradient_penalty(critic, real, fake, torch.zeros(5, dtype=torch.long))
    assert penalty.item() == pytest.approx((critic.w.norm().item() - 1) ** 2, rel=1e-5)


@pytest.mark.parametrize("loss", ["hinge", "wgan_gp"])
def test_a_few_gan_steps_move_the_generator_and_keep_its_shapes(loss):
    from incremental.memory.gan import train_gan

    torch.manual_seed(0)
    g = Generator(num_classes=4, channels=1, image_size=8, width=4, z_dim=8)
    d = ProjectionDiscriminator(num_classes=4, channels=1, image_size=8, width=4)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    real = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    previous = Generator(num_classes=4, channels=1, image_size=8, width=4, z_dim=8).eval()
    losses = train_gan(g, d, real, torch.full((20,), 2), previous=previous, old_labels=[0, 1], steps=3,
                       batch_size=6, lr=1e-3, loss=loss, d_steps=2, diffaugment=True, gp_weight=10.0)
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(before[k], v) for k, v in g.state_dict().items())
    assert g(torch.randn(3, 8), torch.tensor([0, 2, 3])).shape == (3, 1, 8, 8)
