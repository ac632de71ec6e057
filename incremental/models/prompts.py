"""Prompt pools for a frozen pre-trained ViT: L2P, DualPrompt and CODA-Prompt.

:class:`PromptedViT` is a backbone (timm's contract) around a frozen timm VisionTransformer and
a *prompter*. Its forward pass first runs the query pass (the ViT alone, its class token, see
:func:`incremental.models.peft.query_features`), asks the prompter for prompts given that query,
then runs the ViT again with them: tokens inserted after the class token (L2P), or key/value
prefixes inside the attention of chosen blocks (DualPrompt, CODA-Prompt). Everything a
classification needs is inside the model, so evaluation, probes and a saved model all see the
same classifier. The prompter's auxiliary loss of the last forward pass (L2P's and DualPrompt's
pull constraint, CODA's orthogonality penalty) is left in ``aux_loss`` for the strategy.

Departures from the reference code, both for one classifier per image: prompt tokens go in
after the position embeddings are added (L2P widens the position embedding to them), and the
batch-wise prompt choice (the most frequent top-k of a batch) is used in training only, so an
image's prediction never depends on the other images of its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .peft import add_prefix_attention, freeze, query_features


@dataclass
class Prompts:
    """What a prompter returns for a batch."""

    tokens: torch.Tensor | None = None  # (B, T, dim) inserted after the class token
    prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # layer -> keys, values (B, H, L, hd)
    loss: torch.Tensor | None = None


def _l2(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    # the references' l2_normalize: x / max(||x||, 1e-6)
    return x * torch.rsqrt(torch.clamp((x ** 2).sum(dim=dim, keepdim=True), min=1e-12))


def top_k_keys(query: torch.Tensor, keys: torch.Tensor, k: int, *, batchwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys most cosine-similar to each query, (B, k) indices and the (B, pool)
    similarities. ``batchwise``: every image takes the batch's ``k`` most frequent choices."""
    similarity = _l2(query) @ _l2(keys).T
    index = similarity.topk(k, dim=1).indices
    if batchwise:
        ids, counts = torch.unique(index, return_counts=True)
        index = ids[counts.topk(min(k, len(ids))).indices].expand(len(query), -1)
    return index, similarity


def pull_constraint(query: torch.Tensor, keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """L2P's surrogate loss: the summed cosine similarity of each query to its chosen keys,
    over the batch (the strategy subtracts ``coefficient`` times it)."""
    return (_l2(keys)[index] * _l2(query).unsqueeze(1)).sum() / len(query)


class L2PPool(nn.Module):
    """L2P (Wang et al. 2022): a pool of ``pool_size`` prompts of ``length`` tokens with learned
    keys; the ``top_k`` closest keys' prompts are inserted at the input. ``batchwise`` applies in
    training; evaluation chooses per image unless ``eval_batchwise`` is set, as PILOT evaluates
    (each test batch's most frequent keys). That is not a strategy option: on PILOT's
    class-sorted test batches it tells the model which task a batch is from, and
    experiments/crosscheck/l2p_batchwise_leak.py sets it to measure by how much."""

    def __init__(self, dim: int, pool_size: int, length: int, top_k: int, batchwise: bool = True):
        super().__init__()
        self.prompts = nn.Parameter(torch.empty(pool_size, length, dim).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(pool_size, dim).uniform_(-1, 1))
        self.top_k, self.batchwise = top_k, batchwise
        self.eval_batchwise = False
        self.register_buffer("task", torch.tensor(0))
        self.prefix_layers: list[int] = []

    def forward(self, query: torch.Tensor) -> Prompts:
        batchwise = self.batchwise and (self.training or self.eval_batchwise)
        index, _ = top_k_keys(query, self.keys, self.top_k, batchwise=batchwise)
        tokens = self.prompts[index].reshape(len(query), -1, self.prompts.shape[-1])
        return Prompts(tokens=tokens, loss=-pull_constraint(query, self.keys, index))


def _heads(prompt: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, dim) -> (B, heads, L, dim / heads), as attention's keys and values are laid out."""
    b, length, dim = prompt.shape
    return prompt.reshape(b, length, heads, dim // heads).permute(0, 2, 1, 3)


class DualPrompts(nn.Module):
    """DualPrompt (Wang et al. 2022): a shared G-prompt as prefixes in the first blocks, and a
    pool of task E-prompts with keys as prefixes in the next ones. Training uses the current
    task's E-prompt (the reference's prompt mask); evaluation the one whose key is closest."""

    def __init__(self, dim: int, heads: int, *, g_length: int, g_layers: list[int], e_pool: int, e_length: int,
                 e_layers: list[int]):
        super().__init__()
        self.heads = heads
        self.g_layers, self.e_layers = list(g_layers), list(e_layers)
        self.g = nn.Parameter(torch.empty(len(g_layers), 2, g_length, dim).uniform_(-1, 1))
        self.e = nn.Parameter(torch.empty(len(e_layers), 2, e_pool, e_length, dim).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(e_pool, dim).uniform_(-1, 1))
        self.register_buffer("task", torch.tensor(0))
        self.prefix_layers = self.g_layers + self.e_layers

    def forward(self, query: torch.Tensor) -> Prompts:
        b = len(query)
        if self.training:
            index = torch.full((b, 1), int(self.task), device=query.device)
        else:
            index, _ = top_k_keys(query, self.keys, 1, batchwise=False)
        prefixes = {}
        for i, layer in enumerate(self.g_layers):
            keys, values = (self.g[i, j].expand(b, -1, -1) for j in (0, 1))
            prefixes[layer] = (_heads(keys, self.heads), _heads(values, self.heads))
        for i, layer in enumerate(self.e_layers):
            keys, values = (self.e[i, j][index[:, 0]] for j in (0, 1))
            prefixes[layer] = (_heads(keys, self.heads), _heads(values, self.heads))
        return Prompts(prefixes=prefixes, loss=-pull_constraint(query, self.keys, index))


class CodaPrompts(nn.Module):
    """CODA-Prompt (Smith et al. 2023): per layer, ``pool_size`` prompt components with keys and
    attention vectors; the prompt is ``sum_k alpha_k P_k`` with ``alpha_k = cos(q * A_k, K_k)``,
    its first half the key prefix, its second the value prefix. Each task adds its own
    ``pool_size / tasks`` components (Gram-Schmidt-orthogonal to the earlier ones, which stop
    learning); the orthogonality penalty keeps them apart."""

    def __init__(self, dim: int, heads: int, *, pool_size: int, length: int, layers: list[int], tasks: int,
                 ortho_weight: float):
        super().__init__()
        self.heads, self.layers, self.length = heads, list(layers), length
        self.per_task = max(1, pool_size // tasks)
        self.ortho_weight = ortho_weight
        self.components = nn.Parameter(torch.empty(len(layers), pool_size, length, dim).uniform_(0, 1))
        self.keys = nn.Parameter(torch.empty(len(layers), pool_size, dim).uniform_(0, 1))
        self.attention = nn.Parameter(torch.empty(len(layers), pool_size, dim).uniform_(0, 1))
        self.register_buffer("task", torch.tensor(0))
        self.prefix_layers = self.layers
        self.start_task(0)

    @torch.no_grad()
    def start_task(self, task: int) -> None:
        """Task ``task``'s components, keys and attention vectors: fresh normal draws made
        orthogonal to every earlier one by classical Gram-Schmidt, then unit length, as the
        reference re-initialises them at every task (its ``gram_schmidt``)."""
        self.task.fill_(task)
        s, f = task * self.per_task, (task + 1) * self.per_task
        for tensor in (self.components, self.keys, self.attention):
            for layer in range(len(self.layers)):
                flat = tensor[layer].reshape(tensor.shape[1], -1)
                new = torch.randn(f - s, flat.shape[1], generator=None).to(flat)
                basis = flat[:s]
                for row in range(f - s):
                    # classical: the projections of the draw itself, not of the running residual.
                    # The earlier tasks' trained rows are no longer orthogonal, so the two differ
                    draw = new[row].clone()
                    for previous in [*basis, *new[:row]]:
                        new[row] -= (draw @ previous) / (previous @ previous).clamp_min(1e-12) * previous
                    new[row] /= new[row].norm().clamp_min(1e-12)
                flat[s:f] = new
                tensor[layer] = flat.reshape(tensor[layer].shape)

    def mix(self, query: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s prompt for each query, (B, length, dim), and the weights alpha (B, k)."""
        f = (int(self.task) + 1) * self.per_task
        s = int(self.task) * self.per_task
        keys, attention, components = (t[layer, :f] for t in (self.keys, self.attention, self.components))
        if self.training and s > 0:  # the earlier tasks' components are fixed
            keys, attention, components = (torch.cat([t[:s].detach(), t[s:]]) for t in (keys, attention, components))
        weighted_query = query.unsqueeze(1) * attention.unsqueeze(0)  # (B, k, dim)
        alpha = (F.normalize(weighted_query, dim=2) * F.normalize(keys, dim=1).unsqueeze(0)).sum(dim=2)
        return torch.einsum("bk,kld->bld", alpha, components), alpha

    def forward(self, query: torch.Tensor) -> Prompts:
        prefixes, loss = {}, query.new_zeros(())
        half = self.length // 2
        for i, layer in enumerate(self.layers):
            prompt, _ = self.mix(query, i)
            prefixes[layer] = (_heads(prompt[:, :half], self.heads), _heads(prompt[:, half:], self.heads))
            if self.training and self.ortho_weight > 0:
                f = (int(self.task) + 1) * self.per_task
                for tensor in (self.keys[i, :f], self.attention[i, :f], self.components[i, :f].flatten(1)):
                    loss = loss + self.ortho_weight * _orthogonality(tensor)
        return Prompts(prefixes=prefixes, loss=loss)


def _orthogonality(t: torch.Tensor) -> torch.Tensor:
    return ((t @ t.T - torch.eye(len(t), device=t.device, dtype=t.dtype)) ** 2).mean()


class PromptedViT(nn.Module):
    """A frozen timm ViT run with the prompts a prompter picks from its query pass (see the
    module docstring). ``pool``: ``token`` (the class token) or ``prompt`` (the mean of the
    prompt tokens' outputs, L2P's head)."""

    def __init__(self, vit: nn.Module, prompter: nn.Module, pool: str = "token"):
        super().__init__()
        self.vit = freeze(vit)
        self.prompter = prompter
        self.pool = pool
        self.num_features = vit.num_features
        self.attentions = dict(zip(prompter.prefix_layers, add_prefix_attention(vit, prompter.prefix_layers)))
        self.aux_loss: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None
        vit.norm_pre.register_forward_hook(self._insert_tokens)

    def _insert_tokens(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        if self._tokens is None:
            return output
        prefix = self.vit.num_prefix_tokens
        return torch.cat([output[:, :prefix], self._tokens.to(output.dtype), output[:, prefix:]], dim=1)

    def train(self, mode: bool = True) -> "PromptedViT":
        super().train(mode)
        self.vit.eval()  # frozen, with its dropouts and batch statistics (if any) fixed, as the references
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        query = query_features(self.vit, x)
        prompts = self.prompter(query)
        self._tokens = prompts.tokens
        for layer, attention in self.attentions.items():
            attention.prefix = (prompts.prefixes or {}).get(layer)
        try:
            features = self.vit.forward_features(x)
        finally:
            self._tokens = None
            for attention in self.attentions.values():
                attention.prefix = None
        self.aux_loss = prompts.loss
        self._prompt_tokens = 0 if prompts.tokens is None else prompts.tokens.shape[1]
        return features

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        prefix = self.vit.num_prefix_tokens
        if self.pool == "prompt" and self._prompt_tokens:
            return self.vit.fc_norm(x[:, prefix:prefix + self._prompt_tokens].mean(dim=1))
        return self.vit.forward_head(x, pre_logits=True)  # the ViT's own pooling (the class token)

    def no_weight_decay(self) -> set[str]:
        return set()


def heads_of(vit: nn.Module) -> int:
    return int(vit.blocks[0].attn.num_heads)
