"""Loss functions of the harness and the methods (plain, unbiased and distillation losses).

Each loss takes tensors and returns a scalar; the methods weight and combine them (POD's
helpers, ``local_pod_embedding`` and ``merge_new_into_background``, return tensors).
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

from .datasets_info import IGNORE_INDEX


def _pixel_mean_nll(log_probs: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    # reduction='none' gives 0 at ignored pixels; mean over all B*H*W pixels (reference
    # train.py: Trainer.train, ``loss = criterion(outputs, labels); loss = loss.mean()``).
    return F.nll_loss(log_probs, targets, ignore_index=ignore_index, reduction='none').mean()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Plain cross-entropy, averaged over all pixels (reference ``nn.CrossEntropyLoss(
    reduction='none')`` then ``.mean()`` in train.py: Trainer.train)."""
    return _pixel_mean_nll(torch.log_softmax(logits, dim=1), targets, ignore_index)


def unbiased_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_old: int,
                           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
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


# --- PLOP (Douillard et al., CVPR 2021; arthurdouillard/CVPR2021_PLOP) ---------------------


def local_pod_embedding(x: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """PLOP's local POD embedding of a B x C x H x W map, B x D (reference train.py: _local_pod).

    At each scale s the map is cut into s x s regions of (H // s) x (W // s) pixels (trailing
    rows/columns that do not fill a region are dropped, as in the reference); each region
    gives its width-pooled means (mean over the columns: C x rows values) and its
    height-pooled means (mean over the rows: C x columns values); all are concatenated.
    No normalisation (the reference's PLOP settings leave ``normalize`` off). The reference
    sizes the regions with ``W // s`` in both directions: the same on its square crops. The
    order of the entries differs from the reference's concatenation, which no distance
    below depends on.
    """
    b, c, h, w = x.shape
    if min(h, w) < max(scales):
        raise ValueError(f'local POD: a {h}x{w} map is smaller than the largest scale {max(scales)}')
    parts = []
    for s in scales:
        kh, kw = h // s, w // s
        regions = x[..., :s * kh, :s * kw].reshape(b, c, s, kh, s, kw)
        parts.append(regions.mean(dim=5).reshape(b, -1))   # width pooling: B, C, s, kh, s
        parts.append(regions.mean(dim=3).reshape(b, -1))   # height pooling: B, C, s, s, kw
    return torch.cat(parts, dim=1)


def merge_new_into_background(logits: torch.Tensor, num_old: int) -> torch.Tensor:
    """The new model's logits reduced to the old model's channels for POD on the logits
    (reference train.py: features_distillation, ``extra_channels: "sum"``): channel 0 becomes
    the background logit plus the sum of the new classes' logits (raw logits, not
    probabilities); the old classes 1..num_old-1 are kept."""
    return torch.cat([logits[:, :1] + logits[:, num_old:].sum(dim=1, keepdim=True),
                      logits[:, 1:num_old]], dim=1)


def pod_layer_distance(new: torch.Tensor, old: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """One map's local POD term: the maps are squared elementwise (reference ``pod_prepro =
    "pow"``), embedded (``local_pod_embedding``), and the L2 (Frobenius) norm of the
    difference of the two embeddings is taken per image, then averaged over the batch
    (reference train.py: features_distillation, ``torch.frobenius_norm(a - b, dim=-1)`` then
    ``torch.mean``)."""
    diff = local_pod_embedding(old.pow(2), scales) - local_pod_embedding(new.pow(2), scales)
    return torch.linalg.vector_norm(diff, dim=1).mean()


def pod_distillation(new_maps, old_maps, factors, scales=(1, 2, 4)) -> torch.Tensor:
    """PLOP's POD loss over several maps: ``(1/L) sum_l factor_l * pod_layer_distance(l)``.

    ``L = len(new_maps)`` counts every map, those with a factor <= 0 too (they are skipped,
    as in the reference's ``continue``); the reference divides by the number of maps
    (train.py: features_distillation, ``loss / len(list_attentions_a)``). The maps must
    have the same shapes pairwise (reduce the new logits with ``merge_new_into_background``
    first). The caller multiplies by the adaptive factor sqrt(n_seen / n_new).
    """
    if len(new_maps) != len(old_maps) or len(new_maps) != len(factors):
        raise ValueError('pod_distillation: as many new maps, old maps and factors are needed')
    loss = new_maps[0].new_zeros(())
    for new, old, factor in zip(new_maps, old_maps, factors):
        if new.shape != old.shape:
            raise ValueError(f'pod_distillation: shapes differ: {tuple(new.shape)} vs {tuple(old.shape)}')
        if factor > 0:
            loss = loss + factor * pod_layer_distance(new, old, scales)
    return loss / len(new_maps)


def image_weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy whose pixel losses are multiplied by a per-image weight (B,) and then
    averaged over every pixel of the batch, ignored pixels counting as 0 (PLOP's
    ``classif_adaptive_factor * loss`` then ``loss.mean()`` in reference train.py:
    Trainer.train). With all weights 1 it is ``cross_entropy``."""
    pixel = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction='none')
    return (weights.to(pixel.dtype).view(-1, 1, 1) * pixel).mean()
