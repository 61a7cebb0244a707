"""MiB (Cermelli et al., CVPR 2020): modelling the background shift.

Unbiased cross-entropy, unbiased distillation and the background-based initialisation of
the new classifier. Follows fcdl94/MiB ``argparser.py: modify_command_options`` for
``--method MiB`` (``loss_kd = 10``, ``unce``, ``unkd``, ``init_balanced``), the same for
every dataset and setting in the reference's scripts, and ``train.py: Trainer`` for how the
terms combine (``loss + loss_kd * UnbiasedKnowledgeDistillationLoss(alpha)``). At step 0
the unbiased cross-entropy is plain cross-entropy and ``loss_kd`` is 0 (no teacher).
"""
from __future__ import annotations

import torch

from cssbench.losses import unbiased_cross_entropy, unbiased_knowledge_distillation
from cssbench.methods import register_method
from cssbench.models import LossWeight, init_classifier_from_background

from .lwf import LwF


@register_method('mib')
class MiB(LwF):
    """MiB: unbiased cross-entropy + unbiased distillation + background-based init."""

    step0_kind = 'fine-tuning'   # the unbiased cross-entropy without old classes is the plain one
    settings_unused_at_step0 = (*LwF.settings_unused_at_step0, 'init_balanced')

    def __init__(self, *args, loss_kd: LossWeight = 10.0, init_balanced: bool = True, **kwargs) -> None:
        super().__init__(*args, loss_kd=loss_kd, **kwargs)
        self.init_balanced = bool(init_balanced)

    def classification_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return unbiased_cross_entropy(logits, targets, self.num_old_classes, self.ignore_index)

    def distillation_loss(self, logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        return unbiased_knowledge_distillation(logits, old_logits, self.kd_alpha)

    def init_new_classifier(self) -> None:
        if self.init_balanced and self.step > 0:
            init_classifier_from_background(self)
