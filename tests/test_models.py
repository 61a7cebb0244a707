"""The incremental segmentor: builds from both configs through mmseg's registry, grows, loads."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from mmseg.registry import MODELS as MMSEG_MODELS

from cssbench.config import load_config
from cssbench.errors import UserError
from cssbench.models import bilinear_weights, resize_bilinear, upsample_logits
from cssbench.protocols import load_protocol
from cssbench.registry import MODELS as CSSBENCH_MODELS
from cssbench.runner import build_model, load_previous_weights, save_weights


@pytest.mark.parametrize('config', ['small', 'deeplabv3-r101'])
def test_config_builds_a_model_whose_logits_cover_the_seen_classes(config):
    protocol = load_protocol('voc-15-1-overlap')
    model = build_model(load_config(config), 'cssbench.IncrementalSegmentor', protocol, 2).eval()
    assert [c.out_channels for c in model.classifiers] == [16, 1, 1]
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 18, 64, 64)


def test_deeplabv3_r101_is_output_stride_16_with_the_papers_head():
    model = build_model(load_config('deeplabv3-r101'), 'cssbench.IncrementalSegmentor',
                        load_protocol('voc-15-5-overlap'), 0).eval()
    with torch.no_grad():
        out = model.extract(torch.randn(1, 3, 64, 64))
    assert out['body'][-1].shape == (1, 2048, 4, 4)
    assert out['features'].shape == (1, 256, 4, 4)
    assert sum(p.numel() for p in model.backbone.parameters()) == pytest.approx(42.5e6, rel=0.01)


def test_pretrained_backbone_loads_every_weight_or_is_refused(tmp_path):
    import torchvision

    from cssbench.models import TorchvisionResNet
    imagenet = torchvision.models.resnet50()
    torch.save(imagenet.state_dict(), tmp_path / 'r50.pth')
    backbone = TorchvisionResNet(depth=50, pretrained=str(tmp_path / 'r50.pth'))
    assert torch.equal(backbone.layer4[2].conv3.weight, imagenet.layer4[2].conv3.weight)
    assert torch.equal(backbone.stem[1].running_var, imagenet.bn1.running_var)
    # a checkpoint saved before BN counted its batches lacks num_batches_tracked: it loads
    torch.save({k: v for k, v in imagenet.state_dict().items() if not k.endswith('num_batches_tracked')},
               tmp_path / 'r50_old.pth')
    old = TorchvisionResNet(depth=50, pretrained=str(tmp_path / 'r50_old.pth'))
    assert torch.equal(old.layer4[2].conv3.weight, imagenet.layer4[2].conv3.weight)

    torch.save({'state_dict': imagenet.state_dict()}, tmp_path / 'wrapped.pth')  # a training checkpoint
    with pytest.raises(UserError, match=r'wrapped.pth: not a torchvision ResNet checkpoint: '
                                        r'265 of its 265 tensors missing .* 1 unknown \(e.g. state_dict\)'):
        TorchvisionResNet(depth=50, pretrained=str(tmp_path / 'wrapped.pth'))
    with pytest.raises(UserError, match='255 of its 520 tensors missing'):   # another depth
        TorchvisionResNet(depth=101, pretrained=str(tmp_path / 'r50.pth'))
    (tmp_path / 'junk.pth').write_text('not a checkpoint')
    with pytest.raises(UserError, match='junk.pth: cannot read this pretrained checkpoint'):
        TorchvisionResNet(depth=50, pretrained=str(tmp_path / 'junk.pth'))


def test_cssbench_models_live_in_a_child_of_mmsegs_registry():
    assert CSSBENCH_MODELS.parent is MMSEG_MODELS
    assert MMSEG_MODELS._children['cssbench'] is CSSBENCH_MODELS
    model = CSSBENCH_MODELS.build(dict(
        type='cssbench.IncrementalSegmentor', step_sizes=[3, 2],
        backbone=dict(type='cssbench.SmallResNet', widths=(8, 8, 8, 8)),
        decode_head=dict(type='cssbench.ASPPHead', channels=8, dilations=(1, 2))))
    assert model.num_old_classes == 3 and model.step == 1


def test_loss_and_predict_follow_mmengine_modes():
    protocol = load_protocol('voc-19-1-overlap')
    model = build_model(load_config('small'), 'cssbench.IncrementalSegmentor', protocol, 1)
    batch = dict(inputs=torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
                 data_samples=torch.randint(0, 21, (2, 32, 32)))
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode='loss')
    assert set(losses) == {'loss_ce'} and losses['loss_ce'].requires_grad
    model.eval()
    [out] = model(**data, mode='predict')
    assert out['pred'].shape == (2, 32, 32) and int(out['pred'].max()) < 21
    assert torch.equal(out['gt'], batch['data_samples'])


def test_previous_step_weights_load_into_the_grown_model_and_others_are_refused(tmp_path):
    cfg = load_config('small')
    protocol = load_protocol('voc-15-1-overlap')
    step0 = build_model(cfg, 'cssbench.IncrementalSegmentor', protocol, 0)
    save_weights(step0, tmp_path / 'step0.pth')
    step1 = build_model(cfg, 'cssbench.IncrementalSegmentor', protocol, 1)
    state = torch.load(tmp_path / 'step0.pth', weights_only=True)
    load_previous_weights(step1, state, tmp_path / 'step0.pth')
    assert torch.equal(step1.classifiers[0].weight, step0.classifiers[0].weight)
    assert torch.equal(step1.backbone.stem[0].weight, step0.backbone.stem[0].weight)

    other = build_model(cfg, 'cssbench.IncrementalSegmentor', load_protocol('voc-10-1-overlap'), 1)
    with pytest.raises(UserError, match='does not fit'):
        load_previous_weights(other, state, tmp_path / 'step0.pth')


def test_teacher_is_frozen_and_not_part_of_the_student():
    cfg = load_config('small')
    protocol = load_protocol('voc-15-1-overlap')
    teacher = build_model(cfg, 'cssbench.IncrementalSegmentor', protocol, 0)
    student = build_model(cfg, 'cssbench.IncrementalSegmentor', protocol, 1)
    n_params = len(list(student.parameters()))
    student.set_teacher(teacher)
    assert student.teacher is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert len(list(student.parameters())) == n_params
    assert not any(k.startswith('teacher') for k in student.state_dict())


@pytest.mark.parametrize('size, out', [((32, 32), (512, 512)), ((8, 8), (64, 64)), ((33, 24), (500, 375)),
                                       ((16, 12), (5, 7)), ((1, 1), (4, 3)), ((10, 10), (10, 10))])
def test_upsampled_logits_and_their_gradient_are_bilinear_interpolations(size, out):
    """The two matrix products compute F.interpolate's bilinear resize (align_corners=False),
    up and down, at integer and other ratios; and its backward."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    expected = F.interpolate(x, size=out, mode='bilinear', align_corners=False)
    got = resize_bilinear(x, out)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0],
                               torch.autograd.grad(expected, x, grad)[0], rtol=0, atol=1e-11)
    # and what the segmentor calls: fp32 out of any input dtype and memory layout, under
    # autocast too (whose matrix products would compute in bf16)
    logits = x.detach().to(torch.bfloat16).to(memory_format=torch.channels_last)
    expected = F.interpolate(logits.float(), size=out, mode='bilinear', align_corners=False)
    for amp in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            up = upsample_logits(logits, out)
        assert up.dtype == torch.float32 and up.shape == (2, 3, *out)
        torch.testing.assert_close(up, expected, rtol=1e-5, atol=1e-5)


def test_bilinear_weights_rows_sum_to_one_with_two_neighbours_at_most():
    w = bilinear_weights(7, 23, 'cpu', torch.float64)
    assert w.shape == (23, 7)
    torch.testing.assert_close(w.sum(1), torch.ones(23, dtype=torch.float64))
    assert ((w > 0).sum(1) <= 2).all()
    # output 0 reads input position (0 + 0.5) * 7 / 23 - 0.5 < 0: clamped to input 0
    assert w[0, 0] == 1


@pytest.mark.parametrize('value, what', [
    (torch.tensor(3), 'a tensor of dtype torch.int64, not a floating-point one'),
    (torch.tensor(True), 'a tensor of dtype torch.bool, not a floating-point one'),
    (torch.ones(2, 2), 'a tensor of shape (2, 2)'),
    (0.5, 'a float'),
])
def test_a_loss_term_that_is_not_one_floating_point_number_is_refused(value, what):
    """An integer count among the logged terms is refused in one line (a refusal: a command
    of several runs goes on), not left to fail in mmengine's mean() with a traceback."""
    protocol = load_protocol('voc-19-1-overlap')
    model = build_model(load_config('small'), 'cssbench.IncrementalSegmentor', protocol, 1)
    loss, log_vars = model.parse_losses(dict(loss_ce=torch.tensor(1.5), acc=torch.tensor(0.25)))
    assert float(loss) == 1.5 and dict(log_vars)['acc'] == 0.25
    with pytest.raises(UserError, match=r"IncrementalSegmentor\.loss returned 'count' as "
                       + re.escape(what) + ': each term is one number'):
        model.parse_losses(dict(loss_ce=torch.tensor(1.5), count=value))
