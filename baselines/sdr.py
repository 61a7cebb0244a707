"""SDR (Michieli & Zanuttigh, CVPR 2021): prototypes matching, features sparsification and
attraction-repulsion (contrastive) losses on the latent space, alone or on top of MiB.

Facts from the reference code, LTTM/SDR (file: function), implemented here from scratch:

* Feature map. Every SDR term works on ``features['body']`` (reference ``train.py:
  Trainer.train``), the *backbone's* output before the ASPP head (``segmentation_module.py:
  IncrementalSegmentationModule._network`` returns ``x_b = self.body(x)``; ``feat_dim = 2048``
  is ResNet-101's layer4 width). Here: ``extract(inputs)['body'][-1]``.
* Labels are brought to the feature map's size by nearest interpolation (every loss in
  ``utils/loss.py`` does ``F.interpolate(labels, size=features.shape[2:], mode='nearest')``).
* Prototypes (``train.py: Trainer._update_running_stats``, called on *every training batch*
  before the losses, so the losses see the prototypes updated with the current batch): a
  cumulative moving average per class of the (detached) feature vectors whose ground-truth
  label is that class, ``p_c <- (sum_batch f + n_c p_c) / (n_c + N_batch)``, ``n_c += N_batch``,
  running over every batch of every epoch of the step. Background is left out at steps > 0
  (the disjoint/overlapped masking makes it contain old classes) and, with ``--overlap``, at
  step 0 too; 255 is left out. ``run.py`` keeps ``prototypes`` (num_classes x feat_dim) and
  ``count_features`` (num_classes, int64) in the step checkpoint and, at step t, starts from
  zeros with the previous rows copied in: here two persistent class-indexed buffers.
  They are updated during training (in ``loss``), not in ``after_step_training``.
* Prototypes matching (``utils/loss.py: DistillationEncoderPrototypesLoss``, the SDR preset's
  ``loss_de_prototypes_sumafter``): at steps > 0, the old classes are located by the *old
  model's prediction* (argmax of its upsampled logits, then nearest-downsampled) on the pixels
  whose ground truth is background; for each such class c != 0 present,
  ``MSE(mean of the current features at those pixels, p_c)`` (MSE averaged over channels),
  averaged over those classes. No such pixel: 0.
* Attraction (``FeaturesClusteringSeparationLoss``, ``loss_fc``): at steps > 0, for each class in
  the downsampled ground truth (background included, 255 left out), the MSE between its
  current feature vectors and its prototype (averaged over pixels and channels); the running
  sum is divided by the number of classes *inside* the loop (the reference's indentation), so
  the class visited i-th of K (ascending ids) is weighted ``K^-(K-i+1)``. That is the default
  here (``divide_in_loop=True``); ``False`` gives the plain mean over classes.
* Repulsion (same class, ``lfc_sep_clust``, default ``lfc_sep_clust_ison_proto=False``): the
  mean of the inverse Euclidean distances between the current batch's class means (same
  classes as the attraction) over every ordered pair of distinct classes, infinite values
  (zero distances) left out; fewer than two classes: 0.
* Sparsification (``FeaturesSparsificationLoss`` with the SDR preset ``max_maskedforclass`` /
  ``exponential`` / ``ratio``): each pixel's features are divided by the maximum feature value
  over all channels and pixels of its (downsampled ground-truth) class, + 1e-15; the classes
  are ``unique(labels)`` with 0 dropped only when it is the last one (i.e. when the batch holds
  background only: the loss is then 0); 255 counts as a class. Per pixel
  ``sum_c exp(f~_c) / (sum_c f~_c + 1e-15)``, averaged over every pixel. It has no step check
  in the reference; the reference's step-0 command does not enable it.
* Weights: ``argparser.py: modify_command_options`` for ``--method SDR`` (the reference's
  scripts, e.g. ``script_19_1_step1.slurm``, run exactly that preset for VOC): ``loss_kd = 100``,
  ``unce``, ``unkd``, ``loss_featspars = 1e-3``, ``loss_de_prototypes = 0.01``,
  ``loss_fc = 1e-3``, ``lfc_sep_clust = 1e-3``; ``--alpha`` 1. ``init_balanced`` is not set.
* Step 0: the reference trains step 0 as plain cross-entropy (the README's and
  ``script_19_1_step0.slurm``'s command: ``--unce`` is plain CE at step 0, and
  ``--loss_de_prototypes 1`` only so that the prototypes get accumulated; the matching and
  attraction losses return 0 at step 0). So SDR's step-0 *weights* train exactly like
  fine-tuning, but the step also produces the prototypes, accumulated over its training
  batches: a cached fine-tuning step-0 model lacks them, hence a step-0 kind of its own,
  shared by ``sdr`` and ``sdr+mib`` (whose step 0 is the same).

Deliberate differences from the reference code (where it does not do what it describes):

* Gathering a class's pixels: the reference indexes ``features[mask.expand(...)]`` (order
  b, c, h, w) and reshapes with ``.view(C, -1)`` (prototype update, attraction) or
  ``.view(-1, C)`` (matching), which mixes channels and pixels as soon as a class covers more
  than one pixel (matching) or the batch holds more than one image (update/attraction). Here a
  class's feature vectors are the per-pixel C-vectors, as the paper's formulas mean.
* Background exclusion in the prototype update: the reference drops the *first* present class
  (``cl_present[1:]``), which is a real class when a batch has no background pixel; here class
  0 is dropped.
* Repulsion's distances: the reference's ``torch.cdist`` computes them through the matrix
  product above 25 classes, where a class's distance to itself comes out small but not 0
  (about 0.01 for 2048-channel means), so its inverse counts among the pairs (35 times the
  mean of the others, measured on 30 random means). Here distances are exact and a class is
  never paired with itself. Only batches holding 26 classes or more differ (ADE20K steps).
* Under torchrun the prototype update sums each batch's per-class sums and counts over the
  processes, so every process keeps the prototypes of the whole batch; the reference updates
  each process's own from its share and saves rank 0's. One process: the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cssbench.datasets_info import IGNORE_INDEX
from cssbench.distributed import sum_over_processes
from cssbench.methods import register_method
from cssbench.models import LossWeight

from .lwf import LwF
from .mib import MiB

FS_EPS = 1e-15  # reference utils/loss.py: FeaturesSparsificationLoss.eps


# ----------------------------------------------------------------------------- pure functions
#
# Each term handles every class at once: per-class sums are one scatter over the pixels, and
# "the classes present" is a mask, never a Python list, so a training step reads nothing back
# from the device.

LABEL_VALUES = 256  # masks are uint8: every label, the ignored 255 included, is below this


def downsample_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """B x H x W labels to B x h x w by nearest interpolation (as every SDR loss does)."""
    down = F.interpolate(labels[:, None].double(), size=tuple(size), mode='nearest')
    return down[:, 0].long()


def _pixels(features: torch.Tensor) -> torch.Tensor:
    """B x C x h x w -> (B*h*w) x C feature vectors, one row per pixel."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def class_sums(rows: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
               num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each class c < ``num_classes``: the sum of the ``rows`` (one per pixel) labelled c
    where ``keep`` holds, and how many there are (``num_classes x ...``, ``num_classes``
    int64). Differentiable in ``rows``."""
    bins = torch.where(keep, labels, num_classes)  # the pixels left out share one extra bin
    sums = rows.new_zeros(num_classes + 1, *rows.shape[1:]).index_add(0, bins, rows)
    counts = torch.zeros(num_classes + 1, dtype=torch.long, device=labels.device)
    counts.index_add_(0, bins, torch.ones_like(bins))
    return sums[:num_classes], counts[:num_classes]


def update_prototypes(prototypes: torch.Tensor, counts: torch.Tensor, features: torch.Tensor,
                      labels_down: torch.Tensor, exclude_background: bool,
                      ignore_index: int = IGNORE_INDEX,
                      reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of the cumulative moving average (reference train.py:
    Trainer._update_running_stats): returns new (prototypes, counts), the inputs untouched.

    For each class c in ``labels_down`` (not ``ignore_index``, not 0 if ``exclude_background``),
    with the N feature vectors f of its pixels: ``p_c = (sum f + n_c p_c) / (n_c + N)``,
    ``n_c = n_c + N``. Other rows are kept. ``features`` is detached. ``reduce`` (in place,
    e.g. ``sum_over_processes``) is applied to the per-class sums and pixel counts first:
    under DDP every process then updates with the whole batch, and all keep equal prototypes.
    """
    feats, labels = _pixels(features.detach()).to(prototypes.dtype), labels_down.reshape(-1)
    keep = labels != ignore_index
    if exclude_background:
        keep &= labels != 0
    sums, batch_counts = class_sums(feats, labels, keep, prototypes.shape[0])
    if reduce is not None:
        reduce(sums)
        reduce(batch_counts)
    n = counts.to(prototypes.dtype)[:, None]
    updated = (sums + n * prototypes) / (n + batch_counts[:, None])
    return torch.where((batch_counts > 0)[:, None], updated, prototypes), counts + batch_counts


def old_class_pseudolabels(old_logits: torch.Tensor, labels_down: torch.Tensor) -> torch.Tensor:
    """Where the ground truth (downsampled) is background, the old model's predicted class
    (argmax of its logits at input size, then nearest-downsampled); 0 elsewhere (reference
    DistillationEncoderPrototypesLoss, not ``sequential``)."""
    pred = old_logits.argmax(dim=1)
    pred_down = downsample_labels(pred, labels_down.shape[-2:])
    return pred_down * (labels_down == 0).long()


def prototypes_matching_loss(features: torch.Tensor, pseudolabels: torch.Tensor,
                             prototypes: torch.Tensor) -> torch.Tensor:
    """SDR's prototypes matching (reference DistillationEncoderPrototypesLoss, sumafter):
    ``(1/K) sum_{c in K} mean_channels((mean_{pixels of c} f - p_c)^2)`` over the K classes
    != 0 in ``pseudolabels``; prototypes detached. 0 when K = 0."""
    labels = pseudolabels.reshape(-1)
    sums, counts = class_sums(_pixels(features), labels, labels != 0, prototypes.shape[0])
    present = counts > 0
    means = sums / counts.clamp(min=1)[:, None]
    per_class = (means - prototypes.detach()).pow(2).mean(dim=1)
    return (per_class * present).sum() / present.sum().clamp(min=1)


def attraction_loss(features: torch.Tensor, labels_down: torch.Tensor, prototypes: torch.Tensor,
                    ignore_index: int = IGNORE_INDEX, divide_in_loop: bool = True) -> torch.Tensor:
    """SDR's attraction of features to their class prototype (reference
    FeaturesClusteringSeparationLoss, first output): for each class c present (ascending ids,
    background included, ``ignore_index`` left out), ``l_c = mean((f - p_c)^2)`` over its
    pixels and channels. ``divide_in_loop`` (the reference): ``L <- (L + l_c) / K`` at each
    class, i.e. the i-th of the K classes weighted ``K^-(K-i+1)``; else ``L = mean_c l_c``.
    0 when no class is present."""
    feats, labels = _pixels(features), labels_down.reshape(-1)
    keep = labels != ignore_index
    own_prototype = prototypes.detach()[torch.where(keep, labels, 0)]
    squared = (feats - own_prototype).pow(2).sum(dim=1)
    sums, counts = class_sums(squared, labels, keep, prototypes.shape[0])
    per_class = sums / (counts.clamp(min=1) * feats.shape[1])
    present = counts > 0
    k = present.sum().to(per_class.dtype)
    if divide_in_loop:
        position = present.cumsum(dim=0).to(per_class.dtype)  # i, among the present classes
        weights = k.pow(position - k - 1)
    else:
        weights = 1 / k
    return (torch.where(present, weights, 0) * per_class).sum()


def repulsion_loss(features: torch.Tensor, labels_down: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """SDR's repulsion between classes (reference FeaturesClusteringSeparationLoss, second
    output, ``lfc_sep_clust_ison_proto=False``): the batch means m_c of the present classes
    (background included, ``ignore_index`` left out); the mean of ``1 / ||m_i - m_j||`` over the
    ordered pairs i != j with a non-zero distance; 0 when there is no such pair."""
    labels = labels_down.reshape(-1)
    sums, counts = class_sums(_pixels(features), labels, labels != ignore_index, LABEL_VALUES)
    present = counts > 0
    means = sums / counts.clamp(min=1)[:, None]
    # Differences, not the matrix-product expansion: close means keep their exact distance.
    dist = torch.cdist(means, means, compute_mode='donot_use_mm_for_euclid_dist')
    pairs = present[:, None] & present[None, :] & (dist > 0)  # the reference drops 1/0
    inverse = torch.where(pairs, dist, 1.0).reciprocal()
    return torch.where(pairs, inverse, 0).sum() / pairs.sum().clamp(min=1)


def sparsification_loss(features: torch.Tensor, labels_down: torch.Tensor,
                        eps: float = FS_EPS) -> torch.Tensor:
    """SDR's features sparsification (reference FeaturesSparsificationLoss, normalisation
    ``max_maskedforclass``, shrinking ``exponential``, loss ``ratio``).

    ``f~ = f / (max over every channel and pixel of the pixel's class + eps)``, the classes
    being ``unique(labels_down)`` with 0 dropped only if it is the largest (a background-only
    batch: f~ = 0, loss 0); 255 counts as a class. Per pixel ``sum_c exp(f~_c) / (sum_c f~_c +
    eps)``, averaged over every pixel; 0 if ``sum f~ <= 0``.
    """
    labels = labels_down.reshape(-1)
    peaks = features.new_full((LABEL_VALUES,), float('-inf')).scatter_reduce(
        0, labels, features.amax(dim=1).reshape(-1), 'amax')
    norm = features / (peaks[labels_down] + eps)[:, None]
    valid = (labels.amax() > 0) & (norm.sum() > 0)
    norm = torch.where(valid, norm, 1.0)  # the unused branch stays finite, and so its gradient
    loss = (norm.exp().sum(dim=1) / (norm.sum(dim=1) + eps)).mean()
    return torch.where(valid, loss, 0.0)


# ----------------------------------------------------------------------------- the methods

@register_method('sdr')
class SDR(LwF):
    """SDR: CE + output distillation + prototypes matching, attraction-repulsion, sparsification.

    The latent terms act on the backbone's features (Michieli & Zanuttigh, CVPR 2021). The
    cross-entropy and the output distillation are the plain ones (LwF's); the reference code's
    ``--method SDR`` preset turns on MiB's unbiased versions instead: ``sdr+mib``.

    Step 0: plain cross-entropy (fine-tuning's loss; every other term is 0) while the class
    prototypes are accumulated batch by batch: ``step0_kind`` is SDR's own.
    """

    step0_kind = 'fine-tuning+prototypes'
    # Not the prototype terms' weights: whether any is on decides whether step 0 gathers
    # prototypes; nor the sparsification's, which featspars_at_step0 applies at step 0.
    settings_unused_at_step0 = (*LwF.settings_unused_at_step0, 'lfc_divide_in_loop')
    class_indexed_buffers = ('prototypes', 'prototype_counts')

    def __init__(self, *args, loss_kd: LossWeight = 100.0, loss_de_prototypes: LossWeight = 0.01,
                 loss_fc: LossWeight = 1e-3, lfc_sep_clust: LossWeight = 1e-3,
                 loss_featspars: LossWeight = 1e-3,
                 lfc_divide_in_loop: bool = True,
                 featspars_at_step0: bool = False, **kwargs) -> None:
        super().__init__(*args, loss_kd=loss_kd, **kwargs)
        # reference argparser.py: modify_command_options, --method SDR
        self.loss_de_prototypes = float(loss_de_prototypes)  # prototypes matching
        self.loss_fc = float(loss_fc)                        # attraction
        self.lfc_sep_clust = float(lfc_sep_clust)            # repulsion
        self.loss_featspars = float(loss_featspars)          # sparsification
        # self.overlapped (the protocol's mode, reference --overlap) decides whether background
        # gets a step-0 prototype: with --overlap it is left out.
        self.lfc_divide_in_loop = bool(lfc_divide_in_loop)
        # The reference's step-0 command does not enable sparsification; True applies it there.
        self.featspars_at_step0 = bool(featspars_at_step0)
        dim, n = self.backbone.out_channels, sum(self.step_sizes)
        self.register_buffer('prototypes', torch.zeros(n, dim), persistent=True)
        self.register_buffer('prototype_counts', torch.zeros(n, dtype=torch.long), persistent=True)

    def needs_teacher(self) -> bool:
        return self.teacher is not None and (self.loss_kd > 0 or self.loss_de_prototypes > 0)

    def updates_prototypes(self) -> bool:
        # reference train.py: updated when any prototype-based loss is on, at every step
        return self.loss_de_prototypes > 0 or self.loss_fc > 0 or self.lfc_sep_clust > 0

    @torch.no_grad()
    def update_prototypes(self, features: torch.Tensor, labels_down: torch.Tensor) -> None:
        protos, counts = update_prototypes(
            self.prototypes, self.prototype_counts, features, labels_down,
            exclude_background=self.overlapped or self.step > 0, ignore_index=self.ignore_index,
            reduce=sum_over_processes)
        self.prototypes.copy_(protos)
        self.prototype_counts.copy_(counts)

    def compute_losses(self, out: dict, old: dict | None, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The losses of one batch, after its update of the class prototypes: as in the
        reference, they see this batch's update."""
        body = out['body'][-1]
        labels_down = downsample_labels(targets, body.shape[-2:])
        if self.updates_prototypes():
            self.update_prototypes(body, labels_down)
        losses = super().compute_losses(out, old, targets)
        feats = body.float()  # the latent losses in fp32 under autocast too
        zero = feats.new_zeros(())
        incremental = self.step > 0
        pm = fc = sep = fs = zero
        if incremental and old is not None and self.loss_de_prototypes > 0:
            pseudo = old_class_pseudolabels(old['logits'], labels_down)
            pm = self.loss_de_prototypes * prototypes_matching_loss(feats, pseudo, self.prototypes)
        if incremental and self.loss_fc > 0:
            fc = self.loss_fc * attraction_loss(feats, labels_down, self.prototypes, self.ignore_index,
                                                self.lfc_divide_in_loop)
        if incremental and self.lfc_sep_clust > 0:
            sep = self.lfc_sep_clust * repulsion_loss(feats, labels_down, self.ignore_index)
        if (incremental or self.featspars_at_step0) and self.loss_featspars > 0:
            fs = self.loss_featspars * sparsification_loss(feats, labels_down)
        losses.update(loss_pm=pm, loss_fc=fc, loss_sep=sep, loss_fs=fs)
        return losses


@register_method('sdr+mib')
class SDRMiB(SDR, MiB):
    """SDR on top of MiB: unbiased cross-entropy and distillation, MiB's classifier init.

    The reference's ``--method SDR`` preset is this with ``loss_kd = 100`` (unce, unkd) but
    without ``init_balanced``; ``init_balanced=True`` (MiB's) is the default here, as the
    method is SDR on top of MiB, and MiB initialises its new classifiers so.
    """

    step0_kind = SDR.step0_kind
    settings_unused_at_step0 = (*SDR.settings_unused_at_step0, 'init_balanced')

    def __init__(self, *args, loss_kd: LossWeight = 100.0, init_balanced: bool = True,
                 **kwargs) -> None:
        super().__init__(*args, loss_kd=loss_kd, init_balanced=init_balanced, **kwargs)
