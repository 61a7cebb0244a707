"""PLOP: local POD by hand, the entropy thresholds and pseudo-labels on hand-built examples,
the step-0 / step-1 losses, edge cases, and a two-step protocol end to end."""
from __future__ import annotations

import math

import pytest
import torch

from cssbench.baselines.plop import (PLOP, entropy_histogram, entropy_pseudo_labels,
                                     median_thresholds, normalized_entropy)
from cssbench.config import load_config
from cssbench.losses import (cross_entropy, image_weighted_cross_entropy, local_pod_embedding,
                             merge_new_into_background, pod_distillation, pod_layer_distance)
from cssbench.methods import get_method
from cssbench.protocols import load_protocol
from cssbench.runner import build_model, run_protocol
from conftest import drift_student, method_model, stop_run_in_step



# -- POD ------------------------------------------------------------------------------------

def test_local_pod_of_a_4x4_map_by_hand():
    old = torch.arange(16.).view(1, 1, 4, 4)   # squared: 0, 1, 4, ..., 225
    new = torch.full((1, 1, 4, 4), 2.0)        # squared: 4 everywhere
    sq = [[float((4 * r + c) ** 2) for c in range(4)] for r in range(4)]
    # Scale 1, written out: the width pooling (mean of each row) and the height pooling
    # (mean of each column) of the squared map.
    assert [sum(row) / 4 for row in sq] == [3.5, 31.5, 91.5, 183.5]
    assert [sum(sq[r][c] for r in range(4)) / 4 for c in range(4)] == [56.0, 69.0, 84.0, 101.0]
    # Scales 1, 2, 4: s x s regions of (4 / s) x (4 / s) pixels, each giving its row means and
    # its column means.
    expected = []
    for s in (1, 2, 4):
        k = 4 // s
        for i in range(s):
            for j in range(s):
                region = [row[j * k:(j + 1) * k] for row in sq[i * k:(i + 1) * k]]
                expected += [sum(row) / k for row in region]
                expected += [sum(region[r][c] for r in range(k)) / k for c in range(k)]
    assert len(expected) == 8 + 4 * 4 + 16 * 2
    emb = local_pod_embedding(old.pow(2))
    assert sorted(emb[0].tolist()) == sorted(expected)
    # The distance: the L2 norm of the difference of the two embeddings (new's are all 4).
    distance = math.sqrt(sum((e - 4.0) ** 2 for e in expected))
    assert math.isclose(pod_layer_distance(new, old).item(), distance, rel_tol=1e-6)
    assert math.isclose(distance, 747.85627, rel_tol=1e-6)
    # One map, factor 0.01: 0.01 * distance / 1 map.
    assert math.isclose(pod_distillation([new], [old], [0.01]).item(), 0.01 * distance, rel_tol=1e-6)


def test_pod_averages_over_the_batch_and_over_every_map():
    old = torch.arange(16.).view(1, 1, 4, 4)
    new = torch.full((1, 1, 4, 4), 2.0)
    d = pod_layer_distance(new, old).item()
    same = torch.ones(1, 1, 4, 4)
    # Batch of two: one image at distance d, one at 0 -> mean d / 2.
    assert math.isclose(pod_layer_distance(torch.cat([new, same]), torch.cat([old, same])).item(),
                        d / 2, rel_tol=1e-6)
    # Three maps, one with factor 0: the sum of the weighted distances over 3.
    loss = pod_distillation([new, new, same], [old, old, same * 3], [0.01, 0.0, 0.5])
    d_same = pod_layer_distance(same, same * 3).item()   # 9 - 1 = 8 on each of 56 entries
    assert math.isclose(d_same, 8 * math.sqrt(56), rel_tol=1e-6)
    assert math.isclose(loss.item(), (0.01 * d + 0.5 * d_same) / 3, rel_tol=1e-6)


def test_pod_of_identical_maps_is_zero_with_a_finite_gradient():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = pod_distillation([x], [x.detach().clone()], [1.0])
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_pod_refuses_maps_smaller_than_the_largest_scale():
    with pytest.raises(ValueError, match='smaller than'):
        local_pod_embedding(torch.ones(1, 1, 2, 2))


def test_new_classes_logits_are_summed_into_the_background_channel():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 5, 1, 1)   # 3 old, 2 new
    merged = merge_new_into_background(logits, 3)
    assert merged.flatten().tolist() == [1.0 + 4.0 + 5.0, 2.0, 3.0]


# -- entropy, thresholds, pseudo-labels ----------------------------------------------------

def test_normalized_entropy_is_the_references_class_mean_form():
    uniform = torch.full((1, 4, 1, 1), 0.25)
    assert math.isclose(normalized_entropy(uniform).item(), 0.25, rel_tol=1e-5)  # = 1 / C
    one_hot = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)
    assert abs(normalized_entropy(one_hot).item()) < 1e-6
    p = torch.tensor([0.5, 0.5, 0.0, 0.0]).view(1, 4, 1, 1)
    expected = -(1 / math.log(4)) * (2 * 0.5 * math.log(0.5 + 1e-8) + 2 * 0.0) / 4
    assert math.isclose(normalized_entropy(p).item(), expected, rel_tol=1e-5)


def test_entropy_histogram_counts_background_pixels_by_old_prediction_and_entropy_bin():
    # 3 old channels; pixels: (target 0, confident class 1), (target 0, uniform),
    # (target 4, confident class 2: not background, not counted), (target 255: not counted).
    logits = torch.tensor([[0., 0., 0., 0.], [30., 0., 0., 0.], [0., 0., 30., 0.]]).view(1, 3, 1, 4)
    targets = torch.tensor([[[0, 0, 4, 255]]])
    max_entropy = math.log(5)
    hist = entropy_histogram(logits, targets, 5, max_entropy, nb_bins=100)
    assert hist.shape == (5, 100) and hist.sum() == 2
    assert hist[1, 0] == 1                       # confident: entropy ~0, bin 0
    bin_uniform = int((1 / 3) / max_entropy * 100)  # uniform over 3: entropy 1/3
    assert bin_uniform == 20 and hist[0, bin_uniform] == 1  # argmax of a tie: class 0


def test_median_thresholds_on_hand_built_histograms():
    hist = torch.zeros(6, 100, dtype=torch.long)
    hist[0, 0] = 6; hist[0, 1] = 2; hist[0, 2] = 2     # half = 5 falls in bin 0
    hist[1, :3] = torch.tensor([2, 2, 6])               # half = 5 in bin 2
    hist[3, 0] = 1                                      # half = 0.5 in bin 0
    hist[4, 3] = 2                                      # the reference's 0 / 0 case
    hist[5, 0] = 1000
    thr = median_thresholds(hist, 0.001)
    assert math.isclose(thr[0].item(), 5 / 6 * 0.01, rel_tol=1e-6)
    # The reference adds the bin *index* (0, then 1) to its running sum, not the counts:
    # 0.02 + (5 - 1) / 6 * 0.01, where the true median would be 0.02 + (5 - 4) / 6 * 0.01.
    assert math.isclose(thr[1].item(), 0.02 + 4 / 6 * 0.01, rel_tol=1e-6)
    assert math.isclose(thr[2].item(), 0.001, rel_tol=1e-6)   # never predicted: the base
    assert math.isclose(thr[3].item(), 0.005, rel_tol=1e-6)
    assert math.isnan(thr[4].item())                           # half == running at an empty bin
    assert math.isclose(thr[5].item(), 0.005, rel_tol=1e-6)
    # The base threshold is a floor.
    assert math.isclose(median_thresholds(hist, 0.01)[0].item(), 0.01, rel_tol=1e-6)


def test_entropy_histogram_puts_values_above_the_range_in_the_last_bin():
    """``find_median``'s ``clamp(max=nb_bins - 1)``: a scaled entropy above 1 (here the
    uniform pixel's 1/3 divided by a max_entropy of 0.001) is counted in the last bin, of its
    own class's row; the confident pixel stays in bin 0."""
    logits = torch.tensor([[0., 0.], [0., 30.], [0., 0.]]).view(1, 3, 1, 2)   # uniform, sure of 1
    targets = torch.tensor([[[0, 0]]])
    hist = entropy_histogram(logits, targets, 4, 0.001, nb_bins=100)
    assert hist.sum() == 2 and hist[0, 99] == 1 and hist[1, 0] == 1


def test_the_adaptive_factor_adds_its_eps_to_the_background_count():
    """``num / (den + 1e-6)``: an image whose one background pixel is pseudo-labelled gets
    1 / (1 + 1e-6), just below 1 (not above it)."""
    old_logits = torch.tensor([[0., 0.], [30., 0.], [0., 30.]]).view(1, 3, 1, 2)
    targets = torch.tensor([[[0, 3]]])
    labels, factor = entropy_pseudo_labels(targets, old_logits, torch.full((4,), 0.01), math.log(4),
                                           num_old=3)
    assert labels.flatten().tolist() == [1, 3]
    assert factor[0].item() < 1 and factor[0].item() == pytest.approx(1 / (1 + 1e-6), abs=2e-7)


def _pseudo_example():
    """3 old channels (background + 2 old classes), 1 new class (channel 3). Image 0's
    pixels: (bg, old model sure of class 1) (bg, sure of background) (bg, uniform)
    (new class 3, old model sure of class 2) (ignored). Image 1: no background pixel."""
    big = 30.0
    pix = [[0, big, 0], [big, 0, 0], [0, 0, 0], [0, 0, big], [0, big, 0]]
    img0 = torch.tensor(pix).T.reshape(3, 1, 5)
    img1 = torch.tensor([[0, big, 0]] * 5).T.reshape(3, 1, 5)
    old_logits = torch.stack([img0, img1])
    targets = torch.tensor([[[0, 0, 0, 3, 255]], [[3, 3, 3, 255, 255]]])
    return old_logits, targets


def test_pseudo_labels_replace_confident_background_and_ignore_the_rest():
    old_logits, targets = _pseudo_example()
    thresholds = torch.full((4,), 0.01)
    labels, factor = entropy_pseudo_labels(targets, old_logits, thresholds, math.log(4), num_old=3)
    assert labels[0].flatten().tolist() == [1, 0, 255, 3, 255]
    assert labels[1].flatten().tolist() == [3, 3, 3, 255, 255]
    assert math.isclose(factor[0].item(), 2 / (3 + 1e-6), rel_tol=1e-6)  # 2 of 3 bg pixels kept
    assert factor[1].item() == 0.0                                       # no background pixel
    # Per-class thresholds: with class 1's at 0, its confident pixel is rejected too.
    labels, factor = entropy_pseudo_labels(targets, old_logits, torch.tensor([0.01, 0.0, 0.01, 0.01]),
                                           math.log(4), num_old=3)
    assert labels[0].flatten().tolist() == [255, 0, 255, 3, 255]
    # A NaN threshold (the reference's 0 / 0 case) accepts no pixel of its class.
    labels, _ = entropy_pseudo_labels(targets, old_logits, torch.tensor([0.01, math.nan, 0.01, 0.01]),
                                      math.log(4), num_old=3)
    assert labels[0, 0, 0].item() == 255
    # The uniform pixel's entropy is 1/3 / log 4 = 0.24: a threshold above that keeps it.
    labels, factor = entropy_pseudo_labels(targets, old_logits, torch.full((4,), 0.3), math.log(4), 3)
    assert labels[0].flatten().tolist() == [1, 0, 0, 3, 255] and factor[0].item() > 0.999


def test_a_pixel_whose_entropy_equals_its_threshold_is_not_pseudo_labelled():
    """The reference keeps a pseudo-label where the entropy is *below* the threshold (strict
    ``<``): image 0's uniform pixel, with its class's threshold set to exactly its own scaled
    entropy (1/3 / log 4), is ignored; a threshold one float step above keeps it as class 0."""
    old_logits, targets = _pseudo_example()
    probs = torch.softmax(old_logits.float(), dim=1)
    own = (normalized_entropy(probs) / math.log(4))[0, 0, 2]
    assert math.isclose(own.item(), 1 / 3 / math.log(4), rel_tol=1e-5)
    thresholds = torch.full((4,), 0.01)
    thresholds[0] = own
    labels, _ = entropy_pseudo_labels(targets, old_logits, thresholds, math.log(4), num_old=3)
    assert labels[0].flatten().tolist() == [1, 0, 255, 3, 255]
    thresholds[0] = torch.nextafter(own, torch.tensor(1.0))
    labels, _ = entropy_pseudo_labels(targets, old_logits, thresholds, math.log(4), num_old=3)
    assert labels[0].flatten().tolist() == [1, 0, 0, 3, 255]


def test_pseudo_labels_treat_an_old_class_target_as_background():
    """The reference's background is ``targets < num_old`` (old classes included), not
    ``targets == 0``: with image 0's first target 0 -> old class 2, that pixel is still
    pseudo-labelled (the old model is sure of class 1) and still counts in the factor, 2 / 3.
    Kept as 2, the labels would read [2, 0, 255, ...] and the factor 1 / 2."""
    old_logits, targets = _pseudo_example()
    targets[0, 0, 0] = 2
    labels, factor = entropy_pseudo_labels(targets, old_logits, torch.full((4,), 0.01), math.log(4),
                                           num_old=3)
    assert labels[0].flatten().tolist() == [1, 0, 255, 3, 255]
    assert math.isclose(factor[0].item(), 2 / (3 + 1e-6), rel_tol=1e-6)


def test_the_adaptive_factor_is_floored_at_the_min_factor_when_one_is_set():
    """Reference ``classif_adaptive_min_factor``: a factor below it is raised to it (image 1,
    no background pixel: 0 -> 0.5), one above it is kept (image 0: 2 of 3 background pixels
    pseudo-labelled, 2 / 3); the labels do not change."""
    old_logits, targets = _pseudo_example()
    thresholds = torch.full((4,), 0.01)
    plain, _ = entropy_pseudo_labels(targets, old_logits, thresholds, math.log(4), num_old=3)
    labels, factor = entropy_pseudo_labels(targets, old_logits, thresholds, math.log(4), num_old=3,
                                           min_factor=0.5)
    assert torch.equal(labels, plain)
    assert factor.tolist() == pytest.approx([2 / (3 + 1e-6), 0.5])


def test_image_weighted_cross_entropy_averages_over_every_pixel():
    logits = torch.randn(2, 4, 1, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[[1, 0, 255, 3, 255]], [[3, 3, 3, 255, 255]]])
    pixel = torch.nn.functional.cross_entropy(logits, targets, ignore_index=255, reduction='none')
    expected = (0.5 * pixel[0].sum() + 0.0 * pixel[1].sum()) / 10
    got = image_weighted_cross_entropy(logits, targets, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(image_weighted_cross_entropy(logits, targets, torch.ones(2)),
                               cross_entropy(logits, targets))


# -- the method ----------------------------------------------------------------------------

def batch(seed: int = 0, size: int = 32, classes=(0, 16, 17, 255)):
    g = torch.Generator().manual_seed(seed)
    choice = torch.tensor(classes)[torch.randint(0, len(classes), (2, size, size), generator=g)]
    return dict(inputs=torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g),
                data_samples=choice)


def test_defaults_are_the_references_voc_settings():
    assert get_method('plop').step0_kind == get_method('ft').step0_kind == 'fine-tuning'
    m = method_model('plop', 1)
    assert (m.pod_factor, m.pod_logits_factor, m.pod_logits, m.pod_scales, m.pod_schedule) == \
        (0.01, 0.0005, True, (1, 2, 4), True)
    assert (m.pseudo, m.threshold, m.entropy_bins, m.classif_adaptive_factor, m.init_balanced) == \
        ('entropy', 0.001, 100, True, True)
    cfg = load_config('small')
    cfg.model.update(pod_factor=0.5, threshold=0.2)
    assert (method_model('plop', 1, cfg).pod_factor, method_model('plop', 1, cfg).threshold) == (0.5, 0.2)


def test_entropies_are_scaled_by_the_log_of_every_class_seen_so_far():
    # Reference train.py: find_median's ``max_value = log(nb_current_classes)``, the old and
    # the new classes (21 at step 1 of 15-5, 16 + 5), which ``train`` divides by too; not the
    # teacher's 16 channels.
    assert method_model('plop', 1).max_entropy == pytest.approx(math.log(21))
    assert method_model('plop', 1, protocol='voc-19-1-overlap').max_entropy == pytest.approx(math.log(21))
    assert method_model('plop', 0).max_entropy == pytest.approx(math.log(16))


def test_step0_is_plain_cross_entropy():
    model = method_model('plop', 0).eval()
    model.init_new_classifier()  # no-op
    data = model.data_preprocessor(batch(classes=(0, 5, 15, 255)), False)
    losses = model(**data, mode='loss')
    assert set(losses) == {'loss_ce', 'loss_pod'} and losses['loss_pod'].item() == 0.0
    with torch.no_grad():
        logits = model.encode_decode(data['inputs'])['logits']
    torch.testing.assert_close(losses['loss_ce'].detach(), cross_entropy(logits, data['data_samples']))
    assert model.compute_thresholds([batch()]) is None


def test_step1_loss_is_pseudo_labelled_ce_plus_scheduled_pod():
    model = method_model('plop', 1).eval()   # eval: no dropout, so the forwards below agree
    drift_student(model)
    thr = model.compute_thresholds([batch(1), batch(2)])
    assert thr.shape == (21,) and (thr[~thr.isnan()] >= 0.001).all()
    data = model.data_preprocessor(batch(3), False)
    inputs, targets = data['inputs'], data['data_samples']
    losses = model(**data, mode='loss')
    assert set(losses) == {'loss_ce', 'loss_pod'}
    with torch.no_grad():
        new, old = model.forward_maps(inputs), model.teacher.forward_maps(inputs)
        labels, factor = entropy_pseudo_labels(targets, old['logits'], thr, math.log(21), 16)
        ce = image_weighted_cross_entropy(new['logits'], labels, factor)
        maps_new = new['maps'] + [merge_new_into_background(new['small_logits'], 16)]
        maps_old = old['maps'] + [old['small_logits']]
        assert len(maps_new) == 6 and maps_new[4].shape[1] == 64   # 4 stages + head + logits
        pod = pod_distillation(maps_new, maps_old, [0.01] * 5 + [0.0005]) * math.sqrt(21 / 5)
        # the backbone's and head's maps weigh in, not only the logits'
        assert pod_distillation(maps_new[:5] + [maps_old[5]], maps_old, [0.01] * 6) > 0.2 * pod / math.sqrt(21 / 5)
    torch.testing.assert_close(losses['loss_ce'].detach(), ce)
    torch.testing.assert_close(losses['loss_pod'].detach(), pod)
    assert losses['loss_pod'].item() > 0


def test_without_pseudo_labelling_no_thresholds_are_computed():
    """``pseudo=None`` trains on the plain targets: ``compute_thresholds`` returns None
    without running the teacher over the step's data (a pass over the whole loader)."""
    cfg = load_config('small')
    cfg.model.update(pseudo=None)
    model = method_model('plop', 1, cfg).eval()
    calls = []
    model.teacher.backbone.register_forward_hook(lambda *_: calls.append(1))
    assert model.compute_thresholds([batch(1)]) is None and model.thresholds is None
    assert calls == []


def test_step1_backward_trains_only_the_student_and_the_head_map_skips_dropout():
    model = method_model('plop', 1).train()
    model.compute_thresholds([batch(1)])
    data = model.data_preprocessor(batch(4), True)
    losses = model(**data, mode='loss')
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.backbone.stem[0].weight.grad is not None and model.classifiers[1].weight.grad is not None
    assert not model.teacher.training
    # With a dropout that drops every channel, the classifier's input is 0, but the head map
    # POD distils is the head's output (as the reference's head, which has no dropout).
    model.classifier_dropout.p = 1.0
    with torch.no_grad():
        out = model.forward_maps(data['inputs'])
        features = model.extract(data['inputs'])['features']
        dropped = model.classifier_dropout(features)
    assert dropped.abs().max() == 0 and out['maps'][-1].abs().max() > 0
    assert out['maps'][-1].shape == features.shape and (out['maps'][-1] >= 0).all()
    assert out['small_logits'].eq(out['small_logits'][:, :, :1, :1]).all()  # constant: bias only


def test_without_the_hook_thresholds_come_from_the_first_batch_with_a_warning():
    model = method_model('plop', 1).eval()
    data = model.data_preprocessor(batch(5), False)
    with pytest.warns(UserWarning, match='first training batch'):
        model(**data, mode='loss')
    expected = model.compute_thresholds([batch(5)])
    assert model.thresholds is not None
    model2 = method_model('plop', 1).eval()
    with pytest.warns(UserWarning):
        model2(**data, mode='loss')
    torch.testing.assert_close(model2.thresholds, expected, equal_nan=True)


def test_edge_cases_only_ignored_pixels_and_no_background():
    model = method_model('plop', 1).train()
    model.compute_thresholds([batch(1)])
    ignored = model.data_preprocessor(dict(batch(), data_samples=torch.full((2, 32, 32), 255)), True)
    losses = model(**ignored, mode='loss')
    assert losses['loss_ce'].item() == 0.0 and torch.isfinite(losses['loss_pod'])
    sum(losses.values()).backward()
    # No background pixel in either image: the adaptive factor is 0, so is the cross-entropy.
    model.zero_grad()
    only_new = model.data_preprocessor(batch(6, classes=(16, 17, 20)), True)
    losses = model(**only_new, mode='loss')
    assert losses['loss_ce'].item() == 0.0 and losses['loss_pod'].item() > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- end to end ----------------------------------------------------------------------------

def test_plop_runs_a_two_step_protocol_and_computes_thresholds_before_step1(
        synth32, config32, tmp_path, monkeypatch):
    calls = []
    original = PLOP.compute_thresholds

    def spy(self, batches):
        result = original(self, batches)
        calls.append((self.step, None if result is None else result.clone()))
        return result

    monkeypatch.setattr(PLOP, 'compute_thresholds', spy)
    def run():
        return run_protocol('synth-15-5-overlap', 'plop', config=str(config32),
                            data_root=str(synth32), epochs=1, results_root=tmp_path,
                            keep_epoch_checkpoints=True, log=lambda *a: None)
    steps = run()
    assert [s['step'] for s in steps] == [0, 1]
    assert set(steps[1]['iou']) == {str(c) for c in range(21)}
    assert all(0.0 <= v <= 1.0 for v in steps[1]['iou'].values() if v is not None)
    step1 = [thr for step, thr in calls if step == 1]
    assert len(step1) == 1 and step1[0].shape == (21,)
    # Stopped in step 1's evaluation, after its last epoch: continued, it only evaluates
    run_dir, passes = tmp_path / 'synth-15-5-overlap' / 'plop' / 'small32-seed0', len(calls)
    stop_run_in_step(run_dir, run_dir / 'work', 1)
    assert run()[1]['iou'] == steps[1]['iou'] and len(calls) == passes


def test_ade_protocols_get_the_reference_ade_factors_and_a_config_still_wins():
    cfg = load_config('small')
    voc = build_model(cfg, 'cssbench.PLOP', load_protocol('voc-15-5-overlap'), 0)
    ade = build_model(cfg, 'cssbench.PLOP', load_protocol('ade-100-50'), 0)
    assert (voc.pod_factor, voc.pod_logits_factor) == (0.01, 0.0005)
    assert (ade.pod_factor, ade.pod_logits_factor) == (0.001, 1e-5)
    cfg.model.update(pod_factor=0.5)
    assert build_model(cfg, 'cssbench.PLOP', load_protocol('ade-100-50'), 0).pod_factor == 0.5


def test_local_pod_drops_the_trailing_rows_and_columns_that_do_not_fill_a_region():
    # A 5 x 7 map at scale 2: regions of 2 x 3 pixels; the fifth row and the seventh column
    # are dropped. Squared values: 1 everywhere but that row and column (100). Each region's
    # 2 row means and 3 column means are then all 1; keeping the dropped row or column would
    # change them (or fail to reshape).
    x = torch.ones(1, 1, 5, 7)
    x[0, 0, 4, :] = 10.0
    x[0, 0, :, 6] = 10.0
    emb = local_pod_embedding(x.pow(2), scales=(2,))
    assert emb.shape == (1, 4 * (2 + 3))
    assert emb.flatten().tolist() == [1.0] * 20


def test_pod_refuses_a_map_whose_shorter_side_is_below_the_largest_scale():
    # 2 x 8 map, scales up to 4: the shorter side decides (a 2-row map cannot make 4 rows of
    # regions), even though the longer side would do.
    with pytest.raises(ValueError, match='smaller than'):
        local_pod_embedding(torch.ones(1, 1, 2, 8))
    with pytest.raises(ValueError, match='smaller than'):
        local_pod_embedding(torch.ones(1, 1, 8, 2))


def test_pod_distillation_refuses_lists_of_different_lengths():
    a = torch.ones(1, 1, 4, 4)
    with pytest.raises(ValueError, match='as many'):
        pod_distillation([a, a], [a], [1.0, 1.0])          # one old map short
    with pytest.raises(ValueError, match='as many'):
        pod_distillation([a, a], [a, a], [1.0])            # one factor short


def test_a_map_with_factor_zero_is_skipped_not_multiplied_by_zero():
    # The reference ``continue``s past a map whose factor is <= 0: its values never enter the
    # loss, so a non-finite map there leaves it finite (0 * inf would be NaN).
    old = torch.arange(16.).view(1, 1, 4, 4)
    new = torch.full((1, 1, 4, 4), 2.0)
    bad = torch.full((1, 1, 4, 4), float('inf'))
    d = pod_layer_distance(new, old).item()
    loss = pod_distillation([new, bad], [old, torch.zeros(1, 1, 4, 4)], [0.01, 0.0])
    assert math.isclose(loss.item(), 0.01 * d / 2, rel_tol=1e-6)


def test_entropy_histogram_and_pseudo_labels_work_in_float32_on_half_precision_logits():
    """Under autocast the old model's logits may come in bfloat16: the softmax and the entropy
    are taken in float32 (``old_logits.float()``). Logits (0.3, 0, -0.3) give a normalised
    entropy of 0.32439 in float32 but 0.32617 in bfloat16: bin 324 (not 326) of 1000, and a
    threshold of 0.325 keeps the pixel (class 0)."""
    logits = torch.tensor([0.3, 0.0, -0.3]).view(1, 3, 1, 1).to(torch.bfloat16)
    probs = torch.softmax(logits.float(), dim=1)
    entropy = -(probs * torch.log(probs)).sum().item() / 3 / math.log(3)
    assert math.isclose(entropy, 0.32439, rel_tol=1e-4)
    targets = torch.zeros(1, 1, 1, dtype=torch.long)
    hist = entropy_histogram(logits, targets, 3, 1.0, nb_bins=1000)
    assert hist.sum() == 1 and hist[0, 324] == 1
    labels, factor = entropy_pseudo_labels(targets, logits, torch.full((3,), 0.325), 1.0, num_old=3)
    assert labels.flatten().tolist() == [0] and factor.item() > 0.999


@pytest.mark.parametrize('setting', ['pseudo', 'classif_adaptive_factor'])
def test_step1_without_pseudo_labels_or_adaptive_factor_weighs_every_image_by_one(setting):
    """``pseudo=None``: the cross-entropy on the plain targets; ``classif_adaptive_factor=False``:
    on the pseudo-labels; in both, every image weighs 1 (image_weighted_cross_entropy with a
    weight of ones, one per image), which is the plain cross-entropy over every pixel."""
    cfg = load_config('small')
    cfg.model.update({setting: None if setting == 'pseudo' else False})
    model = method_model('plop', 1, cfg).eval()
    drift_student(model)
    thr = model.compute_thresholds([batch(1), batch(2)])
    data = model.data_preprocessor(batch(3), False)
    inputs, targets = data['inputs'], data['data_samples']
    losses = model(**data, mode='loss')
    with torch.no_grad():
        new, old = model.forward_maps(inputs), model.teacher.forward_maps(inputs)
        labels = targets
        if setting == 'classif_adaptive_factor':
            labels, _ = entropy_pseudo_labels(targets, old['logits'], thr, math.log(21), 16)
        ce = cross_entropy(new['logits'], labels, 255)
    torch.testing.assert_close(losses['loss_ce'].detach(), ce)
