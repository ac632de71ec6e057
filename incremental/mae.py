"""Masked-autoencoder pretraining of a ViT encoder on the user's own data (He et al. 2022).

Follows facebookresearch/mae's models_mae.py: random masking of 75% of the patches, the
encoder sees only the kept ones (plus its class/register tokens), a light decoder of
transformer blocks fills in mask tokens and predicts the pixels of every patch, and the
loss is the mean squared error on the masked patches of per-patch-normalised pixels.
Position embeddings are fixed 2D sin-cos during pretraining, as in MAE. The encoder is any
timm VisionTransformer the registry builds (``vit``, ``timm_vit``, ``vit_dlcl``), and the
saved ``encoder.safetensors`` loads back with ``backbone: {..., pretrained: PATH}``.

``incremental pretrain-mae CONFIG`` takes a run config (so it can ``extends:`` a protocol)
plus a ``mae:`` section, and pretrains on the protocol's base classes by default, the data
a class-incremental learner may see before its first step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import OptimizerConfig, SchedulerConfig
from .config.schema import MAEOptions, PretrainConfig
from .errors import ConfigError


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of a grid, (H*W, dim) (timm's builder)."""
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    return build_sincos2d_pos_embed(list(grid), dim=dim)


class MaskedAutoencoder(nn.Module):
    """A timm VisionTransformer encoder and MAE's decoder."""

    def __init__(self, encoder: nn.Module, in_chans: int, opts: MAEOptions):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.encoder = encoder
        self.mask_ratio = opts.mask_ratio
        self.norm_pix_loss = opts.norm_pix_loss
        self.patch = int(encoder.patch_embed.patch_size[0])
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.prefix = int(encoder.num_prefix_tokens)
        width = int(encoder.embed_dim)
        with torch.no_grad():  # MAE's fixed encoder position embedding (prefix positions 0)
            table = sincos_pos_embed(self.grid, width)
            encoder.pos_embed.zero_()
            encoder.pos_embed[0, -table.shape[0]:] = table
        encoder.pos_embed.requires_grad_(False)

        dim = opts.decoder_embed_dim
        self.decoder_embed = nn.Linear(width, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        decoder_pos = torch.zeros(1, self.prefix + table.shape[0], dim)
        decoder_pos[0, self.prefix:] = sincos_pos_embed(self.grid, dim)
        self.register_buffer("decoder_pos_embed", decoder_pos)
        self.decoder_blocks = nn.ModuleList(
            Block(dim, opts.decoder_num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(opts.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, self.patch ** 2 * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        inner = self.encoder.no_weight_decay() if hasattr(self.encoder, "no_weight_decay") else set()
        return {f"encoder.{n}" for n in inner} | {"mask_token"}

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), patches in the encoder's row-major token order."""
        n, c, _, _ = images.shape
        (h, w), p = self.grid, self.patch
        x = images.reshape(n, c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, p * p * c)

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random (1 - mask_ratio) of the tokens of each image (MAE's argsort of
        ``noise``, uniform (N, L), drawn here when not given). Returns the kept tokens, the
        binary mask (1 = removed) and the restoring permutation."""
        n, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        shuffle = torch.argsort(noise, dim=1)
        restore = torch.argsort(shuffle, dim=1)
        kept = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, restore), restore

    def forward_encoder(self, images: torch.Tensor, noise: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder
        x = enc.patch_embed(images)
        x = x + enc.pos_embed[:, -x.shape[1]:]
        x, mask, restore = self.random_masking(x, noise)
        prefix = [t for t in (enc.cls_token, getattr(enc, "reg_token", None)) if t is not None]
        if prefix:
            tokens = torch.cat(prefix, dim=1).expand(x.shape[0], -1, -1)
            if enc.pos_embed.shape[1] > self.grid[0] * self.grid[1]:  # prefix tokens have positions
                tokens = tokens + enc.pos_embed[:, :self.prefix]
            x = torch.cat([tokens, x], dim=1)
        x = enc.norm_pre(x)
        x = enc.forward_blocks(x) if hasattr(enc, "forward_blocks") else enc.blocks(x)
        return enc.norm(x), mask, restore

    def forward_decoder(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        prefix, kept = x[:, :self.prefix], x[:, self.prefix:]
        masked = self.mask_token.expand(x.shape[0], restore.shape[1] - kept.shape[1], -1)
        full = torch.cat([kept, masked], dim=1)
        full = torch.gather(full, 1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([prefix, full], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, self.prefix:]

    def loss(self, images: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((prediction - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss, the predicted patches and the mask. The masking ``noise`` is an argument,
        not drawn inside, so a compiled forward has no random state in its graph and the
        ranks of a sharded run can each take their rows of one global draw."""
        latent, mask, restore = self.forward_encoder(images, noise)
        prediction = self.forward_decoder(latent, restore)
        return self.loss(images, prediction, mask), prediction, mask


def pretrain(cfg: PretrainConfig, run_dir: Path, *, quiet: bool = False,
             echo: Callable[[str], None] = print, out_key: str = "--out") -> dict[str, Any]:
    """Pretrain the configured backbone by MAE; writes encoder.safetensors and mae_log.json.
    Under torchrun every rank trains on its shard of each global batch and rank 0 writes."""
    from timm.models.vision_transformer import VisionTransformer

    from .config import dump_yaml
    from .data import build_dataset
    from .distributed import broadcast_object, device_for, init_from_environment, on_rank_zero
    from .models.net import build_backbone
    from .progress import shown
    from .protocol import OrderedClassSubset, classification_dataset, make_class_split
    from .run.directory import RunDirectory
    from .run.environment import resolve_device

    opts = cfg.mae
    dist = init_from_environment(cfg.training.device)
    run_dir = Path(broadcast_object(str(run_dir), dist))  # rank 0's (timestamped) directory
    quiet = quiet or not dist.is_main
    torch.manual_seed(cfg.seed)
    device = device_for(dist, resolve_device(cfg.training.device))
    splits = build_dataset(cfg.dataset.name, cfg.dataset.config)
    encoder = build_backbone(cfg.backbone, in_chans=splits.channels, img_size=splits.image_size)
    if not isinstance(encoder, VisionTransformer):
        raise ConfigError(f"MAE pretraining needs a ViT backbone (vit, timm_vit, vit_dlcl), not "
                          f"{cfg.backbone.name!r}", key="backbone.name")
    if cfg.backbone.common is not None and cfg.backbone.common.compress.enabled:
        raise ConfigError("compress a pretrained encoder in the run that loads it, not here",
                          key="backbone.compress")
    split = make_class_split(cfg.protocol, splits.num_classes, cfg.seed)
    classes = set(split.experiences[0]) if opts.classes == "base" else set(split.class_order)
    images = classification_dataset(OrderedClassSubset(splits.train, sorted(classes)), splits)
    if len(images) < opts.batch_size:
        raise ConfigError(f"{len(images)} training images in the chosen classes, fewer than one batch",
                          key="mae.batch_size")
    if opts.batch_size < dist.world_size:
        raise ConfigError(f"a batch of {opts.batch_size} cannot be split across {dist.world_size} processes",
                          key="mae.batch_size")

    holder: list[RunDirectory] = []
    on_rank_zero(lambda: holder.append(RunDirectory.create(run_dir, dump_yaml(cfg), marker="mae_log.json",
                                                           key=out_key)), dist)
    directory = holder[0] if holder else None
    try:
        if directory is not None:
            directory.begin()
        with shown(not quiet):
            return _train(cfg, encoder, splits, images, classes, run_dir, device=device, dist=dist, quiet=quiet,
                          echo=echo)
    except BaseException:
        if directory is not None and not (run_dir / "mae_log.json").exists():
            directory.discard()  # nothing trained yet: the same command works again
        raise
    finally:
        if directory is not None:
            directory.close()


def _train(cfg: PretrainConfig, encoder: nn.Module, splits: Any, images: Any, classes: set[int], run_dir: Path, *,
           device: Any, dist: Any, quiet: bool, echo: Callable[[str], None]) -> dict[str, Any]:
    """MAE's training loop on the training engine (the run's precision, compile, data path and
    sharding); rank 0 writes mae_log.json after every epoch and the encoder at the end."""
    from safetensors.torch import save

    from .files import write_atomic, write_json_atomic
    from .training.optim import check_finite, lr_factor, make_optimizer, param_groups
    from .run.environment import device_data_path, resolve_workers
    from .training.engine import TrainingEngine, compile_seconds

    opts, training = cfg.mae, cfg.training
    model = MaskedAutoencoder(encoder, splits.channels, opts).to(device)
    engine = TrainingEngine(device, precision=training.precision, compile=training.compile, dist=dist,
                            batch_augmentation=splits.batch_augmentation
                            if device_data_path(training.data_path, device) else None)
    lr = opts.base_lr * opts.batch_size / 256
    optimizer = make_optimizer(param_groups(model, opts.weight_decay), OptimizerConfig(name="adamw"), lr,
                               betas=(0.9, 0.95))
    # drop_last: every global batch is full, so each rank's masking rows are known (below)
    batches = engine.batches(images, batch_size=opts.batch_size, shuffle=True, drop_last=True, seed=cfg.seed,
                             num_workers=resolve_workers(training.num_workers))
    mask_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    schedule = SchedulerConfig(name="cosine", warmup_epochs=opts.warmup_epochs)

    def loss(forward: Callable[..., Any], batch: list[torch.Tensor]) -> torch.Tensor:
        # One draw for the global batch, every rank taking its shard's rows: the masks of one process.
        noise = torch.rand(opts.batch_size, model.num_patches, device=device, generator=mask_gen)
        return forward(batch[0], dist.shard(noise))[0]

    if not quiet:
        echo(f"MAE pretraining of {cfg.backbone.name} on {len(images)} images of {len(classes)} classes "
             f"({opts.classes}), {opts.epochs} epochs, mask ratio {opts.mask_ratio}, lr {lr:.2e}, device {device}")
    log: dict[str, Any] = {"images": len(images), "classes": sorted(classes), "epoch_loss": [], "status": "running"}

    def record(epoch: int, mean: float) -> None:
        log["epoch_loss"].append(mean)
        if not quiet and (epoch % max(1, opts.epochs // 10) == 0 or epoch == opts.epochs - 1):
            from tqdm import tqdm

            with tqdm.external_write_mode():  # the line above the progress bar, not through it
                echo(f"epoch {epoch:>4}  loss {mean:.4f}")
        if dist.is_main:
            write_json_atomic(run_dir / "mae_log.json", log)

    start, compiling = time.perf_counter(), compile_seconds()
    model.train()
    engine.fit(model, batches, optimizer, epochs=opts.epochs, loss=loss, on_epoch=record, desc="MAE pretraining",
               check=lambda value, when: check_finite(value, "MAE loss", when, key="mae.base_lr"),
               lr_factor=lambda iteration, steps: lr_factor(schedule, iteration=iteration, iters_per_epoch=steps,
                                                            epochs=opts.epochs))
    encoder.pos_embed.requires_grad_(True)
    compile_s = compile_seconds() - compiling
    log.update(status="complete", wall_time_s=time.perf_counter() - start,
               **({"compile_s": compile_s} if engine.compile_mode else {}))
    if dist.is_main:
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        path = run_dir / "encoder.safetensors"
        data = save(state)
        write_atomic(path, lambda tmp: tmp.write_bytes(data))
        log["encoder"] = str(path)
        write_json_atomic(run_dir / "mae_log.json", log)
        if not quiet:
            echo(f"encoder saved to {path}; load it with backbone: {{name: {cfg.backbone.name}, "
                 f"pretrained: {path}}} and the same backbone options")
    return log
