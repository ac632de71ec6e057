"""Parameter-efficient tuning of a timm ViT or Swin, for the methods that start from a pre-trained one.

Each block attaches to a ``timm`` VisionTransformer or SwinTransformer without touching its own
weights or their names (so pre-trained checkpoints still load into it), through forward hooks
and one attention wrapper, and starts as the identity:

- :func:`freeze`: no gradients (and, for the pre-trained-model methods, eval mode) for a module;
- :func:`add_adapters`: AdaptFormer's parallel adapters (Chen et al. 2022): ``x + MLP(LN(x)) +
  s * up(ReLU(down(x)))`` in every block, the up-projection zero-initialised (PILOT's
  ``vit_adapter``: bottleneck 64, scale 0.1); several adapter *sets*, one active at a time (EASE);
- :func:`add_ssf`: SSF's scale and shift (Lian et al. 2022) after every linear layer and
  LayerNorm: ``y * gamma + beta``, with gamma 1 and beta 0 at the start;
- :func:`add_lora`: LoRA (Hu et al. 2021): ``W x + (alpha / r) B A x`` beside the chosen linear
  layers of every block (timm's fused ``attn.qkv`` by default), B zero at the start;
- :func:`add_vpt_deep`: VPT-deep prompts (Jia et al. 2022): learned tokens after the class
  token, replaced at the input of every block (ViT only: Swin's windows have no place for them);
- :class:`PrefixAttention`: prefix-tuning inside attention (Li and Liang 2021): per-sample key
  and value prefixes concatenated to the keys and values of a block (DualPrompt, CODA-Prompt);
  in a Swin block, every window of an image attends to that image's prefixes;
- :func:`add_prefix_tuning`: learned prefixes of its own in the first blocks (LAE's prefix PET),
  optionally compensatory (the prefix columns renormalised after the softmax);
- :func:`query_features`: the query pass (L2P, DualPrompt, CODA-Prompt): the pooled features
  (a token-pooled ViT's class token) with every prompt and adapter switched off.

On Swin the adapters' and prefixes' widths follow each stage's.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError


def vision_transformer(backbone: nn.Module, *, key: str = "backbone.name", swin: bool = False) -> nn.Module:
    """The timm VisionTransformer (with ``swin``, or SwinTransformer) these blocks attach to, or a
    one-line error."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(backbone, VisionTransformer) or (swin and isinstance(backbone, SwinTransformer)):
        return backbone
    wanted = "a ViT or Swin backbone (vit, timm_vit, vit_dlcl, swin, s3_*)" if swin else \
        "a ViT backbone (vit, timm_vit, vit_dlcl)"
    raise ConfigError(f"this needs {wanted}, not {type(backbone).__name__}", key=key)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks in order: a ViT's ``blocks``, or every stage's blocks of a Swin."""
    if hasattr(model, "layers"):  # Swin: stages of blocks
        return [block for stage in model.layers for block in stage.blocks]
    return list(model.blocks)


def block_width(block: nn.Module) -> int:
    return int(block.norm2.normalized_shape[0])


def freeze(module: nn.Module) -> nn.Module:
    """No gradients for ``module``'s parameters; returns it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# --------------------------------------------------------------------------- adapters


class Adapter(nn.Module):
    """AdaptFormer's bottleneck: ``scale * up(dropout(ReLU(down(x))))``; zero at the start."""

    def __init__(self, dim: int, bottleneck: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        self.dropout = dropout
        nn.init.kaiming_uniform_(self.down.weight, a=5 ** 0.5)  # PILOT's "lora" init
        for tensor in (self.down.bias, self.up.weight, self.up.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.dropout(F.relu(self.down(x)), self.dropout, self.training)) * self.scale


class AdapterBank(nn.Module):
    """Adapter sets (one adapter per block each); ``active`` picks the set in use (None: off)."""

    def __init__(self, widths: list[int], bottleneck: int, scale: float, sets: int, dropout: float = 0.0):
        super().__init__()
        self.sets = nn.ModuleList(nn.ModuleList(Adapter(width, bottleneck, scale, dropout) for width in widths)
                                  for _ in range(sets))
        self.active: int | None = 0
        self._inputs: dict[int, torch.Tensor] = {}


def add_adapters(vit: nn.Module, *, bottleneck: int, scale: float, sets: int = 1, dropout: float = 0.0) -> AdapterBank:
    """Parallel adapters in every block of ``vit`` (registered as ``vit.adapters``): the block's
    MLP branch gets ``+ adapter(x)``, ``x`` the block's input to that branch; ``dropout`` on the
    bottleneck's activations in training (PILOT's vit_adapter: 0.1)."""
    blocks = transformer_blocks(vit)
    bank = AdapterBank([block_width(block) for block in blocks], bottleneck, scale, sets, dropout)
    vit.adapters = bank
    for index, block in enumerate(blocks):
        def capture(module: nn.Module, args: tuple, index: int = index) -> None:
            bank._inputs[index] = args[0]

        def add(module: nn.Module, args: tuple, output: torch.Tensor, index: int = index) -> torch.Tensor:
            x = bank._inputs.pop(index)
            if bank.active is None or not tuning_on(vit):
                return output
            return output + bank.sets[bank.active][index](x)

        block.norm2.register_forward_pre_hook(capture)
        block.mlp.register_forward_hook(add)
    return bank


@contextlib.contextmanager
def adapters_set(vit: nn.Module, active: int | None) -> Iterator[None]:
    """Run the body with adapter set ``active`` (None: none), then restore the previous one (EASE)."""
    bank = getattr(vit, "adapters", None)
    if bank is None:
        yield
        return
    previous, bank.active = bank.active, active
    try:
        yield
    finally:
        bank.active = previous


# --------------------------------------------------------------------------- LoRA


class LowRankUpdate(nn.Module):
    """LoRA's branch (Hu et al. 2021) beside a frozen ``y = W x + b``: ``(alpha / r) B A dropout(x)``,
    A (r x in) Kaiming-uniform and B (out x r) zero, as loralib and PEFT start them, so the
    tuned layer starts as the pre-trained one."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=5 ** 0.5)
        self.scale = alpha / rank
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.dropout, self.training)
        return F.linear(F.linear(x, self.a), self.b) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """What the branch adds to W: ``(alpha / r) B A``."""
        return self.b @ self.a * self.scale


def add_lora(vit: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
             targets: Iterable[str] = ("attn.qkv",)) -> nn.ModuleDict:
    """A :class:`LowRankUpdate` beside every block's linear layers named in ``targets``
    (``attn.qkv``: timm's fused query-key-value), registered as ``vit.lora`` under the layer's
    name; the pre-trained layers and their names stay as they are."""
    wanted = tuple("." + target for target in targets)
    lora = nn.ModuleDict()
    for name, module in vit.named_modules():
        if isinstance(module, nn.Linear) and name.startswith(("blocks.", "layers.")) and name.endswith(wanted):
            update = LowRankUpdate(module.in_features, module.out_features, rank, alpha, dropout)
            lora[name.replace(".", "_")] = update
            module.register_forward_hook(
                lambda m, args, out, update=update: out + update(args[0]) if tuning_on(vit) else out)
    vit.lora = lora
    return lora


class TaskLowRankBank(nn.Module):
    """InfLoRA's branches (Liang and Li 2024): per block and per task, a fixed ``A_t`` (r x d)
    and a trained ``B_t`` (d x r), for the key part and for the value part of the block's fused
    qkv projection: keys and values get ``x (sum_{t <= active} B_t A_t)^T``, the queries nothing,
    and no alpha / r scale. B starts at zero, so a task's branch starts as nothing.

    With ``collect`` on, each block's attention input is summed as ``x^T x`` (fp64) with its token
    count, for the strategy's input covariances."""

    def __init__(self, blocks: int, tasks: int, rank: int, dim: int):
        super().__init__()
        self.register_buffer("a", torch.zeros(blocks, tasks, 2, rank, dim))
        self.b = nn.ModuleList(nn.ParameterList(nn.Parameter(torch.zeros(2, dim, rank)) for _ in range(tasks))
                               for _ in range(blocks))
        self.active = 0
        self.collect = False
        self.register_buffer("input_sums", torch.zeros(blocks, dim, dim, dtype=torch.float64), persistent=False)
        self.register_buffer("input_tokens", torch.zeros(blocks, dtype=torch.float64), persistent=False)

    def delta(self, block: int) -> torch.Tensor:
        """``sum_{t <= active} B_t A_t`` for the keys and the values (2 x d x d)."""
        tasks = range(self.active + 1)
        return sum(torch.bmm(self.b[block][t], self.a[block, t].to(self.b[block][t].dtype)) for t in tasks)

    def add_to_qkv(self, block: int, x: torch.Tensor, qkv: torch.Tensor) -> torch.Tensor:
        if self.collect:
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            self.input_sums[block] += flat.T @ flat
            self.input_tokens[block] += len(flat)
        key, value = self.delta(block)
        zeros = torch.zeros_like(qkv[..., : x.shape[-1]])
        return qkv + torch.cat([zeros, F.linear(x, key.to(x.dtype)), F.linear(x, value.to(x.dtype))], dim=-1)


def add_task_lora(vit: nn.Module, *, tasks: int, rank: int) -> TaskLowRankBank:
    """A :class:`TaskLowRankBank` on every block's ``attn.qkv`` (registered as ``vit.task_lora``)."""
    blocks = transformer_blocks(vit)
    bank = TaskLowRankBank(len(blocks), tasks, rank, block_width(blocks[0]))
    vit.task_lora = bank
    for index, block in enumerate(blocks):
        block.attn.qkv.register_forward_hook(
            lambda m, args, out, index=index: bank.add_to_qkv(index, args[0], out) if tuning_on(vit) else out)
    return bank


# --------------------------------------------------------------------------- SSF


class ScaleShift(nn.Module):
    """``x * gamma + beta`` over the channels: the last dimension, or the second (``channels_first``,
    a convolution's output). ``init: pilot`` draws gamma ~ N(1, 0.02) and beta ~ N(0, 0.02), as
    PILOT's ``init_ssf_scale_shift``; ``identity`` starts at ones and zeros."""

    def __init__(self, dim: int, init: str = "identity", channels_first: bool = False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.channels_first = channels_first
        if init == "pilot":
            nn.init.normal_(self.gamma, mean=1.0, std=0.02)
            nn.init.normal_(self.beta, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            return x * self.gamma.view(1, -1, 1, 1) + self.beta.view(1, -1, 1, 1)
        return x * self.gamma + self.beta


def add_ssf(vit: nn.Module, *, init: str = "identity", patch_embed: bool = False) -> nn.ModuleDict:
    """SSF after every Linear and LayerNorm of the blocks (a Swin's stages, with their patch
    merging) and the final norm (``vit.ssf``); with ``patch_embed``, also after the patch
    embedding's projection and its norm, where it has one (PILOT's vit_ssf)."""
    targets = [(name, m) for name, m in vit.named_modules()
               if (name.startswith(("blocks.", "layers.")) or name in ("norm", "fc_norm"))
               and isinstance(m, (nn.Linear, nn.LayerNorm))]
    embedding = getattr(vit, "patch_embed", None)
    if patch_embed and embedding is not None:
        targets[:0] = [(f"patch_embed.{n}", m) for n, m in embedding.named_children()
                       if n in ("proj", "norm") and isinstance(m, (nn.Conv2d, nn.LayerNorm))]
    ssf = nn.ModuleDict()
    for name, module in targets:
        if isinstance(module, nn.Conv2d):
            layer = ScaleShift(module.out_channels, init, channels_first=True)
        else:
            dim = module.out_features if isinstance(module, nn.Linear) else module.normalized_shape[0]
            layer = ScaleShift(dim, init)
        ssf[name.replace(".", "_")] = layer
        module.register_forward_hook(lambda m, args, out, layer=layer: layer(out) if tuning_on(vit) else out)
    vit.ssf = ssf
    return ssf


# --------------------------------------------------------------------------- VPT-deep


def add_vpt_deep(vit: nn.Module, *, length: int) -> nn.Parameter:
    """``length`` prompt tokens after the prefix tokens, a fresh set at every block's input
    (``vit.vpt``, depth x length x dim); the pooling skips them (they join the prefix tokens)."""
    depth, dim = len(vit.blocks), vit.embed_dim
    prompts = nn.Parameter(torch.empty(depth, length, dim))
    nn.init.uniform_(prompts, -(6.0 / (dim + length)) ** 0.5, (6.0 / (dim + length)) ** 0.5)  # VPT's xavier
    vit.vpt = prompts
    prefix = vit.num_prefix_tokens

    def insert(module: nn.Module, args: tuple, index: int) -> tuple | None:
        if not tuning_on(vit):
            return None
        x = args[0]
        p = prompts[index].to(x.dtype).expand(x.shape[0], -1, -1)
        if index == 0:
            return (torch.cat([x[:, :prefix], p, x[:, prefix:]], dim=1), *args[1:])
        return (torch.cat([x[:, :prefix], p, x[:, prefix + length:]], dim=1), *args[1:])

    for index, block in enumerate(vit.blocks):
        block.register_forward_pre_hook(lambda m, args, index=index: insert(m, args, index))
    vit.num_prefix_tokens = prefix + length
    vit._vpt_length = length
    return prompts


# --------------------------------------------------------------------------- prefixes in attention


class LearnedPrefix(nn.Module):
    """One block's learned key and value prefixes (LAE's ``Prefix``): ``length`` tokens each in
    the projected key/value space, drawn uniform in [0, 0.01], each set times its own learned
    scalar (from 1)."""

    def __init__(self, length: int, dim: int):
        super().__init__()
        self.keys = nn.Parameter(torch.empty(length, dim).uniform_(0.0, 0.01))
        self.values = nn.Parameter(torch.empty(length, dim).uniform_(0.0, 0.01))
        self.key_scale = nn.Parameter(torch.ones(()))
        self.value_scale = nn.Parameter(torch.ones(()))

    def forward(self, batch: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each (batch, heads, length, dim / heads)."""
        length, dim = self.keys.shape

        def split(tokens: torch.Tensor) -> torch.Tensor:
            return tokens.view(length, heads, dim // heads).transpose(0, 1).expand(batch, -1, -1, -1)
        return split(self.keys * self.key_scale), split(self.values * self.value_scale)


def compensated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_length: int,
                          bias: torch.Tensor | None = None, dropout: nn.Module | None = None) -> torch.Tensor:
    """Softmax attention whose first ``prefix_length`` key columns (the prefixes) are then divided
    by their own sum, after dropout (LAE's compensatory prefix: the prefixes get a full unit of
    attention beside the tokens' share). q, k, v: (B, heads, N, hd)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    attention = scores.softmax(dim=-1)
    if dropout is not None:
        attention = dropout(attention)
    prefix = attention[..., :prefix_length]
    prefix = prefix / prefix.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.cat([prefix, attention[..., prefix_length:]], dim=-1) @ v


class PrefixAttention(nn.Module):
    """timm's Attention with optional key/value prefixes: set ``prefix`` to ``(keys, values)``,
    each (B, heads, length, head_dim), before the forward pass, or give it a ``learned``
    :class:`LearnedPrefix` (used while ``prefix`` is None); neither runs it unchanged.
    ``compensatory`` renormalises the prefix columns (:func:`compensated_attention`)."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.inner = attention
        self.prefix: tuple[torch.Tensor, torch.Tensor] | None = None
        self.learned: LearnedPrefix | None = None
        self.compensatory = False
        self.enabled = True

    def _prefixes(self, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.enabled:
            return None
        if self.prefix is None and self.learned is not None:
            return self.learned(batch, self.inner.num_heads)
        return self.prefix

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        inner = self.inner
        windowed = hasattr(inner, "window_area")  # Swin's WindowAttention: x holds windows, ``mask`` shifts
        b, n, _ = x.shape
        prefixes = self._prefixes(b)  # a learned prefix is every image's (and every Swin window's)
        if prefixes is None:
            return inner(x, mask=mask) if windowed else inner(x, attn_mask=attn_mask, is_causal=is_causal)
        if windowed:
            return self._windows(x, mask, prefixes)
        qkv = inner.qkv(x).reshape(b, n, 3, inner.num_heads, inner.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = inner.q_norm(q), inner.k_norm(k)
        out = self._attend(q, *self._prepend(prefixes, k, v))
        out = inner.norm(out.transpose(1, 2).reshape(b, n, inner.attn_dim))
        return inner.proj_drop(inner.proj(out))

    @staticmethod
    def _prepend(prefixes: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor,
                 v: torch.Tensor, repeat: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
        keys, values = (p.to(k.dtype).repeat_interleave(repeat, dim=0) for p in prefixes)
        return torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2), keys.shape[2]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_length: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        dropout = self.inner.attn_drop
        if self.compensatory:
            return compensated_attention(q, k, v, prefix_length, bias, dropout if self.training else None)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout.p if self.training else 0.0)

    def _windows(self, x: torch.Tensor, mask: torch.Tensor | None,
                 prefixes: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Swin: x is (B * windows, N, C), image-major (timm's window_partition); each window
        attends to its image's prefixes, which carry no position bias and no shift mask."""
        inner = self.inner
        windows, n, _ = x.shape
        per_image = windows // prefixes[0].shape[0]
        qkv = inner.qkv(x).reshape(windows, n, 3, inner.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        k, v, length = self._prepend(prefixes, k, v, per_image)
        bias = inner._get_rel_pos_bias().expand(windows, -1, -1, -1)  # (windows, heads, N, N)
        if mask is not None:
            shifts = mask.shape[0]
            bias = (bias.reshape(-1, shifts, inner.num_heads, n, n) + mask.view(1, shifts, 1, n, n)
                    ).reshape(windows, inner.num_heads, n, n)
        bias = F.pad(bias, (length, 0)).to(q.dtype)  # prefix columns: no bias
        out = self._attend(q, k, v, length, bias)
        return inner.proj_drop(inner.proj(out.transpose(1, 2).reshape(windows, n, -1)))


def add_prefix_attention(vit: nn.Module, layers: list[int]) -> list[PrefixAttention]:
    """Wrap the attention of ``layers`` (block indices, counted over a Swin's stages) so that
    they take prefixes (see PrefixAttention)."""
    wrapped = []
    blocks = transformer_blocks(vit)
    for index in layers:
        block = blocks[index]
        if not isinstance(block.attn, PrefixAttention):
            block.attn = PrefixAttention(block.attn)
        wrapped.append(block.attn)
    return wrapped


def add_prefix_tuning(vit: nn.Module, *, length: int, blocks: int, compensatory: bool) -> list[LearnedPrefix]:
    """Learned key/value prefixes of ``length`` tokens in the first ``blocks`` transformer blocks
    (all of them when the backbone has fewer), as LAE's prefix PET; ``compensatory`` as there."""
    layers = list(range(min(blocks, len(transformer_blocks(vit)))))
    prefixes = []
    for attention in add_prefix_attention(vit, layers):
        attention.learned = LearnedPrefix(length, attention.inner.qkv.in_features)
        attention.compensatory = compensatory
        prefixes.append(attention.learned)
    return prefixes


# --------------------------------------------------------------------------- the query pass


def tuning_on(vit: nn.Module) -> bool:
    return getattr(vit, "_tuning_on", True)


@contextlib.contextmanager
def tuning_off(vit: nn.Module) -> Iterator[None]:
    """Run the body on the pre-trained network alone: adapters, SSF, VPT prompts and attention
    prefixes switched off (APER's original branch, the prompt methods' query pass)."""
    previous = tuning_on(vit)
    prefix_tokens = getattr(vit, "num_prefix_tokens", 0)  # a Swin has none
    attentions = [m for m in vit.modules() if isinstance(m, PrefixAttention)]
    vit._tuning_on = False
    if hasattr(vit, "num_prefix_tokens"):
        vit.num_prefix_tokens = prefix_tokens - getattr(vit, "_vpt_length", 0) if previous else prefix_tokens
    for module in attentions:
        module.enabled = False
    try:
        yield
    finally:
        vit._tuning_on = previous
        if hasattr(vit, "num_prefix_tokens"):
            vit.num_prefix_tokens = prefix_tokens
        for module in attentions:
            module.enabled = True


@torch.no_grad()
def query_features(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled features of ``vit`` on ``x`` with every tuning block off: the query L2P,
    DualPrompt and CODA-Prompt match their keys against (PILOT's ``original_backbone``; the
    prompted backbone's own weights are frozen, so they are the same network). The model's own
    pooling: the class token for a token-pooled ViT (the references'), the mean of the patch
    tokens for an avg-pooled one, a Swin's pooled features."""
    with tuning_off(vit):
        return vit.forward_head(vit.forward_features(x), pre_logits=True)


# --------------------------------------------------------------------------- the tuning registry's builders
# tune_NAME(vit, config): attach the block to ``vit`` and leave trainable exactly what the
# method trains (the pre-trained weights frozen, except for ``finetune``).


def tune_frozen(vit: nn.Module, config: Any = None) -> None:
    """The pre-trained ViT (or Swin) as it is: no parameter of it trains."""
    freeze(vision_transformer(vit, swin=True))


def tune_all(vit: nn.Module, config: Any = None) -> None:
    """Every parameter of the pre-trained ViT (or Swin) trains."""
    for p in vision_transformer(vit, swin=True).parameters():
        p.requires_grad_(True)


def tune_adapter(vit: nn.Module, config: Any) -> None:
    """AdaptFormer's parallel adapters in every block (zero-initialised); only they train."""
    freeze(vision_transformer(vit, swin=True))
    add_adapters(vit, bottleneck=config.bottleneck, scale=config.scale, dropout=config.dropout)


def tune_ssf(vit: nn.Module, config: Any = None) -> None:
    """SSF: a scale and shift after every linear layer and norm and the patch embedding; only they train."""
    freeze(vision_transformer(vit, swin=True))
    init, patch_embed = (config.init, config.patch_embed) if config is not None else ("identity", False)
    add_ssf(vit, init=init, patch_embed=patch_embed)


def tune_lora(vit: nn.Module, config: Any) -> None:
    """LoRA: a low-rank update (alpha / r) B A beside chosen linear layers of each block; only A and B train."""
    freeze(vision_transformer(vit, swin=True))
    add_lora(vit, rank=config.rank, alpha=config.alpha, dropout=config.dropout, targets=config.targets)


def tune_prefix(vit: nn.Module, config: Any) -> None:
    """Prefix-tuning: learned key/value prefixes in the attention of the first blocks; only they train."""
    freeze(vision_transformer(vit, swin=True))
    add_prefix_tuning(vit, length=config.length, blocks=config.blocks, compensatory=config.compensatory)


def tune_vpt_deep(vit: nn.Module, config: Any) -> None:
    """VPT-deep: learned prompt tokens at the input of every block; only they train."""
    freeze(vision_transformer(vit))
    add_vpt_deep(vit, length=config.length)


def apply_tuning(vit: nn.Module, spec: Any) -> None:
    """Apply a ``tuning`` component (``{name: adapter, bottleneck: 64}``) to ``vit``."""
    from ..registry import TUNING

    TUNING.get(spec.name).obj(vit, spec.config)


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["Adapter", "AdapterBank", "LearnedPrefix", "LowRankUpdate", "PrefixAttention", "ScaleShift",
           "TaskLowRankBank", "adapters_set", "add_adapters", "add_lora", "add_prefix_attention", "add_prefix_tuning",
           "add_ssf", "add_task_lora", "add_vpt_deep", "apply_tuning", "block_width", "compensated_attention",
           "freeze", "query_features", "trainable_parameters", "transformer_blocks", "tune_adapter", "tune_all",
           "tune_frozen", "tune_lora", "tune_prefix", "tune_ssf", "tune_vpt_deep", "tuning_off", "tuning_on",
           "vision_transformer"]
