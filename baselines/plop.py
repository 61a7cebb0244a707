"""PLOP (Douillard et al., CVPR 2021): local POD distillation + entropy-based pseudo-labels.

Follows arthurdouillard/CVPR2021_PLOP. ``argparser.py: modify_command_options`` for
``--method PLOP`` (used unchanged by every VOC script, ``scripts/voc/plop_*.sh``) sets
``pod = "local"``, ``pod_factor = 0.01``, ``pod_logits = True``, ``pod_options = {"switch":
{"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}``, ``pseudo =
"entropy"``, ``threshold = 0.001``, ``classif_adaptive_factor = True``, ``init_balanced = True``;
``loss_kd`` stays 0 and the cross-entropy is the plain one (no ``unce``). ``train.py: Trainer``
combines the terms as ``loss_ce + pod_loss``:

* Pseudo-labels (``Trainer.train``, ``pseudo == "entropy"``): at step t > 0, every pixel
  labelled background (target < number of old classes) takes the old model's argmax where
  the old model's normalised entropy is below its class's threshold, else it is ignored
  (255). The per-pixel cross-entropy of each image is multiplied by the share of its
  background pixels that got a pseudo-label (``classif_adaptive_factor = num / (den +
  1e-6)``; 0 for an image with no background pixel), then averaged over every pixel.
* Thresholds (``Trainer.before`` -> ``Trainer.find_median(mode="entropy")``): once before a
  step's training, the old model labels the step's training data; per predicted class, a
  100-bin histogram of the normalised entropy of background pixels gives an (approximate)
  median; the threshold is ``max(median, threshold)``. Here the harness hook
  ``before_step_training(dataloader)`` calls ``compute_thresholds``; see there for the
  fallback when no hook ran.
* POD (``features_distillation`` with ``collapse_channels = "local"``): on the four backbone
  stages, the head's output (``x_pl``, the classifier's input) and, ``pod_logits``, the
  classifier's logits at feature resolution, the new logits' new-class channels summed into
  the background channel. Squared maps, local pooling at scales 1, 2, 4 (``spp_scales``),
  per-image L2 distance, weights 0.01 (maps) and 0.0005 (logits), divided by the number of
  maps (6), times sqrt(n_seen / n_new) (``use_pod_schedule``, on by default).
* Classifier init (``segmentation_module.py: init_new_classifier``, ``init_balanced``):
  MiB's; new classes copy the background's weight, bias ``b_bkg - log(N_new + 1)``, and the
  background bias becomes that value too.

Step 0 is plain cross-entropy, averaged over all pixels, exactly as fine-tuning: no old
model, hence no POD and no pseudo-labels (``pod_loss`` is a constant 0 then).

PLOP's paper setting keeps the 255 ("void") pixels ignored when training (the reference's
VOC dataset maps 255 to 255), and scores classes not yet learned as background: run it on a
protocol with ``train_ignore: ignore`` and ``eval_unseen: background``, such as the shipped
``voc-15-1-overlap-plop``. With the harness default (255 -> background) those pixels become
background and may be pseudo-labelled.

Known differences from the reference, kept explicit:

* The backbone maps: the reference distils, per ResNet stage, the last block's residual sum
  *before* its activation (``models/resnet.py``, ``ResidualBlock`` returns ``act, x``); the
  harness's ``extract`` exposes the stages' activated outputs, which are used here.
* The head map is ``extract``'s ``features``, the head's output before any classifier
  dropout, as the reference's head (which has no dropout) gives it.
* Non-square maps: regions are ``(H // s) x (W // s)``; the reference uses ``W // s`` for
  both sides (identical on its square 512 x 512 crops).
* Epochs: ``scripts/voc/plop_10-1.sh`` trains the incremental steps of 10-1 for 10 epochs
  (its other VOC scripts, 30). The harness trains every step of every method for the
  config's epochs, so that the methods compare on one schedule.
* Under torchrun the entropy histograms are summed over the processes before the thresholds
  are taken, so every process thresholds with the whole step's data; the reference's
  ``find_median`` runs on each process's shard alone. One process: the same.
"""
from __future__ import annotations

import math
import warnings

import torch

from cssbench.datasets_info import IGNORE_INDEX
from cssbench.distributed import sum_over_processes
from cssbench.losses import (cross_entropy, image_weighted_cross_entropy, merge_new_into_background,
                             pod_distillation)
from cssbench.methods import register_method
from cssbench.models import (IncrementalSegmentor, LossWeight, init_classifier_from_background,
                             upsample_logits)


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """PLOP's per-pixel entropy (reference train.py: entropy): ``-(1 / log C) * mean_c p_c
    log(p_c + 1e-8)`` over the C channels of ``probs`` (B x C x H x W) -> B x H x W. The
    reference averages over the classes (not a sum), so the value lies in [0, 1/C]."""
    factor = 1.0 / math.log(probs.shape[1] + 1e-8)
    return -factor * (probs * torch.log(probs + 1e-8)).mean(dim=1)


def entropy_histogram(old_logits: torch.Tensor, targets: torch.Tensor, num_classes: int,
                      max_entropy: float, nb_bins: int = 100) -> torch.Tensor:
    """One batch's share of ``find_median``'s histograms (reference train.py:
    Trainer.find_median, ``mode="entropy"``): over the pixels whose target is 0, the old
    model's argmax class (row) and its normalised entropy divided by ``max_entropy``, cut
    into ``nb_bins`` bins of [0, 1] (the last bin takes everything above). Returns the
    counts, ``num_classes x nb_bins`` int64."""
    probs = torch.softmax(old_logits.float(), dim=1)
    pseudo = probs.argmax(dim=1)
    mask = targets == 0
    values = normalized_entropy(probs)[mask] / max_entropy
    rows = pseudo[mask]
    cols = torch.clamp((values * nb_bins).long(), max=nb_bins - 1)
    hist = torch.zeros(num_classes * nb_bins, dtype=torch.long, device=old_logits.device)
    hist.index_add_(0, rows * nb_bins + cols, torch.ones_like(rows))
    return hist.view(num_classes, nb_bins)


def median_thresholds(histograms: torch.Tensor, base_threshold: float) -> torch.Tensor:
    """Per-class thresholds from the entropy histograms, as reference train.py:
    Trainer.find_median computes them, quirks included:

    * scanning the bins k = 0, 1, ..., the median bin is the first where ``running <= half
      <= running + count[k]`` (``half`` = half the class's pixel count); but after a bin the
      reference adds the bin's *index* to ``running`` (``running_sum += lower_border *
      nb_bins``), not its count, and takes the bin index as ``int(k / nb_bins * nb_bins)``
      (floating point: e.g. 28 for k = 29 with 100 bins). Both are reproduced.
    * median = ``k / nb_bins + (half - running) / count[bin] / nb_bins``; a class with no
      pixel gets 0; a 0 / 0 (a bin of count 0 picked when ``half == running``) gives NaN,
      which no entropy passes (no pseudo-label of that class), as in the reference.
    * threshold = ``max(median, base_threshold)`` (entropy mode).
    """
    num_classes, nb_bins = histograms.shape
    hist = histograms.detach().cpu()
    thresholds = torch.zeros(num_classes, dtype=torch.float32)
    for c in range(num_classes):
        total = hist[c].sum()
        if total <= 0:
            continue
        half = total / 2                                    # float32, as the reference
        running = 0.0
        for k in range(nb_bins):
            lower = k / nb_bins
            index = int(lower * nb_bins)
            if running <= half <= running + hist[c, index]:
                break
            running += lower * nb_bins                      # the reference's bug: the index
        count = hist[c, index].float()
        thresholds[c] = lower + (half - running) / count * (1 / nb_bins)
    # Python's max(median, base) as the reference: NaN stays NaN.
    return torch.where(torch.isnan(thresholds), thresholds, thresholds.clamp(min=base_threshold))


@torch.no_grad()
def entropy_pseudo_labels(targets: torch.Tensor, old_logits: torch.Tensor, thresholds: torch.Tensor,
                          max_entropy: float, num_old: int, ignore_index: int = IGNORE_INDEX,
                          min_factor: float = 0.0):
    """PLOP's pseudo-labelled targets and per-image loss factor (reference train.py:
    Trainer.train, ``pseudo == "entropy"`` with ``classif_adaptive_factor``).

    Background pixels (``targets < num_old``) take the old model's argmax where
    ``normalized_entropy / max_entropy < thresholds[argmax]``, else ``ignore_index``; other
    pixels keep their target. The factor of an image is (background pixels pseudo-labelled)
    / (background pixels + 1e-6), clamped below at ``min_factor`` when it is > 0.
    Returns (labels B x H x W, factor B).
    """
    probs = torch.softmax(old_logits.float(), dim=1)
    pseudo = probs.argmax(dim=1)
    valid = normalized_entropy(probs) / max_entropy < thresholds.to(probs.device)[pseudo]
    background = targets < num_old
    # torch.where, not boolean-mask assignment: no host sync on the GPU
    labels = torch.where(background, torch.where(valid, pseudo, ignore_index), targets)
    num = (background & valid).float().sum(dim=(1, 2))
    den = background.float().sum(dim=(1, 2))
    factor = num / (den + 1e-6)
    if min_factor:
        factor = factor.clamp(min=min_factor)
    return labels, factor


@register_method('plop')
class PLOP(IncrementalSegmentor):
    """PLOP: local POD on features and logits + entropy-filtered pseudo-labels (Douillard et al.)."""

    step0_kind = 'fine-tuning'  # step 0: plain cross-entropy, exactly fine-tuning
    settings_unused_at_step0 = ('pod_factor', 'pod_logits_factor', 'pod_logits', 'pod_scales',
                                'pod_schedule', 'pseudo', 'threshold', 'entropy_bins',
                                'classif_adaptive_factor', 'classif_adaptive_min_factor',
                                'init_balanced')
    # The reference's ADE20K scripts (scripts/ade/plop_ade_*.sh): --pod_factor 0.001 and
    # pod_options switch.after.factor 0.00001; the signature's defaults are its VOC ones.
    dataset_defaults = {'ade': dict(pod_factor=0.001, pod_logits_factor=1e-5)}

    def __init__(self, *args, pod_factor: LossWeight = 0.01,
                 pod_logits_factor: LossWeight = 0.0005,
                 pod_logits: bool = True, pod_scales=(1, 2, 4), pod_schedule: bool = True,
                 pseudo: str | None = 'entropy',
                 threshold: float = 0.001, entropy_bins: int = 100,
                 classif_adaptive_factor: bool = True, classif_adaptive_min_factor: float = 0.0,
                 init_balanced: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pod_factor = float(pod_factor)                 # argparser.py PLOP: pod_factor = 0.01
        self.pod_logits_factor = float(pod_logits_factor)   # pod_options switch.after.factor = 0.0005
        self.pod_logits = bool(pod_logits)                  # PLOP: pod_logits = True
        self.pod_scales = tuple(int(s) for s in pod_scales)  # --spp_scales default [1, 2, 4]
        self.pod_schedule = bool(pod_schedule)              # not --no_pod_schedule: sqrt(n_seen/n_new)
        if pseudo not in ('entropy', None):
            raise ValueError(f'PLOP: pseudo must be "entropy" or None, got {pseudo!r}')
        self.pseudo = pseudo                                # PLOP: pseudo = "entropy"
        self.threshold = float(threshold)                   # PLOP: threshold = 0.001
        self.entropy_bins = int(entropy_bins)               # find_median: nb_bins = 100 (entropy)
        self.classif_adaptive_factor = bool(classif_adaptive_factor)  # PLOP: True
        self.classif_adaptive_min_factor = float(classif_adaptive_min_factor)  # argparser default 0.
        self.init_balanced = bool(init_balanced)            # PLOP: init_balanced = True
        self.thresholds: torch.Tensor | None = None         # per class; set by compute_thresholds

    @property
    def max_entropy(self) -> float:
        """find_median's ``max_value``: log of the number of classes seen so far."""
        return math.log(sum(self.step_sizes))

    def init_new_classifier(self) -> None:
        if self.init_balanced and self.step > 0:
            init_classifier_from_background(self)

    def forward_maps(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """One forward: the logits (input size), the logits at feature size and the maps POD
        distils (backbone stages, head output, see the module docstring)."""
        out = self.extract(inputs)
        small = self.classify(out['features'])
        logits = upsample_logits(small, inputs.shape[-2:])
        return dict(logits=logits, small_logits=small, maps=list(out['body']) + [out['features']])

    def needs_teacher(self) -> bool:
        return self.teacher is not None

    def teacher_outputs(self, inputs: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if not self.needs_teacher():
            return None
        with torch.no_grad():  # the teacher is a PLOP model too (the runner builds it so)
            return self.teacher.forward_maps(inputs)

    # -- thresholds -----------------------------------------------------------------------

    @torch.no_grad()
    def compute_thresholds(self, batches) -> torch.Tensor | None:
        """The entropy thresholds of this step (reference Trainer.before -> find_median):
        ``batches`` yields the training loader's batches (dicts as the data preprocessor
        takes them); the teacher labels them, the histograms are summed and turned into
        thresholds (``median_thresholds``). Sets and returns ``self.thresholds`` (one per
        class seen so far); None at step 0 or without pseudo-labelling."""
        if self.teacher is None or self.pseudo is None or self.step == 0:
            self.thresholds = None
            return None
        num_classes = sum(self.step_sizes)
        hist = torch.zeros(num_classes, self.entropy_bins, dtype=torch.long,
                           device=self.data_preprocessor.device)
        for batch in batches:
            data = self.data_preprocessor(batch, False)
            logits = self.teacher_outputs(data['inputs'])['logits']
            hist += entropy_histogram(logits, data['data_samples'], num_classes, self.max_entropy,
                                      self.entropy_bins)
        # Under DDP each process saw its share of the data: every one takes the whole's thresholds.
        sum_over_processes(hist)
        self.thresholds = median_thresholds(hist, self.threshold).to(hist.device)
        return self.thresholds

    def before_step_training(self, dataloader) -> None:
        """Harness hook, before the step's first epoch (and again when it resumes training):
        the thresholds over the whole training loader, as the reference's ``Trainer.before``."""
        self.compute_thresholds(dataloader)

    # -- losses ---------------------------------------------------------------------------

    def compute_losses(self, out: dict, old: dict | None, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = out['logits']
        zero = logits.new_zeros(())
        if old is None or self.step == 0:  # step 0: plain cross-entropy, as fine-tuning
            return dict(loss_ce=cross_entropy(logits, targets, self.ignore_index), loss_pod=zero)
        labels, weights = targets, logits.new_ones(logits.shape[0])
        if self.pseudo == 'entropy':
            if self.thresholds is None:
                # Fallback when no before_step_training hook ran: thresholds from this (the
                # step's first) batch alone, then kept for the rest of the step.
                warnings.warn('PLOP: no before_step_training pass; entropy thresholds are '
                              'computed from the first training batch only', stacklevel=2)
                hist = entropy_histogram(old['logits'], targets, sum(self.step_sizes),
                                         self.max_entropy, self.entropy_bins)
                self.thresholds = median_thresholds(hist, self.threshold)
            labels, factor = entropy_pseudo_labels(
                targets, old['logits'], self.thresholds, self.max_entropy, self.num_old_classes,
                self.ignore_index, self.classif_adaptive_min_factor)
            if self.classif_adaptive_factor:
                weights = factor
        losses = dict(loss_ce=image_weighted_cross_entropy(logits, labels, weights, self.ignore_index))
        new_maps, old_maps = list(out['maps']), list(old['maps'])
        factors = [self.pod_factor] * len(new_maps)
        if self.pod_logits:
            new_maps.append(merge_new_into_background(out['small_logits'], self.num_old_classes))
            old_maps.append(old['small_logits'])
            factors.append(self.pod_logits_factor)
        pod = pod_distillation(new_maps, old_maps, factors, self.pod_scales)
        if self.pod_schedule:
            pod = pod * math.sqrt(sum(self.step_sizes) / self.step_sizes[-1])
        losses['loss_pod'] = pod
        return losses

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.forward_maps(inputs)  # once per batch, reused by every term
        return self.compute_losses(out, self.teacher_outputs(inputs), targets)
