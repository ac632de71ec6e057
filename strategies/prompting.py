"""L2P, DualPrompt and CODA-Prompt: prompts learned on a frozen pre-trained ViT.

The backbone becomes a :class:`incremental.models.prompts.PromptedViT` (the ViT frozen, its
query pass, the prompter); the prompts, their keys and the linear head train. As in PILOT's
``l2p``, ``dualprompt`` and ``coda_prompt``: the cross-entropy covers the current experience's
classes only, and the prompter's loss is added (L2P and DualPrompt: minus ``pull_coefficient``
times the summed query-key similarity; CODA: its orthogonality penalty). L2P's and DualPrompt's
new head rows start as timm's ViT head (``head_init``), and DualPrompt's E-prompt of a task as
the previous task's (``e_prompt_init``), as PILOT's configs run them. Each method's equations are
in its prompter's docstring.
"""

from __future__ import annotations

from typing import Any

import torch

from incremental.errors import ConfigError
from incremental.models.peft import vision_transformer
from incremental.models.prompts import CodaPrompts, DualPrompts, L2PPool, PromptedViT, heads_of
from incremental.strategy import StrategyContext, StrategyPlugin

from .options import CodaPromptConfig, DualPromptConfig, L2PConfig
from .pretrained import init_head_rows, loss_on_current_classes


class PromptStrategy(StrategyPlugin):
    """What the three share: the model surgery, the task index, the masked loss, the prompt loss."""

    pool = "token"
    loss_weight = 1.0
    layer_fields: tuple[str, ...] = ()  # the config's lists of block indices

    def prompter(self, vit: Any) -> Any:  # pragma: no cover - each method's own
        raise NotImplementedError

    def prepare_model(self, model: Any) -> None:
        vit = vision_transformer(model.backbone)
        for field in self.layer_fields:
            beyond = [layer for layer in getattr(self.config, field) if layer >= len(vit.blocks)]
            if beyond:
                raise ConfigError(f"blocks {beyond} do not exist: the backbone has {len(vit.blocks)} "
                                  f"(0..{len(vit.blocks) - 1})", key=f"strategy.{field}")
        prompter = self.prompter(vit)
        model.backbone = PromptedViT(vit, prompter, pool=self.pool)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        strategy.model.backbone.prompter.task.fill_(strategy.experience.current_experience)
        if getattr(self.config, "head_init", "linear") == "trunc_normal":
            labels = self.context.class_split.label_ranges()[strategy.experience.current_experience]
            init_head_rows(strategy.model.head.classifier, labels)

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        loss_on_current_classes(strategy, self.context)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        loss = strategy.model.backbone.aux_loss
        if loss is not None and self.loss_weight:
            strategy.loss = strategy.loss + self.loss_weight * loss


class L2P(PromptStrategy):
    """L2P: a prompt pool with learned keys on a frozen pre-trained ViT."""

    def __init__(self, config: L2PConfig, context: StrategyContext):
        super().__init__(config, context)
        self.pool, self.loss_weight = config.pool, config.pull_coefficient

    def prompter(self, vit: Any) -> Any:
        c = self.config
        return L2PPool(vit.embed_dim, c.pool_size, c.length, c.top_k, c.batchwise)


class DualPrompt(PromptStrategy):
    """DualPrompt: a shared G-prompt and task E-prompts as attention prefixes."""

    layer_fields = ("g_layers", "e_layers")

    def __init__(self, config: DualPromptConfig, context: StrategyContext):
        super().__init__(config, context)
        self.loss_weight = config.pull_coefficient

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        super().before_training_exp(strategy, **kwargs)
        experience = strategy.experience.current_experience
        prompts = strategy.model.backbone.prompter
        if self.config.e_prompt_init == "previous" and 0 < experience < prompts.e.shape[2]:
            with torch.no_grad():  # the previous task's E-prompt, PILOT's shared_prompt_pool
                prompts.e[:, :, experience] = prompts.e[:, :, experience - 1]

    def prompter(self, vit: Any) -> Any:
        c = self.config
        return DualPrompts(vit.embed_dim, heads_of(vit), g_length=c.g_length, g_layers=c.g_layers,
                           e_pool=c.pool_size or self.context.class_split.num_experiences, e_length=c.e_length,
                           e_layers=c.e_layers)


class CodaPrompt(PromptStrategy):
    """CODA-Prompt: attention-weighted prompt components as attention prefixes."""

    layer_fields = ("layers",)

    def __init__(self, config: CodaPromptConfig, context: StrategyContext):
        super().__init__(config, context)

    def prompter(self, vit: Any) -> Any:
        c = self.config
        return CodaPrompts(vit.embed_dim, heads_of(vit), pool_size=c.pool_size, length=c.length, layers=c.layers,
                           tasks=self.context.class_split.num_experiences, ortho_weight=c.ortho_weight)

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        experience = strategy.experience.current_experience
        prompter = strategy.model.backbone.prompter
        if experience > 0:
            prompter.start_task(experience)  # this task's own components, orthogonal to the rest
        prompter.task.fill_(experience)
