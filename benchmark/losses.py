"""Loss functions of the harness and the methods (plain, unbiased and distillation losses).

Each function takes tensors and returns a scalar; the methods weight and combine them.
Shapes: ``logits`` B x C x H x W (the model's outputs, upsampled to the input size, as the
reference distils them), ``targets`` B x H x W int64 output-channel ids.

Averaging follows the reference Trainer (fcdl94/MiB and LTTM/SDR ``train.py: Trainer.train``):
the pixel losses are computed with ``reduction='none'`` and then ``.mean()`` over *every*
pixel of the batch, ignored pixels counting as 0. A batch whose pixels are all ignored thus
gives 0, not NaN (``F.cross_entropy(..., reduction='mean')`` would divide 0 by 0), and its
gradient is 0. The distillation losses take no mask: the reference calls them with
``mask=None`` and averages over every pixel as well.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pixel_mean_nll(log_probs: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # reduction='none' gives 0 at ignored pixels; mean over all B*H*W pixels (reference
    # train.py: Trainer.train, ``loss = criterion(outputs, labels); loss = loss.mean()``).
    return F.nll_loss(log_probs, targets, ignore_index=ignore_index, reduction='none').mean()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Plain cross-entropy, averaged over all pixels (reference ``nn.CrossEntropyLoss(
    reduction='none')`` then ``.mean()`` in train.py: Trainer.train)."""
    return _pixel_mean_nll(torch.log_softmax(logits, dim=1), targets, ignore_index)


def unbiased_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_old: int,
                           ignore_index: int = 255) -> torch.Tensor:
    """MiB's unbiased cross-entropy (reference utils/loss.py: UnbiasedCrossEntropy).

    The background's log-probability is logsumexp over the background and every old class
    (channels ``0..num_old-1``) minus the softmax normaliser; a new class keeps its own
    log-probability. Targets below ``num_old`` count as background (as the reference's
    ``labels[targets < old_cl] = 0``). With ``num_old == 0`` (step 0) it is plain
    cross-entropy, as the reference uses ``nn.CrossEntropyLoss`` when ``old_classes == 0``.
    """
    if num_old == 0:
        return cross_entropy(logits, targets, ignore_index)
    den = torch.logsumexp(logits, dim=1, keepdim=True)
    log_bkg = torch.logsumexp(logits[:, :num_old], dim=1, keepdim=True) - den
    log_new = logits[:, num_old:] - den
    log_probs = torch.cat([log_bkg, log_new], dim=1)  # channel 0 = bkg+old, then the new ones
    # Relabel to the compact channels: old/bkg -> 0, new class c -> c - num_old + 1.
    valid = targets != ignore_index
    compact = torch.where(targets >= num_old, targets - num_old + 1, torch.zeros_like(targets))
    compact = torch.where(valid, compact, targets)
    return _pixel_mean_nll(log_probs, compact, ignore_index)


def knowledge_distillation(logits: torch.Tensor, old_logits: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """LwF-style output distillation (reference utils/loss.py: KnowledgeDistillationLoss).

    The new model's logits are narrowed to the teacher's channels; the loss is
    ``-mean_pixels( mean_classes( log_softmax(new_old) * softmax(alpha * old) ) )``: averaged
    over the old classes (``.mean(dim=1)``) then over every pixel. ``alpha`` multiplies only
    the teacher's logits (an inverse temperature; no T^2 factor), 1 by default (argparser.py
    ``--alpha``).
    """
    n_old = old_logits.shape[1]
    log_p = torch.log_softmax(logits[:, :n_old], dim=1)
    q = torch.softmax(old_logits * alpha, dim=1)
    return -(log_p * q).mean(dim=1).mean()


def unbiased_knowledge_distillation(logits: torch.Tensor, old_logits: torch.Tensor,
                                    alpha: float = 1.0) -> torch.Tensor:
    """MiB's unbiased distillation (reference utils/loss.py: UnbiasedKnowledgeDistillationLoss).

    The teacher's background probability is matched against the new model's probability of
    background or any new class (logsumexp over channel 0 and the new channels minus the
    normaliser); the old classes 1..n_old-1 match one to one. The pixel loss is divided by the
    teacher's number of channels (background included), then averaged over every pixel.
    ``alpha`` scales the teacher's logits, as in the reference.
    """
    n_old = old_logits.shape[1]
    den = torch.logsumexp(logits, dim=1)
    bkg_and_new = torch.cat([logits[:, :1], logits[:, n_old:]], dim=1)
    log_bkg = torch.logsumexp(bkg_and_new, dim=1) - den            # B, H, W
    log_old = logits[:, 1:n_old] - den.unsqueeze(1)                 # B, n_old-1, H, W
    q = torch.softmax(old_logits * alpha, dim=1)
    per_pixel = (q[:, 0] * log_bkg + (q[:, 1:] * log_old).sum(dim=1)) / n_old
    return -per_pixel.mean()


def feature_distillation(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """ILT's encoder distillation: mean squared error over every element (reference
    fcdl94/MiB train.py: Trainer, ``nn.MSELoss()`` on ``features['body']``; LTTM/SDR
    utils/loss.py: DistillationEncoderLoss without its mask)."""
    return F.mse_loss(features, old_features)
