"""MiB (Cermelli et al., CVPR 2020): modelling the background shift.

Unbiased cross-entropy, unbiased distillation and the background-based initialisation of
the new classifier. Follows fcdl94/MiB ``argparser.py: modify_command_options`` for
``--method MiB`` (``loss_kd = 10``, ``unce``, ``unkd``, ``init_balanced``), the same for
every dataset and setting in the reference's scripts, and ``train.py: Trainer`` for how the
terms combine (``loss + loss_kd * UnbiasedKnowledgeDistillationLoss(alpha)``). At step 0
the unbiased cross-entropy is plain cross-entropy and ``loss_kd`` is 0 (no teacher).
"""
from __future__ import annotations

import math

import torch

from cssbench.losses import unbiased_cross_entropy, unbiased_knowledge_distillation
from cssbench.methods import register_method

from .lwf import LwF


@register_method('mib')
class MiB(LwF):
    """MiB: unbiased cross-entropy + unbiased distillation + background-based init."""

    def __init__(self, *args, loss_kd: float = 10.0, init_balanced: bool = True, **kwargs) -> None:
        super().__init__(*args, loss_kd=loss_kd, **kwargs)
        self.init_balanced = bool(init_balanced)

    def classification_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return unbiased_cross_entropy(logits, targets, self.num_old_classes, self.ignore_index)

    def distillation_loss(self, logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        return unbiased_knowledge_distillation(logits, old_logits, self.kd_alpha)

    @torch.no_grad()
    def init_new_classifier(self) -> None:
        """Reference ``segmentation_module.py: IncrementalSegmentationModule.init_new_classifier``
        (called from run.py when ``init_balanced``): every new class gets the background's
        weight and ``bias_bkg - log(N_new + 1)``, and the background's bias becomes that value
        too, so that p(bkg) + sum p(new) of the new model equals the old model's p(bkg)."""
        if not self.init_balanced or self.step == 0:
            return
        bkg = self.classifiers[0]
        new = self.classifiers[-1]
        new_bias = bkg.bias[0] - math.log(self.step_sizes[-1] + 1)
        new.weight.copy_(bkg.weight[0].expand_as(new.weight))
        new.bias.copy_(new_bias.expand_as(new.bias))
        bkg.bias[0] = new_bias
