"""PROOF (Zhou et al., "Learning without Forgetting for Vision-Language Models", TPAMI 2025;
the authors' code at github.com/zhoudw-zdw/PROOF, ``models/proof.py`` and ``utils/inc_net.py``).

CLIP stays frozen (its logit scale trains, as in the repository). Before each experience the
classifier (:class:`incremental.models.proof.ProofOutput`) gets a new image and text projection
and new context prompts, and the new classes get their visual prototypes (the mean CLIP image
embedding of their training images, eval transforms) and their text embeddings (each template).
Training, on the new data plus herding exemplars, minimises the repository's three terms:

    CE(z^ T^, y) + CE(z^ P^, y) + CLIP's contrastive loss between z' and T'_y

with the text of the first template (open_clip's ``ClipLoss``, whose batch positives are the
pairs of an image and its own label's text). Evaluation adds the projected zero-shot term z' T'
over the ensemble of templates.

The fusion follows the repository by default (``fusion: batch``: the fused text and prototype
tokens are averaged over the batch, so an image's logits depend on the rest of its batch);
``fusion: instance`` gives each image its own tokens, as the paper writes it. One departure
remains, measured in experiments/crosscheck/reference.md: the projections take the
L2-normalised CLIP embeddings (the pooled features every strategy sees) and the projected image
is normalised in training and evaluation. The repository projects the unnormalised CLIP
embeddings and normalises the projected image in training only. With the toolkit's
normalisation patched into the reference, the gap between the two on the digits harness goes
from +3.6 to +0.4 points of last accuracy, both within the seed std.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.nn import functional as F

from incremental.distributed import gather_rows_with_grad
from incremental.models.peft import freeze
from incremental.models.proof import ProofOutput
from incremental.strategy import StrategyContext

from .options import PROOFConfig
from .pretrained import class_means, experience_features
from .replay import ExemplarReplay


class ProofTrainingHead:
    """A forward hook on the linear head: in training, the head's output becomes PROOF's
    ``z^ T^`` (:meth:`ProofOutput.training_logits`); evaluation classifies through the adapter
    (``IncrementalNet.classify``). It holds the model weakly, and a copied model's hook points at
    the copy."""

    def __init__(self, model: Any):
        self.model = weakref.ref(model)

    def __call__(self, head: Any, inputs: tuple[torch.Tensor, ...], logits: torch.Tensor) -> Any:
        model = self.model()
        if model is None or not head.training or not isinstance(model.output_adapter, ProofOutput):
            return None
        return model.output_adapter.training_logits(inputs[0], model.backbone.model.logit_scale)

    def __deepcopy__(self, memo: dict) -> "ProofTrainingHead":
        original = self.model()
        return ProofTrainingHead(memo.get(id(original), original))


class PROOF(ExemplarReplay):
    """PROOF: frozen CLIP, per-experience projections and cross-modal fusion with replay."""

    def __init__(self, config: PROOFConfig, context: StrategyContext):
        super().__init__(config, context)
        from open_clip.loss import ClipLoss

        self.clip_loss = ClipLoss()
        self.extra_loss: torch.Tensor | None = None

    def prepare_model(self, model: Any) -> None:
        backbone = self.context.require_text_tower(model, "proof")
        freeze(model)  # CLIP and the unused linear head
        backbone.model.logit_scale.requires_grad_(True)
        model.output_adapter = ProofOutput(model.num_features, prompt_length=self.config.prompt_length,
                                           dropout=self.config.dropout, fusion=self.config.fusion)
        # In training the head's output is PROOF's: computed inside the model's forward, so the
        # classifier's and the logit scale's gradients are averaged over ranks under DDP.
        model.head.register_forward_hook(ProofTrainingHead(model))

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        model, experience = strategy.model, strategy.experience.current_experience
        classifier: ProofOutput = model.output_adapter
        labels = self.context.class_split.label_ranges()[experience]
        features, targets = experience_features(strategy, experience, self.context)
        means = class_means(features, targets)
        new_prototypes = torch.stack([means[label] for label in labels]).to(classifier.prototypes)
        new_text = torch.stack([self.context.text_embeddings(model.backbone, labels, [template])
                                for template in self.context.prompt_templates()]).to(classifier.text_features)
        classifier.prototypes = torch.cat([classifier.prototypes, new_prototypes])
        old_text = classifier.text_features if labels.start else new_text[:, :0]  # (templates, 0, d) at first
        classifier.text_features = torch.cat([old_text, new_text], dim=1)
        classifier.add_experience()

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        classifier: ProofOutput = strategy.model.output_adapter
        prototype_logits, image, text, scale = classifier.aux_outputs
        classifier.aux_outputs = None  # the graph goes with the loss (and a copied model holds none)
        # the contrastive loss over the global batch, as in one process (each rank's shard alone
        # would have fewer negatives: log 2 lower at 2 ranks); the engine's shard weights sum to
        # the world size, so the gradients come out as one process's
        images, texts = gather_rows_with_grad(image.float()), gather_rows_with_grad(text[strategy.mb_y].float())
        self.extra_loss = F.cross_entropy(prototype_logits.float(), strategy.mb_y) + \
            self.clip_loss(images, texts, scale)

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.extra_loss is not None:
            strategy.loss = strategy.loss + self.extra_loss
            self.extra_loss = None

    def load_state_dict(self, state: dict[str, Any], model: Any) -> None:
        super().load_state_dict(state, model)
        # the checkpoint rebuilt the classifier from its tensors; dropout is an option, not a tensor
        attention = model.output_adapter.attention
        attention.dropout.p = attention.attention_dropout.p = self.config.dropout
