"""PROOF's classifier (Zhou et al., "Learning without Forgetting for Vision-Language Models",
TPAMI 2025, arXiv 2305.19270), as an output adapter over a frozen CLIP's normalised image embedding.

Per experience t it adds a linear projection for images and one for text (their outputs are
summed over experiences: ``P_i(z) = sum_t W_t z + b_t``) and ``prompt_length`` context prompts.
For an image embedding ``z``, the projected, normalised image ``z'``, text ``T'`` (one row per
seen class) and visual prototypes ``P'`` (class means of the CLIP image embeddings) go through
one self-attention layer with the context prompts ``C`` (PROOF's cross-modal fusion, the
repository's one-head ``MultiHeadAttention`` with a residual and LayerNorm), giving ``z^, T^, P^``.
The logits are ``z^ T^ + z^ P^ + z' T'`` (the last: the projected zero-shot term).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class FusionAttention(nn.Module):
    """One-head scaled dot-product self-attention with a residual and a post LayerNorm, as
    PROOF's ``MultiHeadAttention(1, d, d, d)`` (its initialisation included)."""

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        for layer in (self.query, self.key, self.value):
            nn.init.normal_(layer.weight, mean=0.0, std=math.sqrt(2.0 / (dim + dim)))
        self.out = nn.Linear(dim, dim)
        nn.init.xavier_normal_(self.out.weight)
        self.attention_dropout = nn.Dropout(dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(tokens), self.key(tokens), self.value(tokens)
        attention = (q @ k.transpose(1, 2) / math.sqrt(tokens.shape[-1])).softmax(dim=-1)
        mixed = self.attention_dropout(attention) @ v
        return self.norm(self.dropout(self.out(mixed)) + tokens)


class ProofOutput(nn.Module):
    """PROOF's projections, fusion and prototypes (see the module docstring).

    Buffers: ``prototypes`` (classes, d), ``text_features`` (templates, classes, d): the frozen
    CLIP's normalised text embedding of each class in each template; ``batch_fusion``: the
    ``fusion`` option, so a saved model classifies as it was trained."""

    def __init__(self, dim: int, *, prompt_length: int, dropout: float = 0.1, fusion: str = "instance"):
        super().__init__()
        self.dim, self.prompt_length = dim, prompt_length
        self.image_projections = nn.ModuleList()
        self.text_projections = nn.ModuleList()
        self.context_prompts = nn.ParameterList()
        self.attention = FusionAttention(dim, dropout)
        self.register_buffer("prototypes", torch.zeros(0, dim))
        self.register_buffer("text_features", torch.zeros(1, 0, dim))
        self.register_buffer("batch_fusion", torch.tensor(fusion == "batch"))
        self.aux_outputs: tuple[torch.Tensor, ...] | None = None  # the last training forward's, for the loss

    @property
    def fusion(self) -> str:
        return "batch" if bool(self.batch_fusion) else "instance"

    @property
    def experiences(self) -> int:
        return len(self.image_projections)

    def add_experience(self) -> None:
        """New projections and prompts; the old image projections and prompts stop training, the
        text projections all keep training (the repository's ``freeze_projection_weight_new``)."""
        for module in self.image_projections:
            module.requires_grad_(False)
        for prompt in self.context_prompts:
            prompt.requires_grad_(False)
        device = self.prototypes.device
        self.image_projections.append(nn.Linear(self.dim, self.dim).to(device))
        self.text_projections.append(nn.Linear(self.dim, self.dim).to(device))
        self.context_prompts.append(nn.Parameter(torch.randn(self.prompt_length, self.dim, device=device)))

    @staticmethod
    def project(projections: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """The sum of every experience's projection of ``x``, L2-normalised."""
        return F.normalize(torch.stack([p(x) for p in projections]).sum(dim=0), dim=-1)

    def projected_text(self, template: int | None = None) -> torch.Tensor:
        """(classes, d): the projected text of one template, or the normalised mean over all."""
        if template is not None:
            return self.project(self.text_projections, self.text_features[template])
        return F.normalize(self.project(self.text_projections, self.text_features).mean(dim=0), dim=-1)

    def fuse(self, image: torch.Tensor, text: torch.Tensor, prototypes: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fusion attention over [image, text, prototypes, context prompts]: fused image (B, d),
        text and prototypes (B, C, d); under ``fusion: batch`` the fused text and prototypes are
        averaged over the batch, as the repository's code does."""
        batch, classes = len(image), len(text)
        prompts = torch.cat(list(self.context_prompts))
        tokens = torch.cat([image[:, None], text.expand(batch, -1, -1), prototypes.expand(batch, -1, -1),
                            prompts.expand(batch, -1, -1)], dim=1)
        fused = self.attention(tokens)
        fused_text, fused_prototypes = fused[:, 1:1 + classes], fused[:, 1 + classes:1 + 2 * classes]
        if self.fusion == "batch":
            fused_text = fused_text.mean(dim=0, keepdim=True).expand(batch, -1, -1)
            fused_prototypes = fused_prototypes.mean(dim=0, keepdim=True).expand(batch, -1, -1)
        return fused[:, 0], fused_text, fused_prototypes

    def logits_parts(self, pooled: torch.Tensor, template: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z^ T^``, ``z^ P^`` and ``z' T'`` (each (B, classes)), with ``z'`` and ``T'``."""
        image = self.project(self.image_projections, pooled.float())
        text = self.projected_text(template)
        prototypes = self.project(self.image_projections, self.prototypes)
        fused_image, fused_text, fused_prototypes = self.fuse(image, text, prototypes)
        text_logits = torch.einsum("bd,bcd->bc", fused_image, fused_text)
        prototype_logits = torch.einsum("bd,bcd->bc", fused_image, fused_prototypes)
        return text_logits, prototype_logits, image @ text.T, image, text

    def forward(self, pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        text_logits, prototype_logits, zero_shot, _, _ = self.logits_parts(pooled)
        return text_logits + prototype_logits + zero_shot

    def training_logits(self, pooled: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        """Training's ``z^ T^`` over the first template; the other terms of PROOF's loss (``z^ P^``,
        ``z'``, ``T'`` and CLIP's ``exp(logit_scale)``) are kept in :attr:`aux_outputs`. Called from
        the model's forward (the head's), so under DDP they belong to the wrapper's outputs."""
        text_logits, prototype_logits, _, image, text = self.logits_parts(pooled, template=0)
        self.aux_outputs = (prototype_logits, image, text, logit_scale.exp())
        return text_logits

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "ProofOutput":
        """An empty ProofOutput shaped to take ``tensors`` (a saved state, keys without prefix)."""
        dim = int(tensors["prototypes"].shape[1])
        experiences = sum(1 for k in tensors if k.startswith("image_projections.") and k.endswith(".weight"))
        prompt_length = int(tensors["context_prompts.0"].shape[0]) if experiences else 1
        module = cls(dim, prompt_length=prompt_length, fusion="batch" if bool(tensors["batch_fusion"]) else "instance")
        for _ in range(experiences):
            module.add_experience()
        module.prototypes = torch.zeros_like(tensors["prototypes"])
        module.text_features = torch.zeros_like(tensors["text_features"])
        return module
