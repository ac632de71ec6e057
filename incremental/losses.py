"""Losses shared by strategies."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def logit_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """Hinton et al. 2015 knowledge distillation on the teacher's classes:
    ``T^2 * KL(softmax(teacher/T) || softmax(student[:, :C_old]/T))``, batch mean.

    The student's extra (new-class) outputs are left out, as in LwF/iCaRL-style CIL KD. The
    ``T^2`` factor keeps the gradient scale independent of ``T`` (Hinton et al., sec. 2). The
    loss is exactly zero when the student's old-class logits equal the teacher's.
    """
    old = teacher_logits.shape[1]
    log_student = F.log_softmax(student_logits[:, :old].float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def soft_target_cross_entropy(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``-sum softmax(teacher / T) log_softmax(logits / T)``, batch mean: PyCIL's and PILOT's
    ``_KD_loss`` (a cross-entropy, not a KL, and no T^2), which their DGR and Coil distil with."""
    return -(teacher.div(temperature).softmax(dim=1) * logits.div(temperature).log_softmax(dim=1)).sum(1).mean()
