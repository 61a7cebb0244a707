"""The segmentation metric of the reference code, and the old/new/all summaries of the tables.

One confusion matrix is accumulated over the whole evaluation set (fcdl94/MiB
``metrics/stream_metrics.py``); a class's IoU is TP / (TP + FP + FN), and the mean IoU is taken
over the classes that have ground-truth pixels in the set (a class absent from the ground truth
is left out even if it was predicted; one present but never predicted counts as 0).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from mmengine.evaluator import BaseMetric

from .datasets_info import DATASET_INFO, IGNORE_INDEX
from .registry import METRICS


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``cm[g, p]`` counts pixels of ground truth ``g`` predicted as ``p``; ignored pixels drop out."""
    valid = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    index = gt[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU per class; NaN for a class with no ground-truth pixels (excluded from means)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    gt_total, pred_total = cm.sum(axis=1), cm.sum(axis=0)
    with np.errstate(invalid='ignore', divide='ignore'):
        iou = tp / (gt_total + pred_total - tp)
    iou[gt_total == 0] = np.nan
    return iou


def mean_iou(values) -> float:
    """Mean over the classes that were scored (NaN ones left out); NaN if none was."""
    scored = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(scored)) if scored else math.nan


def range_label(classes) -> str:
    """A paper-style column name for a set of class ids: ``0-15``, ``16``, ``1-5,7``."""
    classes = sorted(classes)
    if not classes:
        return '-'
    parts, start = [], classes[0]
    for prev, cur in zip(classes, classes[1:] + [None]):
        if cur != prev + 1:
            parts.append(f'{start}' if start == prev else f'{start}-{prev}')
            start = cur
    return ','.join(parts)


@METRICS.register_module()
class IncrementalIoUMetric(BaseMetric):
    """mmengine metric: accumulates the confusion matrix of ``num_classes`` output channels.

    ``class_ids[i]`` is the class id of channel i; results are keyed by class id:
    ``{'mIoU': m, 'IoU.<id>': iou, ...}`` with NaN for classes absent from the ground truth.

    The matrix is summed on the device and read back once, at ``evaluate``; each process
    contributes its own matrix, and rank 0 sums them (mmengine's ``collect_results``).
    """

    def __init__(self, class_ids: list[int], ignore_index: int = IGNORE_INDEX, **kwargs) -> None:
        super().__init__(**kwargs)
        self.class_ids = list(class_ids)
        self.ignore_index = ignore_index
        self._cm: torch.Tensor | None = None

    def process(self, data_batch, data_samples) -> None:
        for output in data_samples:
            cm = confusion_matrix(output['pred'], output['gt'], len(self.class_ids), self.ignore_index)
            self._cm = cm if self._cm is None else self._cm + cm

    def evaluate(self, size: int) -> dict:
        if self._cm is not None:
            self.results.append(self._cm.cpu().numpy())
            self._cm = None
        return super().evaluate(size)

    def compute_metrics(self, results: list) -> dict[str, float]:
        cm = np.sum(results, axis=0)
        iou = iou_per_class(cm)
        metrics = {'mIoU': mean_iou(iou)}
        metrics.update({f'IoU.{c}': float(v) for c, v in zip(self.class_ids, iou)})
        return metrics


def column_classes(steps, dataset: str, step: int) -> dict[str, tuple[int, ...]]:
    """The classes each of the paper's columns averages after ``step``: step 0's (old), those
    added since (new), every one learned (all); background only where ``dataset`` scores it."""
    scored = DATASET_INFO[dataset].scored
    return dict(old=scored(steps[0]), new=scored(c for s in steps[1:step + 1] for c in s),
                all=scored(c for s in steps[:step + 1] for c in s))


def summarize_step(protocol, step: int, iou_by_class: dict[int, float]) -> dict:
    """The paper's columns after ``step``: base classes (step 0's), classes added since, all.

    Named by class ranges, e.g. ``0-15`` / ``16-20`` / ``all`` on VOC 15-1 at the last step
    (background counts among the base classes, as in the SDR and PLOP tables; ADE20K does not
    score it, so its base column is ``1-100``). Means skip classes absent from the ground
    truth; a column with no scored class has mIoU None (the results are JSON).
    """
    def column(classes):
        value = mean_iou([iou_by_class.get(c, math.nan) for c in classes])
        return dict(label=range_label(classes), mIoU=None if math.isnan(value) else value)

    columns = {name: column(classes)
               for name, classes in column_classes(protocol.steps, protocol.dataset, step).items()}
    columns['all']['label'] = 'all'
    return columns
