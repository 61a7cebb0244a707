"""SDR and SDR+MiB: each latent loss against hand-computed values and, with its gradient,
against a per-class loop of its definition; the prototypes' running update, the
class-indexed buffers across steps, the loss terms of a step-1 model, and a two-step
protocol run end to end."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cssbench.baselines.sdr import (attraction_loss, downsample_labels, old_class_pseudolabels,
                                    prototypes_matching_loss, repulsion_loss, sparsification_loss,
                                    update_prototypes)
from cssbench.config import load_config
from cssbench.losses import (cross_entropy, knowledge_distillation, unbiased_cross_entropy,
                             unbiased_knowledge_distillation)
from cssbench.methods import get_method
from cssbench.protocols import load_protocol
from cssbench.runner import build_model, load_previous_weights, run_protocol
from conftest import method_model

KEYS = {'loss_ce', 'loss_kd', 'loss_pm', 'loss_fc', 'loss_sep', 'loss_fs'}


def fmap(pixels) -> torch.Tensor:
    """A 1 x C x h x w feature map from an h x w grid of C-vectors."""
    return torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None]


# --------------------------------------------------------------------------- labels

def test_labels_are_downsampled_by_nearest_interpolation():
    labels = torch.arange(16).view(1, 4, 4)
    assert downsample_labels(labels, (2, 2)).tolist() == [[[0, 2], [8, 10]]]
    assert downsample_labels(torch.full((1, 4, 4), 255), (2, 2)).unique().tolist() == [255]


def test_old_class_pseudolabels_are_the_old_prediction_on_ground_truth_background():
    old = torch.zeros(1, 3, 4, 4)
    old[0, 1, :2] = 5.0   # top half predicted 1
    old[0, 2, 2:] = 5.0   # bottom half predicted 2
    old[0, 0, 0, 2] = 9.0  # except this pixel (kept by nearest: row 0, col 2) -> 0
    labels_down = torch.tensor([[[0, 0], [17, 0]]])  # (1, 0) is a new class: not background
    assert old_class_pseudolabels(old, labels_down).tolist() == [[[1, 0], [0, 2]]]


# --------------------------------------------------------------------------- prototypes

def test_prototype_running_update_over_two_batches_by_hand():
    protos, counts = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    f1 = fmap([[[1, 2], [3, 4]], [[5, 5], [7, 1]]])
    l1 = torch.tensor([[[1, 1], [0, 255]]])
    p, n = update_prototypes(protos, counts, f1, l1, exclude_background=False)
    assert protos.abs().sum() == 0 and counts.sum() == 0  # inputs untouched
    torch.testing.assert_close(p, torch.tensor([[5., 5.], [2., 3.], [0., 0.]]))
    assert n.tolist() == [1, 2, 0]  # 255 not counted
    f2 = fmap([[[8, 9], [0, 6]], [[1, 1], [2, 2]]])
    l2 = torch.tensor([[[1, 2], [0, 0]]])
    # step > 0: background left out; class 1: ([8, 9] + 2 * [2, 3]) / 3 = [4, 5]
    p2, n2 = update_prototypes(p, n, f2, l2, exclude_background=True)
    torch.testing.assert_close(p2, torch.tensor([[5., 5.], [4., 5.], [0., 6.]]))
    assert n2.tolist() == [1, 3, 1]
    # with background: ([1, 1] + [2, 2] + 1 * [5, 5]) / 3
    p3, n3 = update_prototypes(p, n, f2, l2, exclude_background=False)
    torch.testing.assert_close(p3[0], torch.tensor([8 / 3, 8 / 3]))
    assert n3.tolist() == [3, 3, 1]


def test_prototype_update_gathers_per_pixel_vectors_across_a_batch():
    torch.manual_seed(0)
    feats = torch.rand(3, 4, 2, 3)
    labels = torch.randint(0, 3, (3, 2, 3))
    p, n = update_prototypes(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), feats, labels, False)
    for c in range(3):
        vecs = [feats[b, :, i, j] for b in range(3) for i in range(2) for j in range(3)
                if labels[b, i, j] == c]
        assert n[c] == len(vecs)
        torch.testing.assert_close(p[c], torch.stack(vecs).mean(0))


# --------------------------------------------------------------------------- the losses

def test_prototypes_matching_by_hand():
    feats = fmap([[[1, 2], [3, 4]], [[5, 5], [7, 1]]]).requires_grad_()
    pseudo = torch.tensor([[[1, 1], [2, 0]]])
    protos = torch.tensor([[9., 9.], [0., 0.], [5., 3.]])
    # class 1: mean [2, 3] vs [0, 0] -> (4 + 9) / 2; class 2: [5, 5] vs [5, 3] -> 4 / 2
    loss = prototypes_matching_loss(feats, pseudo, protos)
    assert loss.item() == pytest.approx((6.5 + 2.0) / 2)
    loss.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad[0, :, 1, 1].abs().sum() == 0


def test_prototypes_matching_without_old_class_pixels_is_zero():
    feats = torch.rand(1, 2, 2, 2)
    none = torch.zeros(1, 2, 2, dtype=torch.long)
    assert prototypes_matching_loss(feats, none, torch.rand(3, 2)).item() == 0
    # an empty (never filled) prototype is a zero vector, as in the reference
    pseudo = torch.tensor([[[2, 0], [0, 0]]])
    expected = (feats[0, :, 0, 0] ** 2).mean()
    torch.testing.assert_close(prototypes_matching_loss(feats, pseudo, torch.zeros(3, 2)), expected)


def test_attraction_by_hand_with_the_reference_in_loop_division_and_the_plain_mean():
    feats = fmap([[[1, 2], [3, 4]], [[5, 5], [7, 1]]])
    labels = torch.tensor([[[0, 1], [1, 255]]])
    protos = torch.tensor([[0., 0.], [4., 4.]])
    l0, l1 = (1 + 4) / 2, (1 + 0 + 1 + 1) / 4
    assert attraction_loss(feats, labels, protos).item() == pytest.approx(((0 + l0) / 2 + l1) / 2)
    assert attraction_loss(feats, labels, protos, divide_in_loop=False).item() == pytest.approx((l0 + l1) / 2)


def test_attraction_in_loop_division_over_three_classes():
    torch.manual_seed(1)
    feats, protos = torch.rand(2, 3, 3, 3), torch.rand(5, 3)
    labels = torch.tensor([0, 2, 4]).repeat(6)[:18].view(2, 3, 3)
    terms = []
    for c in (0, 2, 4):
        sq = [((feats[b, :, i, j] - protos[c]) ** 2).sum() for b in range(2) for i in range(3)
              for j in range(3) if labels[b, i, j] == c]
        terms.append(sum(sq) / (len(sq) * 3))
    expected = terms[0] / 27 + terms[1] / 9 + terms[2] / 3
    torch.testing.assert_close(attraction_loss(feats, labels, protos), expected)


def test_attraction_with_only_ignored_pixels_is_zero():
    assert attraction_loss(torch.rand(1, 2, 2, 2), torch.full((1, 2, 2), 255), torch.rand(3, 2)).item() == 0


def test_repulsion_by_hand():
    # class means [0, 0], [3, 4] (from [2, 4] and [4, 4]) and [6, 8]: distances 5, 10, 5
    feats = fmap([[[0, 0], [2, 4]], [[4, 4], [6, 8]]]).requires_grad_()
    labels = torch.tensor([[[0, 1], [1, 2]]])
    loss = repulsion_loss(feats, labels)
    assert loss.item() == pytest.approx((1 / 5 + 1 / 10 + 1 / 5) / 3)
    loss.backward()
    assert torch.isfinite(feats.grad).all()


def test_repulsion_averages_over_the_pairs_of_distinct_means_only():
    """Pairs whose means coincide (1/0) are left out of the count as well as the sum: means
    [0, 0], [0, 0] (classes 0 and 1) and [3, 4] (class 2) leave 4 ordered pairs at distance
    5, so the loss is 4 * (1/5) / 4 = 0.2; over all 6 ordered pairs of distinct classes it
    would be 0.8 / 6."""
    feats = fmap([[[0, 0], [0, 0]], [[3, 4], [3, 4]]])
    labels = torch.tensor([[[0, 1], [2, 2]]])
    assert repulsion_loss(feats, labels).item() == pytest.approx(0.2)


def test_repulsion_edge_cases_are_zero():
    feats = torch.rand(1, 2, 2, 2)
    assert repulsion_loss(feats, torch.ones(1, 2, 2, dtype=torch.long)).item() == 0      # one class
    assert repulsion_loss(feats, torch.full((1, 2, 2), 255)).item() == 0                # ignored only
    same = torch.ones(1, 2, 2, 2, requires_grad=True)                                   # equal means
    loss = repulsion_loss(same, torch.tensor([[[0, 1], [0, 1]]]))
    assert loss.item() == 0
    (loss + same.sum()).backward()
    assert torch.isfinite(same.grad).all()


def test_sparsification_by_hand():
    feats = fmap([[[1, 3], [2, 0]]])   # pixel a (class 0): [1, 3]; pixel b (class 1): [2, 0]
    labels = torch.tensor([[[0, 1]]])
    # a / max_class0 (3) = [1/3, 1]; b / max_class1 (2) = [1, 0]
    a = (math.exp(1 / 3) + math.exp(1)) / (4 / 3)
    b = (math.exp(1) + math.exp(0)) / 1
    assert sparsification_loss(feats, labels).item() == pytest.approx((a + b) / 2, rel=1e-6)


def test_sparsification_edge_cases():
    feats = fmap([[[1, 3], [2, 0]]])
    # background only: the reference drops class 0 when it is the only class -> 0
    assert sparsification_loss(feats, torch.zeros(1, 1, 2, dtype=torch.long)).item() == 0
    # ignored only: 255 counts as a class (max 3): [1/3, 1] and [2/3, 0]
    a = (math.exp(1 / 3) + math.exp(1)) / (4 / 3)
    b = (math.exp(2 / 3) + 1) / (2 / 3)
    out = sparsification_loss(feats, torch.full((1, 1, 2), 255))
    assert out.item() == pytest.approx((a + b) / 2, rel=1e-6)
    # all-zero features: 0
    assert sparsification_loss(torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 1]]])).item() == 0
    x = torch.rand(2, 4, 3, 3, requires_grad=True)
    sparsification_loss(x, torch.randint(0, 3, (2, 3, 3))).backward()
    assert torch.isfinite(x.grad).all()


def test_sparsification_adds_its_eps_to_each_class_peak():
    """``f~ = f / (peak + 1e-15)``: the eps is added, which shows (float64) on a class whose
    features peak at 1e-15 itself: pixel b (class 1) [1e-15, 0] -> [0.5, 0]. Pixel a (class 0)
    [1, 3] -> [1/3, 1] as in the hand example above."""
    feats = fmap([[[1, 3], [1e-15, 0]]]).double()
    labels = torch.tensor([[[0, 1]]])
    a = (math.exp(1 / 3) + math.exp(1)) / (4 / 3)
    b = (math.exp(0.5) + math.exp(0)) / 0.5
    assert sparsification_loss(feats, labels).item() == pytest.approx((a + b) / 2, rel=1e-9)


def test_the_losses_pass_no_gradient_to_the_prototypes():
    """The prototypes are targets (detached): with prototypes that require a gradient, the
    matching and the attraction give the features one and the prototypes none."""
    feats = fmap([[[1, 2], [3, 4]], [[5, 5], [7, 1]]]).requires_grad_()
    protos = torch.tensor([[9., 9.], [0., 0.], [5., 3.]], requires_grad=True)
    pseudo = torch.tensor([[[1, 1], [2, 0]]])
    labels = torch.tensor([[[0, 1], [1, 2]]])
    (prototypes_matching_loss(feats, pseudo, protos) + attraction_loss(feats, labels, protos)).backward()
    assert protos.grad is None
    assert feats.grad.abs().sum() > 0


def test_the_prototype_update_does_not_track_gradients():
    """``update_prototypes`` detaches the features: the running prototypes it returns carry
    no graph even when the features do."""
    feats = fmap([[[1, 2], [3, 4]], [[5, 5], [7, 1]]]).requires_grad_()
    p, _ = update_prototypes(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), feats,
                             torch.tensor([[[1, 1], [0, 2]]]), exclude_background=False)
    assert not p.requires_grad and p.grad_fn is None
    torch.testing.assert_close(p, torch.tensor([[5., 5.], [2., 3.], [7., 1.]]))


# Each term written as the per-class loop of its definition (ascending class ids): the
# implementation handles all classes at once, and must compute the same values and gradients.

def looped_terms(feats, labels, pseudo, protos):
    pixels = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
    labels, pseudo = labels.reshape(-1), pseudo.reshape(-1)
    present = [c for c in range(256) if (labels == c).any() and c != 255]
    old = [c for c in range(256) if (pseudo == c).any() and c != 0]
    pm = sum(((pixels[pseudo == c].mean(0) - protos[c]) ** 2).mean() for c in old) / max(len(old), 1)
    fc = feats.new_zeros(())
    for c in present:
        fc = (fc + ((pixels[labels == c] - protos[c]) ** 2).mean()) / len(present)
    means = [pixels[labels == c].mean(0) for c in present]
    inverse = [1 / (a - b).norm() for i, a in enumerate(means) for j, b in enumerate(means)
               if i != j and (a - b).norm() > 0]
    sep = sum(inverse) / len(inverse) if inverse else feats.new_zeros(())
    norm = torch.zeros_like(pixels)
    for c in range(256) if labels.max() > 0 else ():
        if (labels == c).any():
            norm[labels == c] = pixels[labels == c] / (pixels[labels == c].max() + 1e-15)
    fs = (norm.exp().sum(1) / (norm.sum(1) + 1e-15)).mean() if norm.sum() > 0 else feats.new_zeros(())
    return dict(pm=pm, fc=fc, sep=sep, fs=fs)


def computed_terms(feats, labels, pseudo, protos):
    return dict(pm=prototypes_matching_loss(feats, pseudo, protos),
                fc=attraction_loss(feats, labels, protos), sep=repulsion_loss(feats, labels),
                fs=sparsification_loss(feats, labels))


@pytest.mark.parametrize('seed', range(6))
def test_every_term_and_its_gradient_equal_the_per_class_loops(seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.relu(torch.randn(3, 8, 5, 6, generator=g, dtype=torch.float64))
    classes = torch.randperm(21, generator=g)[:seed + 1]  # some classes absent, ids not in order
    labels = classes[torch.randint(0, len(classes), (3, 5, 6), generator=g)]
    labels[torch.rand(3, 5, 6, generator=g) < 0.2] = 255
    pseudo = torch.where(labels == 0, torch.randint(0, 16, (3, 5, 6), generator=g), 0)
    protos = torch.rand(21, 8, generator=g, dtype=torch.float64)
    for name in ('pm', 'fc', 'sep', 'fs'):
        results = []
        for terms in (looped_terms, computed_terms):
            x = feats.clone().requires_grad_()
            value = feats.new_zeros(()) + terms(x, labels, pseudo, protos)[name]
            if value.requires_grad:
                value.backward()
            results.append((value.detach(), torch.zeros_like(x) if x.grad is None else x.grad))
        (looped_value, looped_grad), (value, grad) = results
        torch.testing.assert_close(value, looped_value, msg=name)
        torch.testing.assert_close(grad, looped_grad, msg=name)


def test_degenerate_batches_give_zero_terms_and_finite_gradients():
    protos = torch.rand(21, 4)
    background, ignored = torch.zeros(2, 3, 3, dtype=torch.long), torch.full((2, 3, 3), 255)
    for labels, zero_terms in ((background, ('pm', 'sep', 'fs')), (ignored, ('pm', 'fc', 'sep'))):
        x = torch.rand(2, 4, 3, 3, requires_grad=True)
        terms = computed_terms(x, labels, torch.zeros_like(labels), protos)
        assert [terms[name].item() for name in zero_terms] == [0, 0, 0]
        sum(terms.values()).backward()
        assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- the models

def random_prototypes(old) -> None:
    old.prototypes.copy_(torch.rand_like(old.prototypes))
    old.prototype_counts.fill_(7)


def model_at(name: str, step: int, cfg=None):
    return method_model(name, step, cfg, prepare_old=random_prototypes)

def batch(labels: list[int], seed: int = 0, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    choice = torch.tensor(labels)[torch.randint(0, len(labels), (2, size, size), generator=g)]
    return dict(inputs=torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g),
                data_samples=choice)


def test_registration_defaults_and_step0_flag():
    for name in ('sdr', 'sdr+mib'):
        assert get_method(name).step0_kind == 'fine-tuning+prototypes'
    sdr, both = model_at('sdr', 1), model_at('sdr+mib', 1)
    for m in (sdr, both):
        assert (m.loss_kd, m.kd_alpha, m.loss_de_prototypes, m.loss_fc, m.lfc_sep_clust,
                m.loss_featspars) == (100.0, 1.0, 0.01, 1e-3, 1e-3, 1e-3)
        assert m.class_indexed_buffers == ('prototypes', 'prototype_counts')
    assert both.init_balanced is True and not hasattr(sdr, 'init_balanced')
    cfg = load_config('small')
    cfg.model.update(loss_fc=0.5, overlapped=True)
    m = model_at('sdr', 0, cfg)
    assert m.loss_fc == 0.5 and m.overlapped


@pytest.mark.parametrize('overlapped', [False, True])
def test_step0_is_plain_cross_entropy_and_accumulates_prototypes(overlapped):
    cfg = load_config('small')
    cfg.model.update(overlapped=overlapped)
    model = model_at('sdr', 0, cfg).eval()
    data = model.data_preprocessor(batch([0, 3, 7, 255]), False)
    losses = model(**data, mode='loss')
    assert set(losses) == KEYS
    assert all(v.item() == 0 for k, v in losses.items() if k != 'loss_ce')
    with torch.no_grad():
        out = model.encode_decode(data['inputs'])
    torch.testing.assert_close(losses['loss_ce'].detach(), cross_entropy(out['logits'], data['data_samples']))
    feats = out['body'][-1]
    down = downsample_labels(data['data_samples'], feats.shape[-2:])
    expected, counts = update_prototypes(torch.zeros(16, 128), torch.zeros(16, dtype=torch.long),
                                         feats, down, exclude_background=overlapped)
    torch.testing.assert_close(model.prototypes, expected)
    assert model.prototype_counts.tolist() == counts.tolist()
    assert (model.prototype_counts[0] == 0) == overlapped and model.prototype_counts[3] > 0


@pytest.mark.parametrize('off, updated', [
    (('loss_de_prototypes',), True),                        # attraction, repulsion still on
    (('loss_de_prototypes', 'loss_fc'), True),              # repulsion still on
    (('loss_fc', 'lfc_sep_clust'), True),                   # the matching alone (weight 0.01)
    (('loss_de_prototypes', 'lfc_sep_clust'), True),        # the attraction alone (1e-3)
    (('loss_de_prototypes', 'loss_fc', 'lfc_sep_clust'), False),
])
def test_prototypes_are_accumulated_while_any_prototype_term_is_on(off, updated):
    """Reference train.py: the running prototypes are updated whenever one of the prototype
    terms is on, not only the matching: a step 0 with the matching off still counts class 3's
    pixels, and only with every such term off does it leave the prototypes at 0."""
    cfg = load_config('small')
    cfg.model.update({name: 0.0 for name in off})
    model = model_at('sdr', 0, cfg).eval()
    model(**model.data_preprocessor(batch([0, 3, 7, 255]), False), mode='loss')
    assert (model.prototype_counts[3].item() > 0) is updated
    assert (model.prototypes[3].abs().sum().item() > 0) is updated


def test_sdr_without_output_distillation_still_matches_prototypes():
    """SDR needs its teacher for the prototypes matching too: with ``loss_kd = 0`` the old
    model's prediction still locates the old classes on the background (loss_pm = 0.01 *
    the matching, > 0) and loss_kd is 0. A teacher asked for only when ``loss_kd > 0`` would
    leave loss_pm 0 here."""
    cfg = load_config('small')
    cfg.model.update(loss_kd=0.0)
    model = model_at('sdr', 1, cfg).eval()
    before_p, before_n = model.prototypes.clone(), model.prototype_counts.clone()
    data = model.data_preprocessor(batch([0, 16, 18, 255], seed=2), False)
    losses = model(**data, mode='loss')
    with torch.no_grad():
        new, old = model.encode_decode(data['inputs']), model.teacher.encode_decode(data['inputs'])
    feats = new['body'][-1]
    down = downsample_labels(data['data_samples'], feats.shape[-2:])
    protos, _ = update_prototypes(before_p, before_n, feats, down, exclude_background=True)
    pm = 0.01 * prototypes_matching_loss(feats, old_class_pseudolabels(old['logits'], down), protos)
    assert losses['loss_kd'].item() == 0 and pm.item() > 0
    torch.testing.assert_close(losses['loss_pm'].detach(), pm, rtol=1e-5, atol=0)


def test_sdr_without_prototypes_matching_still_distils_the_outputs_with_any_positive_weight():
    """With ``loss_de_prototypes = 0`` SDR still needs its teacher for the output
    distillation, whose weight, even below 1 (0.5), scales KD: loss_kd = 0.5 * KD > 0."""
    cfg = load_config('small')
    cfg.model.update(loss_kd=0.5, loss_de_prototypes=0.0)
    model = model_at('sdr', 1, cfg).eval()
    data = model.data_preprocessor(batch([0, 16, 18, 255], seed=2), False)
    losses = model(**data, mode='loss')
    with torch.no_grad():
        new, old = model.encode_decode(data['inputs']), model.teacher.encode_decode(data['inputs'])
    kd = 0.5 * knowledge_distillation(new['logits'], old['logits'])
    assert losses['loss_pm'].item() == 0 and kd > 0
    torch.testing.assert_close(losses['loss_kd'].detach(), kd)


def test_class_indexed_buffers_grow_across_steps():
    cfg, proto = load_config('small'), load_protocol('voc-15-5-overlap')
    method = get_method('sdr')
    old = build_model(cfg, method.model_type, proto, 0)
    assert old.prototypes.shape == (16, 128) and old.prototype_counts.shape == (16,)
    with torch.no_grad():
        old.prototypes.copy_(torch.arange(16 * 128, dtype=torch.float32).view(16, 128))
        old.prototype_counts.copy_(torch.arange(1, 17))
    state = old.state_dict()
    assert 'prototypes' in state and 'prototype_counts' in state  # saved with the step
    new = build_model(cfg, method.model_type, proto, 1)
    load_previous_weights(new, state, Path('step0'))
    assert new.prototypes.shape == (21, 128)
    torch.testing.assert_close(new.prototypes[:16], old.prototypes)
    assert new.prototypes[16:].abs().sum() == 0
    assert new.prototype_counts.tolist() == list(range(1, 17)) + [0] * 5


@pytest.mark.parametrize('name', ['sdr', 'sdr+mib'])
def test_step1_terms_are_the_weighted_losses_on_the_backbone_output(name):
    model = model_at(name, 1).eval()  # eval: no dropout, so two forwards agree
    before_p, before_n = model.prototypes.clone(), model.prototype_counts.clone()
    data = model.data_preprocessor(batch([0, 16, 18, 255], seed=2), False)
    inputs, targets = data['inputs'], data['data_samples']
    losses = model(**data, mode='loss')
    assert set(losses) == KEYS
    with torch.no_grad():
        new, old = model.encode_decode(inputs), model.teacher.encode_decode(inputs)
    feats = new['body'][-1]
    assert feats.shape[1] == 128  # the backbone's last stage, not the ASPP head (64)
    down = downsample_labels(targets, feats.shape[-2:])
    protos, counts = update_prototypes(before_p, before_n, feats, down, exclude_background=True)
    torch.testing.assert_close(model.prototypes, protos)
    assert model.prototype_counts.tolist() == counts.tolist()
    torch.testing.assert_close(model.prototypes[:16], before_p[:16])  # old rows untouched
    assert counts[0] == 7 and counts[16] > 0 and counts[18] > 0 and counts[17] == 0
    if name == 'sdr':
        ce = cross_entropy(new['logits'], targets)
        kd = 100 * knowledge_distillation(new['logits'], old['logits'])
    else:
        ce = unbiased_cross_entropy(new['logits'], targets, 16)
        kd = 100 * unbiased_knowledge_distillation(new['logits'], old['logits'])
    pseudo = old_class_pseudolabels(old['logits'], down)
    expected = dict(loss_ce=ce, loss_kd=kd,
                    loss_pm=0.01 * prototypes_matching_loss(feats, pseudo, protos),
                    loss_fc=1e-3 * attraction_loss(feats, down, protos),
                    loss_sep=1e-3 * repulsion_loss(feats, down),
                    loss_fs=1e-3 * sparsification_loss(feats, down))
    for k, v in expected.items():
        # relative only: the 1e-3-weighted terms are below assert_close's default atol (1e-5),
        # which hid losses computed with the prototypes before this batch's update (4 % off)
        torch.testing.assert_close(losses[k].detach(), v, rtol=1e-5, atol=0, msg=k)
        assert v.item() > 0, k


def test_step1_of_a_disjoint_protocol_leaves_the_background_prototype_alone():
    # Reference train.py: _update_running_stats drops background when ``overlapped or (not
    # sequential and incremental_step > 0)``: at step > 0 of a *disjoint* protocol too, where
    # the step-1 background holds old classes. (The other step-1 tests run overlapped, where
    # the protocol alone already leaves it out.)
    model = method_model('sdr', 1, protocol='voc-15-5-disjoint', prepare_old=random_prototypes)
    assert not model.overlapped
    model.eval()
    before = model.prototypes[0].clone()
    data = model.data_preprocessor(batch([0, 16, 18], seed=4), False)
    model(**data, mode='loss')
    assert model.prototype_counts[0].item() == 7            # as step 0 left it
    torch.testing.assert_close(model.prototypes[0], before)
    assert model.prototype_counts[16] > 0 and model.prototype_counts[18] > 0


@pytest.mark.parametrize('name', ['sdr', 'sdr+mib'])
def test_step1_backward_reaches_only_the_student(name):
    model = model_at(name, 1).train()
    data = model.data_preprocessor(batch([0, 17, 20], seed=3), True)
    losses = model(**data, mode='loss')
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.backbone.stem[0].weight.grad is not None
    assert not model.teacher.training


def test_step1_with_only_ignored_pixels_is_finite():
    model = model_at('sdr', 1).train()
    data = model.data_preprocessor(batch([255]), True)
    losses = model(**data, mode='loss')
    assert losses['loss_ce'].item() == 0 and losses['loss_fc'].item() == 0
    assert losses['loss_sep'].item() == 0 and losses['loss_pm'].item() == 0  # no GT background
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_sdr_starts_its_new_classifier_without_mib_init():
    # (sdr+mib's MiB init: test_methods.py, with MiB's and PLOP's)
    sdr = model_at('sdr', 1)
    assert not torch.allclose(sdr.classifiers[1].weight[0], sdr.teacher.classifiers[0].weight[0])


# --------------------------------------------------------------------------- end to end

@pytest.mark.parametrize('name', ['sdr', 'sdr+mib'])
def test_each_sdr_method_runs_a_two_step_protocol(name, synth32, config32, tmp_path):
    steps = run_protocol('synth-15-5-overlap', name, config=str(config32), data_root=str(synth32),
                         epochs=1, results_root=tmp_path, log=lambda *a: None)
    assert [s['step'] for s in steps] == [0, 1]
    assert set(steps[1]['iou']) == {str(c) for c in range(21)}
    assert all(0.0 <= v <= 1.0 for v in steps[1]['iou'].values() if v is not None)
    (w0,) = tmp_path.rglob('step0/model.pth')
    (w1,) = tmp_path.rglob('step1/model.pth')
    s0 = torch.load(w0, weights_only=True)
    s1 = torch.load(w1, weights_only=True)
    assert s0['prototypes'].shape == (16, 128) and s1['prototypes'].shape == (21, 128)
    assert s0['prototype_counts'][1:].sum() > 0          # step 0 accumulated its classes
    torch.testing.assert_close(s1['prototypes'][:16], s0['prototypes'])  # kept at step 1
    assert s1['prototype_counts'][:16].tolist() == s0['prototype_counts'].tolist()
    assert s1['prototype_counts'][16:].sum() > 0
