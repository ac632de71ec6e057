"""``incremental probe RUN_DIR``: the probes on a finished (or stopped) run's saved model.

The run's ``config.yaml`` is read back (``--set`` may change its ``probes:``), the model is
rebuilt with the run's seed (so pruned or low-rank structures come out the same), its head
grown to the saved class count, and the weights of ``model.safetensors`` loaded strictly.
The probes see the test images of the classes seen up to the saved experience.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import UserError


def load_saved_model(run_dir: Path, cfg: Any, splits: Any, class_split: Any, weights: Any = None) -> tuple[Any, int]:
    """The run's model with the saved weights, and the experience they were saved after;
    ``weights``: the run's named pre-trained weights when the caller resolved them already."""
    from avalanche.training.determinism.rng_manager import RNGManager

    from ..models.net import build_model
    from ..models.net import load_trained_state
    from ..strategy import StrategyContext, build_strategy
    from ..run.directory import MODEL_FILE, read_model

    path = run_dir / MODEL_FILE
    state, experience, num_classes = read_model(path)
    RNGManager.set_random_seeds(cfg.seed)  # the same initialisation, hence the same pruned structure
    model = build_model(cfg.backbone, in_chans=splits.channels, img_size=splits.image_size,
                        initial_classes=class_split.classes_per_experience[0], weights=weights)
    # the strategy's adapters, prompts or branches, as the run built them
    build_strategy(StrategyContext(config=cfg, class_split=class_split, benchmark=None, device="cpu"), model)
    try:
        load_trained_state(model, state, num_classes)  # with the run's classifier (NCM means, BiC's bias)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f"{path} does not fit the model of config.yaml: {first[1].strip() if len(first) > 1 else first[0]}",
                        key="backbone") from None
    return model, experience


def probe_run(run_dir: Path, overrides: Sequence[str] = (), out: Path | None = None, *, quiet: bool = False,
              echo: Callable[[str], None] = print, plugins: Sequence[str] = (),
              trust_plugins: bool = False) -> dict[str, Any]:
    """Probe the saved model of ``run_dir``; writes ``probes.json`` (or ``out``) and PNG heat maps.
    The plugin code the run's config.yaml lists is imported only when named again in
    ``plugins`` (``--plugin``) or ``trust_plugins``."""
    from ..config import load_config
    from ..data import build_dataset
    from ..models.net import resolve_backbone_weights
    from ..files import write_json_atomic
    from ..protocol import make_class_split
    from ..run.directory import CONFIG_FILE, check_recorded_plugins
    from ..run.environment import resolve_device
    from .base import ProbeData
    from .suite import ProbeSuite

    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{run_dir} has no {CONFIG_FILE}; expected a directory written by `incremental run`",
                        key="RUN_DIR")
    check_recorded_plugins(run_dir, list(plugins), trust_plugins)
    cfg, source = load_config(str(config_path), overrides, plugins=plugins)
    if not cfg.probes:  # neither the run nor --set names any: the default suite
        from .options import DEFAULT_SUITE

        cfg, source = load_config(str(config_path), [*overrides, f"probes=[{', '.join(DEFAULT_SUITE)}]"],
                                  plugins=plugins)
        if not quiet:
            echo(f"the run lists no probes: the default suite ({', '.join(DEFAULT_SUITE)}); --set 'probes=[...]' "
                 f"chooses others")
    target = out or run_dir / "probes.json"
    try:
        if target.exists() and out is None:
            raise UserError(f"{target} exists; pass --out FILE to write elsewhere", key="--out")
        if not target.parent.is_dir():  # checked before probing, so no probe work is lost
            raise UserError(f"cannot write {target}: {target.parent} is not a folder", key="--out")
        device = resolve_device(cfg.training.device)
        weights = resolve_backbone_weights(cfg.backbone)  # the normalisation the run's named weights set
        splits = build_dataset(cfg.dataset.name, cfg.dataset.config, weights.statistics() if weights else None)
        class_split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
        model, step = load_saved_model(run_dir, cfg, splits, class_split, weights)
        from ..models.compress import evaluates_int8
        from .ood import check_text_heads

        check_text_heads(cfg.probes, model)
        suite = ProbeSuite(cfg.probes, ProbeData(splits, class_split.class_order,
                                                 class_split.classes_per_experience, cfg.seed,
                                                 cfg.protocol.templates),
                           num_experiences=step + 1, echo=None if quiet else echo, int8=evaluates_int8(cfg.backbone))
    except UserError as exc:
        raise source.attribute(exc)
    model.to(device)
    if not quiet:
        echo(f"probing {run_dir} after experience {step} ({class_split.classes_per_experience[: step + 1]} classes)")
    from ..progress import shown

    with shown(not quiet):
        results = suite.run(model, step, device)
    write_json_atomic(target, {"run": str(run_dir), "experience": step, "probes": results})
    try:
        write_images(suite.last_images, target.with_suffix(""))
    except OSError as exc:
        raise UserError(f"cannot write the heat maps next to {target}: {exc.strerror or exc}", key="--out") from None
    if not quiet:
        echo(f"wrote {target}")
    return results


def write_images(images: dict[str, dict[str, Any]], prefix: Path) -> list[Path]:
    """Heat maps as ``PREFIX-LABEL-NAME.png``."""
    from PIL import Image

    written = []
    for label, named in images.items():
        for name, image in named.items():
            path = prefix.with_name(f"{prefix.name}-{label}-{name}.png")
            Image.fromarray(image).save(path)
            written.append(path)
    return written


__all__ = ["load_saved_model", "probe_run"]
