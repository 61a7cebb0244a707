"""LwF, ILT and MiB: they build from a config, their step-1 loss is what the losses say,
MiB's initialisation keeps the old model's background, and each runs a protocol end to end."""
from __future__ import annotations

import math

import pytest
import torch

from cssbench.config import load_config
from cssbench.losses import (cross_entropy, feature_distillation, knowledge_distillation,
                                        unbiased_cross_entropy, unbiased_knowledge_distillation)
from cssbench.methods import get_method
from cssbench.protocols import load_protocol
from cssbench.runner import build_model, run_protocol
from conftest import drift_student, method_model

METHODS = ('lwf', 'ilt', 'mib')
KEYS = dict(lwf={'loss_ce', 'loss_kd'}, ilt={'loss_ce', 'loss_kd', 'loss_de'}, mib={'loss_ce', 'loss_kd'})


def batch(seed: int = 0, size: int = 16, num_classes: int = 21):
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, num_classes, (2, size, size), generator=g)
    targets[:, :2] = 255
    return dict(inputs=torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=g),
                data_samples=targets)


def test_hyperparameters_default_to_the_references_voc_settings_and_follow_the_config():
    lwf, ilt, mib = (method_model(m, 1) for m in METHODS)
    assert (lwf.loss_kd, lwf.kd_alpha) == (100.0, 1.0)
    assert (ilt.loss_kd, ilt.loss_de, ilt.kd_alpha) == (100.0, 100.0, 1.0)
    assert (mib.loss_kd, mib.kd_alpha, mib.init_balanced) == (10.0, 1.0, True)
    cfg = load_config('small')
    cfg.model.update(loss_kd=3.0, loss_de=0.5)
    assert (method_model('ilt', 1, cfg).loss_kd, method_model('ilt', 1, cfg).loss_de) == (3.0, 0.5)


@pytest.mark.parametrize('name', METHODS)
def test_step1_loss_has_its_terms_is_finite_and_trains_only_the_student(name):
    model = method_model(name, 1).train()
    grad_mode = []
    model.teacher.backbone.register_forward_hook(lambda *_: grad_mode.append(torch.is_grad_enabled()))
    data = model.data_preprocessor(batch(), True)
    losses = model(**data, mode='loss')
    assert grad_mode == [False]   # the teacher's forward, once, under no_grad: no graph kept
    assert set(losses) == KEYS[name]
    assert all(torch.isfinite(v) and v.requires_grad for v in losses.values())
    assert all(v.item() > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.classifiers[1].weight.grad is not None and model.backbone.stem[0].weight.grad is not None
    assert not model.teacher.training  # model.train() does not reach the teacher


@pytest.mark.parametrize('name', METHODS)
def test_step0_loss_has_the_same_keys_with_zero_distillation(name):
    method = get_method(name)
    model = build_model(load_config('small'), method.model_type, load_protocol('voc-15-5-overlap'), 0)
    model.init_new_classifier()  # a no-op at step 0
    data = model.data_preprocessor(batch(num_classes=16), True)
    losses = model(**data, mode='loss')
    assert set(losses) == KEYS[name]
    assert losses['loss_ce'].item() > 0 and losses['loss_ce'].requires_grad
    assert all(v.item() == 0.0 for k, v in losses.items() if k != 'loss_ce')


@pytest.mark.parametrize('name', METHODS)
def test_a_batch_of_only_ignored_pixels_gives_a_finite_loss(name):
    model = method_model(name, 1).train()
    data = model.data_preprocessor(dict(batch(), data_samples=torch.full((2, 16, 16), 255)), True)
    losses = model(**data, mode='loss')
    assert losses['loss_ce'].item() == 0.0
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.parametrize('name', METHODS)
def test_the_terms_are_the_weighted_shared_losses_on_the_logits_and_backbone_output(name):
    model = method_model(name, 1).eval()  # eval: no dropout, so two forwards agree
    drift_student(model)
    data = model.data_preprocessor(batch(1), False)
    inputs, targets = data['inputs'], data['data_samples']
    losses = model(**data, mode='loss')
    with torch.no_grad():
        new, old = model.encode_decode(inputs), model.teacher.encode_decode(inputs)
    if name == 'mib':
        ce = unbiased_cross_entropy(new['logits'], targets, 16)
        kd = 10 * unbiased_knowledge_distillation(new['logits'], old['logits'])
    else:
        ce = cross_entropy(new['logits'], targets)
        kd = 100 * knowledge_distillation(new['logits'], old['logits'])
    torch.testing.assert_close(losses['loss_ce'].detach(), ce)
    torch.testing.assert_close(losses['loss_kd'].detach(), kd)
    if name == 'ilt':
        de = 100 * feature_distillation(new['body'][-1], old['body'][-1])  # the backbone's output
        assert de > 1e-3 and not torch.isclose(de, 100 * feature_distillation(new['features'], old['features']))
        torch.testing.assert_close(losses['loss_de'].detach(), de)


def test_ilt_without_output_distillation_still_distils_the_encoder():
    """ILT needs its teacher for either term: with ``loss_kd = 0`` the encoder distillation
    still compares the backbone outputs (loss_de = 100 * MSE > 0) and loss_kd is 0. A teacher
    asked for only when ``loss_kd > 0`` would leave loss_de 0 here."""
    cfg = load_config('small')
    cfg.model.update(loss_kd=0.0)
    model = method_model('ilt', 1, cfg).eval()
    drift_student(model)
    data = model.data_preprocessor(batch(1), False)
    losses = model(**data, mode='loss')
    with torch.no_grad():
        new, old = model.encode_decode(data['inputs']), model.teacher.encode_decode(data['inputs'])
    de = 100 * feature_distillation(new['body'][-1], old['body'][-1])
    assert losses['loss_kd'].item() == 0 and de > 1e-3
    torch.testing.assert_close(losses['loss_de'].detach(), de)


@pytest.mark.parametrize('name, weights', [
    ('lwf', dict(loss_kd=0.5)),
    ('mib', dict(loss_kd=0.5)),
    ('ilt', dict(loss_kd=0.5, loss_de=0.0)),   # output distillation alone
    ('ilt', dict(loss_kd=0.0, loss_de=0.5)),   # encoder distillation alone
])
def test_a_weight_below_one_turns_its_term_on_alone(name, weights):
    """Any positive weight is a term that is on, also alone and below 1: loss_kd = 0.5 gives
    0.5 * KD and ILT's loss_de = 0.5 gives 0.5 * MSE of the backbone outputs, each > 0, and
    a 0 weight gives 0. (A teacher run, or a term computed, only for weights above 1, or ILT
    asking for its teacher for one of its two terms only, would leave a term 0 here.)"""
    cfg = load_config('small')
    cfg.model.update(weights)
    model = method_model(name, 1, cfg).eval()
    drift_student(model)
    data = model.data_preprocessor(batch(1), False)
    losses = model(**data, mode='loss')
    with torch.no_grad():
        new, old = model.encode_decode(data['inputs']), model.teacher.encode_decode(data['inputs'])
    kd = unbiased_knowledge_distillation if name == 'mib' else knowledge_distillation
    expected = dict(loss_kd=weights['loss_kd'] * kd(new['logits'], old['logits']))
    if name == 'ilt':
        expected['loss_de'] = weights['loss_de'] * feature_distillation(new['body'][-1], old['body'][-1])
    for key, value in expected.items():
        weight = weights[key]
        assert (value.item() > 0) == (weight > 0), key
        torch.testing.assert_close(losses[key].detach(), value, msg=key)


@pytest.mark.parametrize('name, off', [('lwf', dict(loss_kd=0.0)), ('mib', dict(loss_kd=0.0)),
                                       ('ilt', dict(loss_kd=0.0, loss_de=0.0)),
                                       ('sdr', dict(loss_kd=0.0, loss_de_prototypes=0.0))])
def test_with_every_term_that_reads_the_teacher_off_the_teacher_is_not_run(name, off):
    """``needs_teacher``: with the weight of every term that reads the previous model at 0, a
    step-1 batch runs no forward of that model (a whole network pass per batch for nothing)
    and those terms are 0."""
    cfg = load_config('small')
    cfg.model.update(off)
    model = method_model(name, 1, cfg).train()
    calls = []
    model.teacher.backbone.register_forward_hook(lambda *_: calls.append(1))
    losses = model(**model.data_preprocessor(batch(), True), mode='loss')
    assert calls == []
    assert all(losses[k].item() == 0 for k in ('loss_kd', 'loss_de', 'loss_pm') if k in losses)
    assert losses['loss_ce'].item() > 0


BALANCED_INIT = ('mib', 'plop', 'sdr+mib')   # the methods whose new classifier starts as MiB's


@pytest.mark.parametrize('name', BALANCED_INIT)
@pytest.mark.parametrize('protocol, new', [('voc-15-5-overlap', 5), ('voc-19-1-overlap', 1)])
def test_mib_init_keeps_the_old_background_probability_and_the_old_classes(name, protocol, new):
    model = method_model(name, 1, protocol=protocol).eval()
    n_old = model.num_old_classes
    old_cls, new_cls = model.teacher.classifiers[0], model.classifiers
    torch.testing.assert_close(new_cls[1].weight, old_cls.weight[:1].expand(new, -1, -1, -1))
    expected_bias = old_cls.bias[0] - math.log(new + 1)
    torch.testing.assert_close(new_cls[1].bias, expected_bias.expand(new))
    torch.testing.assert_close(new_cls[0].bias[0], expected_bias)
    inputs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        p_new = model(inputs).softmax(dim=1)
        p_old = model.teacher(inputs).softmax(dim=1)
    assert p_new.shape[1] == n_old + new
    bkg_or_new = p_new[:, 0] + p_new[:, n_old:].sum(dim=1)
    assert torch.allclose(bkg_or_new, p_old[:, 0], atol=1e-6)
    assert torch.allclose(p_new[:, 1:n_old], p_old[:, 1:], atol=1e-6)


@pytest.mark.parametrize('name', BALANCED_INIT)
def test_mib_init_can_be_turned_off(name):
    cfg = load_config('small')
    cfg.model.update(init_balanced=False)
    model = method_model(name, 1, cfg)
    assert not torch.allclose(model.classifiers[1].weight[0], model.classifiers[0].weight[0])


@pytest.mark.parametrize('name', METHODS)
def test_each_method_runs_a_two_step_protocol(name, synth32, config32, tmp_path):
    steps = run_protocol('synth-15-5-overlap', name, config=str(config32), data_root=str(synth32),
                         epochs=1, results_root=tmp_path, log=lambda *a: None)
    assert [s['step'] for s in steps] == [0, 1]
    assert set(steps[1]['iou']) == {str(c) for c in range(21)}
    assert all(0.0 <= v <= 1.0 for v in steps[1]['iou'].values() if v is not None)


@pytest.mark.parametrize('name', ['mib', 'lwf'])
def test_kd_alpha_from_the_config_reaches_the_distillation(name):
    """A non-default ``kd_alpha`` (reference ``--alpha``) scales the teacher's logits inside
    the method's distillation term: loss_kd = loss_kd_weight * KD(new, old, alpha=2), which
    differs from the alpha=1 value."""
    cfg = load_config('small')
    cfg.model.update(kd_alpha=2.0)
    model = method_model(name, 1, cfg).eval()
    assert model.kd_alpha == 2.0
    drift_student(model)
    g = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 21, (2, 16, 16), generator=g)
    inputs = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g)
    data = model.data_preprocessor(dict(inputs=inputs, data_samples=targets), False)
    losses = model(**data, mode='loss')
    with torch.no_grad():
        new = model.encode_decode(data['inputs'])['logits']
        old = model.teacher.encode_decode(data['inputs'])['logits']
    kd, weight = ((unbiased_knowledge_distillation, 10.0) if name == 'mib'
                  else (knowledge_distillation, 100.0))
    expected = weight * kd(new, old, 2.0)
    torch.testing.assert_close(losses['loss_kd'].detach(), expected)
    assert not torch.isclose(expected, weight * kd(new, old, 1.0))


def _another_value(value):
    """A valid setting other than ``value`` (a default of a method's constructor)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, tuple):
        return value[:-1]
    return None   # PLOP's pseudo: 'entropy' or None


def _step0_after_one_backward(name: str, settings: dict) -> tuple[dict, list, dict]:
    """A method's step-0 losses on a batch, its gradients, and its state after the forward."""
    cfg = load_config('small')
    cfg.model.update(settings)
    torch.manual_seed(0)
    model = build_model(cfg, get_method(name).model_type, load_protocol('voc-15-5-overlap'), 0)
    model.train().init_new_classifier()
    losses = model(**model.data_preprocessor(batch(num_classes=16), True), mode='loss')
    sum(losses.values()).backward()
    return ({k: v.detach() for k, v in losses.items()}, [p.grad for p in model.parameters()],
            model.state_dict())


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize('name', ['lwf', 'ilt', 'mib', 'plop', 'sdr', 'sdr+mib'])
def test_the_settings_a_method_names_unused_at_step0_change_nothing_there(name):
    """A config setting only these shares the cached step 0 of the method's defaults: each set
    otherwise leaves step 0's losses, gradients and state (SDR's prototypes) bit for bit."""
    from cssbench.registry import MODELS
    from cssbench.runner import model_setting_parameters
    model_cls = MODELS.get(get_method(name).model_type)
    params = model_setting_parameters(model_cls)
    unused = model_cls.settings_unused_at_step0
    assert unused and set(unused) <= set(params)
    changed = {k: _another_value(params[k].default) for k in unused}
    assert all(v != params[k].default for k, v in changed.items())
    assert _same(_step0_after_one_backward(name, {}), _step0_after_one_backward(name, changed))
    if name == 'sdr':   # and the comparison sees a setting that step 0 reads
        assert not _same(_step0_after_one_backward(name, {}),
                         _step0_after_one_backward(name, dict(featspars_at_step0=True)))
