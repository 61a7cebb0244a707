"""The shared distillation losses as pure functions, against values computed independently.

Each loss is checked twice: on literal logits whose value is worked out by hand (logits that
are logs of small integers make every softmax a ratio of integers), and on seeded random
tensors against an elementwise re-computation with plain Python ``math``.
"""
from __future__ import annotations

import math

import pytest
import torch

from cssbench.losses import (cross_entropy, feature_distillation, knowledge_distillation,
                                        unbiased_cross_entropy, unbiased_knowledge_distillation)

IGN = 255
LN = math.log


def pixels(logits: list[list[float]]) -> torch.Tensor:
    """A 1 x C x 1 x P tensor whose pixel p has logits ``logits[p]``."""
    return torch.tensor(logits, dtype=torch.float64).T.reshape(1, len(logits[0]), 1, len(logits))


def rand(seed: int, shape=(2, 4, 2, 2)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def per_pixel(t: torch.Tensor):
    """Yield (b, h, w) and the list of channel values at that pixel."""
    b, _, h, w = t.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                yield (i, y, x), [float(v) for v in t[i, :, y, x]]


def log_softmax_list(z: list[float]) -> list[float]:
    den = math.log(sum(math.exp(v) for v in z))
    return [v - den for v in z]


def softmax_list(z: list[float]) -> list[float]:
    return [math.exp(v) for v in log_softmax_list(z)]


# The running example: one pixel with logits ln(1), ln(2), ln(3), ln(4): softmax = i / 10.
Z4 = [0.0, LN(2), LN(3), LN(4)]


# --- cross-entropy ------------------------------------------------------------------------

def test_cross_entropy_by_hand_averages_over_all_pixels_ignored_included():
    # pixel 0: target 2 -> -ln(3/10); pixel 1: target 3 -> -ln(4/10); pixel 2: ignored -> 0.
    logits = pixels([Z4, Z4, Z4])
    targets = torch.tensor([[[2, 3, IGN]]])
    expected = (-LN(0.3) - LN(0.4)) / 3  # 0.70675...
    assert cross_entropy(logits, targets).item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.7067545, abs=1e-7)


def test_cross_entropy_matches_an_elementwise_loop():
    logits = rand(0)
    targets = torch.tensor([[[0, 3], [IGN, 1]], [[2, 2], [0, IGN]]])
    total = 0.0
    for (b, y, x), z in per_pixel(logits):
        t = int(targets[b, y, x])
        total += 0.0 if t == IGN else -log_softmax_list(z)[t]
    assert cross_entropy(logits, targets).item() == pytest.approx(total / 8, abs=1e-12)


@pytest.mark.parametrize('loss', [lambda z, t: cross_entropy(z, t),
                                  lambda z, t: unbiased_cross_entropy(z, t, num_old=2)])
def test_a_batch_of_only_ignored_pixels_gives_zero_and_zero_gradient(loss):
    logits = rand(1).requires_grad_()
    targets = torch.full((2, 2, 2), IGN)
    value = loss(logits, targets)
    assert torch.isfinite(value) and value.item() == 0.0
    value.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# --- unbiased cross-entropy (MiB) ---------------------------------------------------------

def test_unbiased_cross_entropy_by_hand():
    # num_old = 2 (bkg, one old class), new classes 2 and 3. p(bkg) = (1 + 2) / 10.
    # targets: 1 (old -> background): -ln .3; 0: -ln .3; 3: -ln .4; ignored: 0.
    logits = pixels([Z4] * 4)
    targets = torch.tensor([[[1, 0, 3, IGN]]])
    expected = (-2 * LN(0.3) - LN(0.4)) / 4
    assert unbiased_cross_entropy(logits, targets, num_old=2).item() == pytest.approx(expected, abs=1e-12)


def unbiased_ce_loop(logits, targets, num_old):
    total = 0.0
    for (b, y, x), z in per_pixel(logits):
        t = int(targets[b, y, x])
        if t == IGN:
            continue
        lp = log_softmax_list(z)
        if t < num_old:
            total -= math.log(sum(math.exp(v) for v in lp[:num_old]))
        else:
            total -= lp[t]
    return total / targets.numel()


@pytest.mark.parametrize('targets', [
    [[[0, 3], [IGN, 1]], [[2, 2], [0, IGN]]],   # bkg, old, new and ignored pixels
    [[[3, 3], [2, 3]], [[2, IGN], [3, 2]]],     # no old-class (nor background) pixel
    [[[0, 0], [3, 0]], [[0, IGN], [0, 3]]],     # new class 2 absent from the batch
], ids=['mixed', 'no-old-pixels', 'class-absent'])
def test_unbiased_cross_entropy_matches_an_elementwise_loop(targets):
    logits, targets = rand(2), torch.tensor(targets)
    value = unbiased_cross_entropy(logits, targets, num_old=2)
    assert value.item() == pytest.approx(unbiased_ce_loop(logits, targets, 2), abs=1e-12)


def test_unbiased_cross_entropy_is_plain_cross_entropy_at_step_0_and_with_only_background_old():
    logits, targets = rand(3), torch.tensor([[[0, 3], [IGN, 1]], [[2, 2], [0, IGN]]])
    plain = cross_entropy(logits, targets)
    # step 0: no old class at all; num_old = 1: logsumexp over the background alone.
    assert unbiased_cross_entropy(logits, targets, num_old=0).item() == pytest.approx(plain.item())
    assert unbiased_cross_entropy(logits, targets, num_old=1).item() == pytest.approx(plain.item())


# --- knowledge distillation (LwF, ILT) ----------------------------------------------------

def test_knowledge_distillation_by_hand():
    # New model narrowed to the teacher's 3 channels: softmax(0, ln2, ln3) = (1, 2, 3) / 6;
    # teacher uniform. Loss = -(1/3) * sum_c (1/3) ln p_c = ln(36) / 9.
    student, teacher = pixels([Z4]), pixels([[0.0, 0.0, 0.0]])
    assert knowledge_distillation(student, teacher).item() == pytest.approx(LN(36) / 9, abs=1e-12)
    assert LN(36) / 9 == pytest.approx(0.3981688, abs=1e-7)


def test_knowledge_distillation_alpha_scales_only_the_teacher():
    # alpha = 2: softmax(2 * (0, ln2, 0)) = softmax(0, ln4, 0) = (1, 4, 1) / 6.
    # Loss = -(1/3) [1/6 ln(1/6) + 4/6 ln(2/6) + 1/6 ln(3/6)] = ln(6 * 81 * 2) / 18.
    student, teacher = pixels([Z4]), pixels([[0.0, LN(2), 0.0]])
    value = knowledge_distillation(student, teacher, alpha=2.0).item()
    assert value == pytest.approx(LN(972) / 18, abs=1e-12)


def test_knowledge_distillation_matches_an_elementwise_loop():
    student, teacher = rand(4), rand(5, (2, 3, 2, 2))
    total = 0.0
    for (b, y, x), z in per_pixel(student):
        q = softmax_list([float(v) for v in teacher[b, :, y, x]])
        lp = log_softmax_list(z[:3])
        total -= sum(qc * lc for qc, lc in zip(q, lp)) / 3
    assert knowledge_distillation(student, teacher).item() == pytest.approx(total / 8, abs=1e-12)


# --- unbiased knowledge distillation (MiB) ------------------------------------------------

def test_unbiased_knowledge_distillation_by_hand():
    # Teacher: bkg + 1 old class, uniform (1/2, 1/2). New model: channels 0, 1 old, 2, 3 new.
    # p(bkg or new) = (1 + 3 + 4) / 10, p(old 1) = 2 / 10; divided by the 2 teacher channels.
    student, teacher = pixels([Z4]), pixels([[0.0, 0.0]])
    expected = -(0.5 * LN(0.8) + 0.5 * LN(0.2)) / 2
    assert unbiased_knowledge_distillation(student, teacher).item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.4581454, abs=1e-7)


def test_unbiased_knowledge_distillation_matches_an_elementwise_loop():
    student, teacher = rand(6, (2, 5, 2, 2)), rand(7, (2, 3, 2, 2))  # 3 old channels, 2 new
    alpha = 1.5
    total = 0.0
    for (b, y, x), z in per_pixel(student):
        q = softmax_list([alpha * float(v) for v in teacher[b, :, y, x]])
        lp = log_softmax_list(z)
        bkg = math.log(math.exp(lp[0]) + math.exp(lp[3]) + math.exp(lp[4]))
        total -= (q[0] * bkg + q[1] * lp[1] + q[2] * lp[2]) / 3
    value = unbiased_knowledge_distillation(student, teacher, alpha=alpha).item()
    assert value == pytest.approx(total / 8, abs=1e-12)


def test_unbiased_knowledge_distillation_without_new_channels_is_plain_distillation_times_c():
    # With no new channel, UNKD is the sum over the old classes / C, exactly what KD averages.
    student, teacher = rand(8, (2, 3, 2, 2)), rand(9, (2, 3, 2, 2))
    assert unbiased_knowledge_distillation(student, teacher).item() == pytest.approx(
        knowledge_distillation(student, teacher).item(), abs=1e-12)


# --- feature distillation (ILT) -----------------------------------------------------------

def test_feature_distillation_is_the_mean_squared_error_over_every_element():
    new = torch.tensor([[[[1.0, 2.0]], [[0.0, -3.0]]]])   # 1 x 2 x 1 x 2
    old = torch.tensor([[[[0.0, 0.0]], [[1.0, -1.0]]]])
    assert feature_distillation(new, old).item() == pytest.approx((1 + 4 + 1 + 4) / 4)
