"""Tests of the IoU metric and the old/new/all summaries (benchmark/metrics.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cssbench.metrics import (IncrementalIoUMetric, confusion_matrix, iou_per_class, mean_iou,
                              range_label, summarize_step)
from cssbench.protocols import load_protocol

GT = torch.tensor([0, 0, 0, 1, 1, 2, 2, 255, 255, 1])
PRED = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 2, 1])
# counted by hand over the 8 pixels whose gt is not 255: cm[gt, pred]
CM = [[2, 1, 0],
      [0, 2, 1],
      [1, 0, 1]]


def test_confusion_matrix_hand_example() -> None:
    cm = confusion_matrix(PRED, GT, 3, ignore_index=255)
    assert cm.tolist() == CM
    assert int(cm.sum()) == 8


def test_confusion_matrix_2d_and_default_ignore() -> None:
    cm = confusion_matrix(PRED.reshape(2, 5), GT.reshape(2, 5), 3)
    assert cm.tolist() == CM


def test_confusion_matrix_drops_gt_outside_classes() -> None:
    gt = torch.tensor([0, 1, 5, 3])
    pred = torch.tensor([0, 0, 1, 1])
    assert confusion_matrix(pred, gt, 2).tolist() == [[1, 0], [1, 0]]


def test_iou_per_class_literal() -> None:
    iou = iou_per_class(np.array([[3, 1, 0], [1, 2, 0], [0, 0, 0]]))
    assert iou[0] == pytest.approx(3 / 5)
    assert iou[1] == pytest.approx(2 / 4)
    assert math.isnan(iou[2])


def test_iou_class_with_gt_never_predicted_is_zero() -> None:
    iou = iou_per_class([[2, 0], [3, 0]])
    assert iou[0] == pytest.approx(2 / 5)
    assert iou[1] == 0.0


def test_iou_class_predicted_but_absent_from_gt_is_nan() -> None:
    iou = iou_per_class([[1, 1], [0, 0]])
    assert iou[0] == pytest.approx(1 / 2)
    assert math.isnan(iou[1])


def test_mean_iou() -> None:
    assert mean_iou([0.6, 0.5, math.nan]) == pytest.approx(0.55)
    assert mean_iou([0.6, None, 0.0]) == pytest.approx(0.3)
    assert mean_iou(np.array([0.2, np.nan, 0.4])) == pytest.approx(0.3)
    assert math.isnan(mean_iou([math.nan, math.nan]))
    assert math.isnan(mean_iou([]))


@pytest.mark.parametrize('classes, label', [
    (list(range(16)), '0-15'),
    ([16], '16'),
    ([1, 2, 3, 5], '1-3,5'),
    ([5, 3, 1, 2], '1-3,5'),
    ([16, 17, 18, 19, 20], '16-20'),
    ([1, 3, 5], '1,3,5'),
    ([0, 1, 7, 8, 9, 12], '0-1,7-9,12'),
    ([], '-'),
])
def test_range_label(classes, label) -> None:
    assert range_label(classes) == label


IOU_15_1 = {0: 0.9, **{c: 0.5 for c in range(1, 16)},
            16: 0.1, 17: 0.2, 18: 0.3, 19: 0.4, 20: 0.5}


def test_summarize_step_last_step() -> None:
    s = summarize_step(load_protocol('voc-15-1-overlap'), 5, IOU_15_1)
    assert s['old']['label'] == '0-15'
    assert s['old']['mIoU'] == pytest.approx(8.4 / 16)      # (0.9 + 15 * 0.5) / 16
    assert s['new']['label'] == '16-20'
    assert s['new']['mIoU'] == pytest.approx(0.3)           # (0.1+0.2+0.3+0.4+0.5) / 5
    assert s['all']['label'] == 'all'
    assert s['all']['mIoU'] == pytest.approx(9.9 / 21)      # (8.4 + 1.5) / 21


def test_summarize_step_leaves_out_ade_background() -> None:
    # ADE20K does not score class 0: a stray IoU for it is not averaged in
    iou = {0: 0.9, **{c: 0.5 for c in range(1, 101)}, **{c: 0.2 for c in range(101, 151)}}
    s = summarize_step(load_protocol('ade-100-50'), 1, iou)
    assert s['old']['label'] == '1-100'
    assert s['old']['mIoU'] == pytest.approx(0.5)
    assert s['new']['label'] == '101-150'
    assert s['new']['mIoU'] == pytest.approx(0.2)
    assert s['all']['mIoU'] == pytest.approx(60 / 150)      # (100 * 0.5 + 50 * 0.2) / 150


def test_summarize_step_intermediate_and_missing_class() -> None:
    iou = dict(IOU_15_1)
    del iou[17]                                             # absent from the ground truth
    s = summarize_step(load_protocol('voc-15-1-overlap'), 2, iou)
    assert s['new']['label'] == '16-17'
    assert s['new']['mIoU'] == pytest.approx(0.1)
    assert s['all']['mIoU'] == pytest.approx(8.5 / 17)      # (8.4 + 0.1) / 17


def test_summarize_step_zero() -> None:
    s = summarize_step(load_protocol('voc-15-1-overlap'), 0, IOU_15_1)
    assert s['old']['mIoU'] == pytest.approx(8.4 / 16)
    assert s['new']['label'] == '-'
    assert s['new']['mIoU'] is None


def test_incremental_iou_metric_accumulates() -> None:
    metric = IncrementalIoUMetric(class_ids=[0, 1, 2])
    metric.process(None, [dict(pred=PRED, gt=GT)])
    metric.process(None, [dict(pred=torch.tensor([2, 2, 0]), gt=torch.tensor([2, 2, 255]))])
    # summed matrix [[2,1,0],[0,2,1],[1,0,3]]: IoU 2/4, 2/4, 3/5
    out = metric.evaluate(size=2)
    assert set(out) == {'mIoU', 'IoU.0', 'IoU.1', 'IoU.2'}
    assert out['IoU.0'] == pytest.approx(0.5)
    assert out['IoU.1'] == pytest.approx(0.5)
    assert out['IoU.2'] == pytest.approx(0.6)
    assert out['mIoU'] == pytest.approx(1.6 / 3)
    # evaluate starts the next evaluation from an empty matrix
    second = dict(pred=torch.tensor([2, 2, 0]), gt=torch.tensor([2, 2, 255]))
    metric.process(None, [second])
    alone = IncrementalIoUMetric(class_ids=[0, 1, 2])
    alone.process(None, [second])
    np.testing.assert_equal(metric.evaluate(size=1), alone.evaluate(size=1))  # NaN == NaN here


def test_incremental_iou_metric_keys_by_class_id_and_nan() -> None:
    # channels 0, 1, 2 are classes 0, 20, 16; channel 2 never in the ground truth
    metric = IncrementalIoUMetric(class_ids=[0, 20, 16])
    metric.process(None, [dict(pred=torch.tensor([[0, 1], [1, 2]]),
                               gt=torch.tensor([[0, 1], [0, 255]]))])
    # cm = [[1,1,0],[0,1,0],[0,0,0]]: IoU 1/2, 1/2, nan
    out = metric.evaluate(size=1)
    assert set(out) == {'mIoU', 'IoU.0', 'IoU.20', 'IoU.16'}
    assert out['IoU.0'] == pytest.approx(0.5)
    assert out['IoU.20'] == pytest.approx(0.5)
    assert math.isnan(out['IoU.16'])
    assert out['mIoU'] == pytest.approx(0.5)


def test_confusion_matrix_drops_an_ignore_index_inside_the_class_range() -> None:
    """``ignore_index`` is honoured by itself, not only through the ``gt < num_classes`` range
    check: with ignore_index = 1 and 3 classes, ground-truth 1 pixels drop out."""
    gt = torch.tensor([0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 2, 1])
    cm = confusion_matrix(pred, gt, 3, ignore_index=1)
    # kept pixels: (0->0), (2->2), (2->1)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert int(cm.sum()) == 3


def test_the_matrices_of_every_process_are_summed_before_the_ious() -> None:
    """Under torchrun each process hands its own matrix to ``compute_metrics`` (mmengine's
    collect_results): they are summed, then scored. [[2, 1], [0, 1]] + [[0, 0], [1, 2]] =
    [[2, 1], [1, 3]]: IoU 2 / (3 + 3 - 2) = 0.5 and 3 / (4 + 4 - 3) = 0.6, mean 0.55; the
    first matrix alone would give 2/3 and 1/2."""
    metric = IncrementalIoUMetric(class_ids=[0, 1])
    out = metric.compute_metrics([np.array([[2, 1], [0, 1]]), np.array([[0, 0], [1, 2]])])
    assert out['IoU.0'] == pytest.approx(0.5) and out['IoU.1'] == pytest.approx(0.6)
    assert out['mIoU'] == pytest.approx(0.55)


def test_confusion_matrix_drops_negative_gt_and_gt_equal_to_the_class_count() -> None:
    # Only 0 <= gt < num_classes is scored: -1 and num_classes itself (one past the last
    # class) drop out, as 5 does, instead of landing in another class's cells.
    gt = torch.tensor([0, -1, 2, 1, 2])
    pred = torch.tensor([0, 1, 0, 1, 1])
    assert confusion_matrix(pred, gt, 2).tolist() == [[1, 0], [0, 1]]


def test_confusion_matrix_of_uint8_masks_counts_like_int64() -> None:
    # Masks are stored as uint8: gt * num_classes + pred must not wrap at 256
    # (20 * 21 + 20 = 440 would land on 440 - 256 = 184 = cell [8, 16]).
    gt = torch.tensor([20, 20, 8, 0], dtype=torch.uint8)
    pred = torch.tensor([20, 16, 16, 0], dtype=torch.uint8)
    cm = confusion_matrix(pred, gt, 21)
    assert cm[20, 20] == 1 and cm[20, 16] == 1 and cm[8, 16] == 1 and cm[0, 0] == 1
    assert int(cm.sum()) == 4
    assert torch.equal(cm, confusion_matrix(pred.long(), gt.long(), 21))
