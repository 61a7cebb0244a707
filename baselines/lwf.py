"""Learning without Forgetting for segmentation: cross-entropy + output distillation.

Follows fcdl94/MiB (and LTTM/SDR, which keeps it): ``argparser.py: modify_command_options``
sets ``loss_kd = 100`` for ``--method LWF``; ``train.py: Trainer.train`` adds
``loss_kd * KnowledgeDistillationLoss(alpha)(outputs, outputs_old)`` to the cross-entropy,
the teacher's outputs computed under ``torch.no_grad()``.

The loss dict has the same keys at every step: at step 0 (no teacher) the distillation term
is a constant 0, as the reference's ``lkd = torch.tensor(0.)`` when there is no old model.
"""
from __future__ import annotations

import torch

from cssbench.losses import cross_entropy, knowledge_distillation
from cssbench.methods import register_method
from cssbench.models import IncrementalSegmentor, LossWeight


@register_method('lwf')
class LwF(IncrementalSegmentor):
    """LwF: cross-entropy + distillation of the old classes' outputs (Li & Hoiem)."""

    step0_kind = 'fine-tuning'   # no teacher at step 0: plain cross-entropy
    settings_unused_at_step0 = ('loss_kd', 'kd_alpha')

    def __init__(self, *args, loss_kd: LossWeight = 100.0, kd_alpha: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss_kd = float(loss_kd)     # reference argparser.py: LWF/ILT -> loss_kd = 100
        self.kd_alpha = float(kd_alpha)   # reference argparser.py: --alpha, default 1.

    def classification_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, targets, self.ignore_index)

    def distillation_loss(self, logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
        return knowledge_distillation(logits, old_logits, self.kd_alpha)

    def needs_teacher(self) -> bool:
        return self.teacher is not None and self.loss_kd > 0

    def teacher_outputs(self, inputs: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """The frozen previous model's ``encode_decode`` (no graph), or None without one."""
        if not self.needs_teacher():
            return None
        with torch.no_grad():
            return self.teacher.encode_decode(inputs)

    def compute_losses(self, out: dict, old: dict | None, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = out['logits']
        zero = logits.new_zeros(())
        losses = dict(loss_ce=self.classification_loss(logits, targets))
        losses['loss_kd'] = (self.loss_kd * self.distillation_loss(logits, old['logits'])
                             if old is not None and self.loss_kd > 0 else zero)
        return losses

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.encode_decode(inputs)  # once per batch, reused by every term
        return self.compute_losses(out, self.teacher_outputs(inputs), targets)
