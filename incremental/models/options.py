"""The built-in backbones: their options, where each builder lives, and the options every
backbone takes (local pretrained weights, compression).

Declared here, apart from the builders, so that listing and validating a config never imports
torch or timm: the registry imports a builder only when a backbone is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..config.fields import MAX_DEPTH, MAX_SIZE, MAX_WEIGHT, MAX_WIDTH, Component, component, opt
from ..config.memory import TRAINED_PARAMETER_BYTES, MemoryNeed, transformer_needs
from ..errors import ConfigError
from ..registry import BACKBONES, TUNING


@dataclass
class PruneConfig:
    """Structured pruning with torch-pruning: a fraction of the channels inside each block
    (MLP hidden units, attention head dimensions, inner conv channels), ranked by group L2
    (or L1) norm. Residual widths stay, so ``num_features`` and the growing head do not change."""

    ratio: float = opt(0.5, gt=0, lt=1)
    importance: Literal["l2", "l1", "random"] = "l2"
    round_to: int | None = opt(None, ge=1, le=MAX_WIDTH)  # keep channel counts multiples of this (GPU kernels like 8)


@dataclass
class LowRankConfig:
    """Each Linear layer W (out x in) of the backbone becomes two, W ~ U_r S_r V_r^T from its
    SVD, where that saves parameters. ``rank_ratio`` keeps r = ratio * min(in, out); ``energy``
    instead keeps the fewest singular values holding that fraction of sum(s^2)."""

    rank_ratio: float = opt(0.25, gt=0, le=1)
    energy: float | None = opt(None, gt=0, le=1)
    min_features: int = opt(32, ge=1, le=MAX_WIDTH)  # smaller layers stay dense


@dataclass
class DistillConfig:
    """Feature distillation from a frozen, larger teacher backbone (usually ``pretrained:``):
    a linear projection of the student's pooled features is pulled toward the teacher's."""

    teacher: Component = component("backbones")
    weight: float = opt(1.0, ge=0, le=MAX_WEIGHT)
    loss: Literal["cosine", "mse"] = "cosine"


@dataclass
class CompressConfig:
    prune: PruneConfig | None = None
    low_rank: LowRankConfig | None = None
    quantize: Literal["none", "int8_dynamic"] = "none"  # int8 Linear weights for evaluation (CPU)
    distill: DistillConfig | None = None

    @property
    def structural(self) -> bool:
        return self.prune is not None or self.low_rank is not None

    @property
    def enabled(self) -> bool:
        return self.structural or self.quantize != "none" or self.distill is not None


@dataclass
class BackboneOptions:
    """Options every backbone takes, next to its own."""

    # weights only: a safetensors file, or a torch/timm checkpoint (loaded with weights_only)
    pretrained: str | None = None
    # what the file is, recorded with the run next to its SHA-256 (e.g. vit_base_patch16_224.augreg_in21k:
    # PILOT's "IN21K"; L2P used .orig_in21k, a different set of weights)
    pretrained_tag: str | None = None
    compress: CompressConfig = opt(factory=CompressConfig)


# ----------------------------------------------------------------------------- the built-ins


@dataclass
class ViTConfig:
    """Defaults follow DyTox's CIFAR ViT (embed 384, depth 6, patch 4, 12 heads)."""

    img_size: int | None = opt(None, ge=1, le=MAX_SIZE)  # None: the dataset's image size
    patch_size: int = opt(4, ge=1, le=MAX_SIZE)
    embed_dim: int = opt(384, ge=1, le=MAX_WIDTH)
    depth: int = opt(6, ge=1, le=MAX_DEPTH)
    num_heads: int = opt(12, ge=1, le=MAX_DEPTH)
    mlp_ratio: float = opt(4.0, gt=0, le=64)
    qkv_bias: bool = True
    drop_rate: float = opt(0.0, ge=0, lt=1)
    drop_path_rate: float = opt(0.1, ge=0, lt=1)
    global_pool: Literal["token", "avg"] = "token"
    # patch: one strided conv (ViT); conv: ViTIL's convolutional stem (Xiao et al. 2021).
    # Xiao et al. also drop one transformer block to keep the FLOPs equal; set depth for that.
    stem: Literal["patch", "conv"] = "patch"
    stem_channels: list[int] = opt(factory=list, ge=1, le=MAX_WIDTH)  # empty: doubling up to embed_dim

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}",
                              key="num_heads")
        if self.stem_channels and self.stem != "conv":
            raise ConfigError("stem_channels is only used with stem: conv", key="stem_channels")

    def memory_needs(self, run: Any) -> list[MemoryNeed]:
        return transformer_needs(run, width=self.embed_dim, depth=self.depth, mlp_ratio=self.mlp_ratio,
                                 patch_size=self.patch_size)


@dataclass
class TimmViTConfig:
    """Any timm VisionTransformer by name, at the dataset's image size and a chosen patch."""

    model: str = "vit_small_patch16_224"
    img_size: int | None = opt(None, ge=1, le=MAX_SIZE)  # None: the dataset's image size
    patch_size: int | None = opt(None, ge=1, le=MAX_SIZE)  # None: the model's own (16 for vit_*_patch16_*)
    drop_rate: float = opt(0.0, ge=0, lt=1)
    drop_path_rate: float = opt(0.1, ge=0, lt=1)
    global_pool: Literal["model", "token", "avg"] = "model"  # model: what the timm entry uses
    stem: Literal["patch", "conv"] = "patch"

    def validate(self) -> None:
        names = timm_vit_names()
        if self.model not in names:
            from ..errors import did_you_mean

            raise ConfigError(f"not a timm VisionTransformer: {self.model!r}{did_you_mean(self.model, names)}",
                              key="model")


def timm_vit_names() -> list[str]:
    """timm's VisionTransformer entries (this imports timm: only a timm_vit config pays for it)."""
    import timm

    # timm registers the DeiT variants in their own module; both build VisionTransformer
    return sorted(timm.list_models(module="vision_transformer") + timm.list_models(module="deit"))


@dataclass
class SwinConfig:
    """Swin-T/S/B by ``variant``; ``embed_dim``, ``depths``, ``num_heads`` override it."""

    variant: Literal["tiny", "small", "base"] = "tiny"
    img_size: int | None = opt(None, ge=8, le=MAX_SIZE)  # None: the dataset's image size
    patch_size: int | None = opt(None, ge=1, le=MAX_SIZE)  # None: 2 at <= 32 px, else 4
    window_size: list[int] = opt(factory=list, ge=1, le=MAX_SIZE)  # per stage; empty: the variant's, fitted
    embed_dim: int | None = opt(None, ge=1, le=MAX_WIDTH)
    depths: list[int] = opt(factory=list, ge=1, le=MAX_DEPTH)
    num_heads: list[int] = opt(factory=list, ge=1, le=MAX_DEPTH)
    mlp_ratio: float = opt(4.0, gt=0, le=64)
    drop_rate: float = opt(0.0, ge=0, lt=1)
    drop_path_rate: float = opt(0.1, ge=0, lt=1)

    def validate(self) -> None:
        if self.depths and self.num_heads and len(self.depths) != len(self.num_heads):
            raise ConfigError(f"{len(self.num_heads)} entries for {len(self.depths)} stages", key="num_heads")


@dataclass
class S3Config:
    """The searched S3 architecture is fixed; size and regularisation can be set."""

    img_size: int | None = opt(None, ge=8, le=MAX_SIZE)
    patch_size: int | None = opt(None, ge=1, le=MAX_SIZE)
    drop_rate: float = opt(0.0, ge=0, lt=1)
    drop_path_rate: float = opt(0.1, ge=0, lt=1)


@dataclass
class ViTDLCLConfig:
    """A deep, narrow default: 24 blocks of width 192, patch 4 (small images)."""

    img_size: int | None = opt(None, ge=1, le=MAX_SIZE)
    patch_size: int = opt(4, ge=1, le=MAX_SIZE)
    embed_dim: int = opt(192, ge=1, le=MAX_WIDTH)
    depth: int = opt(24, ge=1, le=MAX_DEPTH)
    num_heads: int = opt(3, ge=1, le=MAX_DEPTH)
    mlp_ratio: float = opt(4.0, gt=0, le=64)
    drop_path_rate: float = opt(0.1, ge=0, lt=1)
    global_pool: Literal["token", "avg"] = "token"
    stem: Literal["patch", "conv"] = "patch"

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}",
                              key="num_heads")

    def memory_needs(self, run: Any) -> list[MemoryNeed]:
        return transformer_needs(run, width=self.embed_dim, depth=self.depth, mlp_ratio=self.mlp_ratio,
                                 patch_size=self.patch_size)


@dataclass
class ResNet32Config:
    width: int = opt(16, ge=1, le=MAX_WIDTH)  # channels of the first stage (64 pooled features at 16)

    def memory_needs(self, run: Any) -> list[MemoryNeed]:
        # 3 stages of 5 basic blocks (two 3x3 convs each) at w, 2w and 4w channels: 9 * 210 w^2 weights
        return [MemoryNeed("width", 9 * 210 * self.width ** 2 * TRAINED_PARAMETER_BYTES,
                           f"a ResNet-32 of width {self.width} trained with AdamW")]


@dataclass
class ResNet18Config:
    # cifar: 3x3 stride-1 first conv and no max-pool, as the CIFAR ResNet-18 of DER, PODNet's
    # ImageNet-subset code and most CIL papers; imagenet: timm's 7x7/2 conv + max-pool.
    # auto: cifar up to 64 px, imagenet above.
    stem: Literal["auto", "cifar", "imagenet"] = "auto"
    drop_rate: float = opt(0.0, ge=0, lt=1)


@dataclass
class CLIPConfig:
    """An open_clip image-text dual encoder (incremental.models.clip). ``model`` is any open_clip
    architecture (``ViT-B-16``, ``ViT-L-14``, ``RN50``, ...) or the toolkit's small ``clip-tiny``;
    ``config_file`` instead reads an open_clip model config (JSON: embed_dim, vision_cfg,
    text_cfg). Weights come from ``pretrained`` (an open_clip checkpoint file)."""

    model: str = "ViT-B-16"
    config_file: str | None = None
    img_size: int | None = opt(None, ge=8, le=MAX_SIZE)  # None: the dataset's image size
    # text: new classifier rows start as scale * (normalised text embedding of the class name);
    # random: Avalanche's initialisation, as for every other backbone
    head_init: Literal["text", "random"] = "text"
    # The activation: QuickGELU (x * sigmoid(1.702 x)), which OpenAI's CLIP and some LAION weights
    # were trained with, or GELU. None: as open_clip's pretrained config for backbone.pretrained_tag
    # ("openai" or "ViT-B-32.laion400m_e32") says, else as the architecture's config (the
    # "-quickgelu" names set it). A value that contradicts the tag is refused.
    quick_gelu: bool | None = None
    # The class-name strategies (zeroshot, continual_clip, clip_replay, proof) refuse a CLIP without
    # backbone.pretrained: its text tower would know nothing of the names. true runs one anyway
    # (tests, demonstrations of the machinery)
    random_weights: bool = False


BACKBONES.declare("vit", "incremental.models.vit:build_vit", config=ViTConfig,
                  summary="timm VisionTransformer, patchify or conv stem, any size (default: DyTox's CIFAR ViT).")
BACKBONES.declare("timm_vit", "incremental.models.vit:build_timm_vit", config=TimmViTConfig,
                  summary="Any timm ViT by name (vit_*, deit*, ...), with image and patch size for small images.")
BACKBONES.declare("swin", "incremental.models.swin:build_swin", config=SwinConfig,
                  summary="timm Swin Transformer (tiny/small/base), windows fitted to 32, 64 or 224 px grids.")
for _size in ("tiny", "small", "base"):
    BACKBONES.declare(f"s3_{_size}", f"incremental.models.swin:build_s3_{_size}", config=S3Config,
                      summary=f"S3-{_size[0].upper()} (searched Swin, Chen et al. 2021; timm's swin_s3_{_size}_224).")
BACKBONES.declare("vit_dlcl", "incremental.models.dlcl:build_vit_dlcl", config=ViTDLCLConfig,
                  summary="Deep pre-norm ViT with dynamic linear combination of layers (Wang et al. 2019); slow on "
                          "CPUs: its default is 729 MMACs per 32-px image, 13x the digits ViT (depth 8, width 128: 2x).")
BACKBONES.declare("resnet32", "incremental.models.resnet:build_resnet32", config=ResNet32Config,
                  summary="CIFAR ResNet-32 (0.46M parameters), the iCaRL/PODNet/PyCIL CIFAR baseline.")
BACKBONES.declare("clip", "incremental.models.clip:build_clip", config=CLIPConfig,
                  summary="open_clip image-text dual encoder (any architecture, weights from a file or by name); a class-name text head.")
BACKBONES.declare("resnet18", "incremental.models.resnet:build_resnet18", config=ResNet18Config,
                  summary="timm ResNet-18 (11.2M parameters), with a CIFAR stem for small images.")


# ----------------------------------------------------------------------------- tuning a pre-trained ViT


@dataclass
class AdapterConfig:
    bottleneck: int = opt(64, ge=1, le=MAX_WIDTH)  # PILOT's ffn_num
    scale: float = opt(0.1, gt=0, le=MAX_WEIGHT)  # AdaptFormer's s (PILOT: 0.1)
    dropout: float = opt(0.1, ge=0, lt=1)  # on the bottleneck in training (PILOT's vit_adapter: 0.1)


@dataclass
class SSFConfig:
    # pilot: scales from N(1, 0.02) and shifts from N(0, 0.02), as PILOT's init_ssf_scale_shift;
    # identity: ones and zeros, so the tuned model starts as the pre-trained one
    init: Literal["pilot", "identity"] = "pilot"
    patch_embed: bool = True  # a scale and shift on the patch embedding too (PILOT's vit_ssf)


@dataclass
class VPTConfig:
    length: int = opt(5, ge=1, le=1024)  # prompt tokens per block (PILOT's prompt_token_num)


@dataclass
class PrefixConfig:
    # PILOT's exps/lae.json: pet_length 10 on adapt_blocks 0-4 (utils/inc_net.py LAE), compensatory
    length: int = opt(10, ge=1, le=1024)  # key and value prefix tokens per block
    blocks: int = opt(5, ge=1, le=1024)  # the first blocks that get prefixes (all, when the backbone has fewer)
    # true: the prefix columns of the attention divided by their own sum after the softmax (LAE's
    # compensatory Prefix); false: plain prefix-tuning (one softmax over prefixes and tokens)
    compensatory: bool = True


LoRATarget = Literal["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


@dataclass
class LoRAConfig:
    rank: int = opt(8, ge=1, le=MAX_WIDTH)  # r (Hu et al. 2021; PEFT's default 8)
    alpha: float = opt(8.0, gt=0, le=MAX_WEIGHT)  # the update is scaled by alpha / r (PEFT: lora_alpha)
    dropout: float = opt(0.0, ge=0, lt=1)  # on the LoRA branch's input in training (PEFT: lora_dropout)
    # the linear layers of every block that get a low-rank update (timm's names; qkv is fused)
    targets: list[LoRATarget] = opt(factory=lambda: ["attn.qkv"])

    def validate(self) -> None:
        if not self.targets:
            raise ConfigError("needs at least one target layer", key="targets")


TUNING.declare("frozen", "incremental.models.peft:tune_frozen",
               summary="The pre-trained ViT (or Swin) as it is: no parameter of it trains.")
TUNING.declare("finetune", "incremental.models.peft:tune_all",
               summary="Every parameter of the pre-trained ViT (or Swin) trains.")
TUNING.declare("adapter", "incremental.models.peft:tune_adapter", config=AdapterConfig,
               summary="AdaptFormer's parallel adapters in every block (zero-initialised); only they train.")
TUNING.declare("ssf", "incremental.models.peft:tune_ssf", config=SSFConfig,
               summary="SSF: a scale and shift after every linear layer and norm and the patch embedding; only they train.")
TUNING.declare("lora", "incremental.models.peft:tune_lora", config=LoRAConfig,
               summary="LoRA: a low-rank update (alpha / r) B A beside chosen linear layers of each block; only A "
                       "and B train.")
TUNING.declare("prefix", "incremental.models.peft:tune_prefix", config=PrefixConfig,
               summary="Prefix-tuning: learned key/value prefixes in the attention of the first blocks; only they "
                       "train.")
TUNING.declare("vpt_deep", "incremental.models.peft:tune_vpt_deep", config=VPTConfig,
               summary="VPT-deep: learned prompt tokens at the input of every block; only they train.")
