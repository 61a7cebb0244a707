"""ILT (Michieli & Zanuttigh, 2019): LwF's output distillation + L2 distillation of the encoder.

Follows fcdl94/MiB ``argparser.py: modify_command_options`` (``--method ILT``: ``loss_kd = 100``,
``loss_de = 100``) and ``train.py: Trainer.train``: ``lde = loss_de * nn.MSELoss()(
features['body'], features_old['body'])``, where ``body`` is the backbone's output (its last
stage, before the ASPP head: ``segmentation_module.py: _network`` returns ``x_b = self.body(x)``).
Here that is ``extract(inputs)['body'][-1]``. The step-0 loss dict carries ``loss_de = 0``.
"""
from __future__ import annotations

import torch

from cssbench.losses import feature_distillation
from cssbench.methods import register_method
from cssbench.models import LossWeight

from .lwf import LwF


@register_method('ilt')
class ILT(LwF):
    """ILT: cross-entropy + output distillation + L2 distillation of the backbone's features."""

    step0_kind = 'fine-tuning'
    settings_unused_at_step0 = (*LwF.settings_unused_at_step0, 'loss_de')

    def __init__(self, *args, loss_kd: LossWeight = 100.0,
                 loss_de: LossWeight = 100.0, **kwargs) -> None:
        super().__init__(*args, loss_kd=loss_kd, **kwargs)
        self.loss_de = float(loss_de)     # reference argparser.py: ILT -> loss_de = 100

    def needs_teacher(self) -> bool:
        return self.teacher is not None and (self.loss_kd > 0 or self.loss_de > 0)

    def compute_losses(self, out: dict, old: dict | None, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = super().compute_losses(out, old, targets)
        losses['loss_de'] = (self.loss_de * feature_distillation(out['body'][-1], old['body'][-1])
                             if old is not None and self.loss_de > 0 else out['logits'].new_zeros(()))
        return losses
