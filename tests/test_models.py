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


def test_balanced_init_at_a_later_step_copies_background_into_the_newest_classifier_only():
    """At step 2 (classifiers of 3, 2 and 4 classes) MiB's init writes the newest (third)
    classifier: each of its 4 classes gets the background's weight and the bias
    b_bkg - log(4 + 1); the background's bias becomes that too; step 1's classifier and
    the old classes' rows stay (log 5 = 1.6094379...)."""
    from cssbench.models import init_classifier_from_background
    torch.manual_seed(0)
    model = CSSBENCH_MODELS.build(dict(
        type='cssbench.IncrementalSegmentor', step_sizes=[3, 2, 4],
        backbone=dict(type='cssbench.SmallResNet', widths=(8, 8, 8, 8)),
        decode_head=dict(type='cssbench.ASPPHead', channels=8, dilations=(1, 2))))
    assert model.step == 2 and model.num_old_classes == 3 + 2
    with torch.no_grad():
        for cls in model.classifiers:
            cls.weight.normal_()
        model.classifiers[0].bias.copy_(torch.tensor([0.7, -0.2, 0.4]))
    before = [(c.weight.clone(), c.bias.clone()) for c in model.classifiers]
    init_classifier_from_background(model)
    bkg_weight = before[0][0][0]
    new = model.classifiers[2]
    assert torch.equal(new.weight, bkg_weight.expand(4, -1, -1, -1))
    torch.testing.assert_close(new.bias, torch.full((4,), 0.7 - 1.6094379124341003))
    torch.testing.assert_close(model.classifiers[0].bias, torch.tensor([0.7 - 1.6094379124341003, -0.2, 0.4]))
    assert torch.equal(model.classifiers[0].weight, before[0][0])
    assert torch.equal(model.classifiers[1].weight, before[1][0])
    assert torch.equal(model.classifiers[1].bias, before[1][1])


def test_small_resnet_and_aspp_head_have_their_strides_dilations_and_parameter_counts():
    """SmallResNet's stride-2 stem and default strides (1, 2, 2, 1): output stride 8, the last
    stage dilated by 2 (padding 2 keeps its size); every convolution before a BN is bias-free.
    Parameter counts by hand: backbone (widths 4, 6, 8, 8): stem 3*4*9 + 8; stage 1
    2*(4*4*9 + 8); stage 2 4*6*9 + 6*6*9 + 4*6 + 3*12; stage 3 6*8*9 + 8*8*9 + 6*8 + 3*16;
    stage 4 2*(8*8*9 + 16) = 3308. Head (8 in, 8 channels, dilations 1, 2): 1x1 branch 64 + 16,
    3x3 branch 576 + 16, pooled 64 + 16, projection of 3 * 8 channels 192 + 16 = 960."""
    from cssbench.models import ASPPHead, SmallResNet
    torch.manual_seed(0)
    backbone = SmallResNet(widths=(4, 6, 8, 8)).eval()
    head = ASPPHead(8, channels=8, dilations=(1, 2)).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 32, 32))
        out = head(feats[-1])
    assert [tuple(f.shape) for f in feats] == [(1, 4, 16, 16), (1, 6, 8, 8), (1, 8, 4, 4), (1, 8, 4, 4)]
    assert out.shape == (1, 8, 4, 4)
    assert sum(p.numel() for p in backbone.parameters()) == 3308
    assert sum(p.numel() for p in head.parameters()) == 960
    assert [(s.conv1[0].stride[0], s.conv1[0].dilation[0], s.conv2[0].dilation[0])
            for s in backbone.stages] == [(1, 1, 1), (2, 1, 1), (2, 1, 1), (1, 2, 2)]
    stem, last = backbone.stem[0], backbone.stages[3]
    assert (stem.stride, stem.dilation, stem.padding) == ((2, 2), (1, 1), (1, 1))
    for conv in (last.conv1[0], last.conv2[0]):
        assert (conv.stride, conv.dilation, conv.padding) == ((1, 1), (2, 2), (2, 2))
    assert [(b[0].kernel_size, b[0].dilation, b[0].padding) for b in head.branches] == [
        ((1, 1), (1, 1), (0, 0)), ((3, 3), (2, 2), (2, 2))]


def test_data_preprocessor_normalises_uint8_images_by_imagenet_statistics_and_widens_masks():
    """Pixel (255, 0, 128) becomes ((1 - 0.485) / 0.229, (0 - 0.456) / 0.224,
    (128 / 255 - 0.406) / 0.225) = (2.24891, -2.03571, 0.42649) in float32; masks become
    int64 with the same values; contiguous unless channels_last is asked for."""
    from cssbench.models import SegDataPreprocessor
    image = torch.zeros(2, 3, 2, 3, dtype=torch.uint8)
    image[1, :, 0, 2] = torch.tensor([255, 0, 128], dtype=torch.uint8)
    mask = torch.tensor([[[0, 5, 255], [1, 2, 3]]] * 2, dtype=torch.uint8)
    out = SegDataPreprocessor()(dict(inputs=image, data_samples=mask))
    assert out['inputs'].dtype == torch.float32 and out['inputs'].shape == (2, 3, 2, 3)
    assert out['inputs'].is_contiguous()
    torch.testing.assert_close(out['inputs'][1, :, 0, 2],
                               torch.tensor([2.2489083, -2.0357143, 0.4264924]))
    torch.testing.assert_close(out['inputs'][0, :, 1, 1],   # a black pixel: -mean / std
                               torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))
    assert out['data_samples'].dtype == torch.int64 and torch.equal(out['data_samples'], mask.long())
    assert SegDataPreprocessor()(dict(inputs=image))['data_samples'] is None
    last = SegDataPreprocessor(channels_last=True)(dict(inputs=image, data_samples=mask))['inputs']
    assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
    torch.testing.assert_close(last, out['inputs'], rtol=0, atol=0)


@pytest.mark.parametrize('output_stride, sizes, dilations', [
    (8, [16, 8, 8, 8], (2, 4)), (16, [16, 8, 4, 4], (1, 2)), (32, [16, 8, 4, 2], (1, 1))])
def test_torchvision_resnet_is_dilated_to_its_output_stride(output_stride, sizes, dilations):
    """A 64 px input: the stem's stride 4, then stages of strides 1, 2, 2, 2 where undilated;
    output stride 8 dilates layer3 by 2 and layer4 by 4 in place of their strides, 16 only
    layer4 by 2, 32 none."""
    from cssbench.models import TorchvisionResNet
    net = TorchvisionResNet(depth=50, output_stride=output_stride).eval()
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == sizes
    assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048] and net.out_channels == 2048
    assert (net.layer3[1].conv2.dilation[0], net.layer4[1].conv2.dilation[0]) == dilations


def test_a_pretrained_path_under_the_home_directory_is_expanded(tmp_path, monkeypatch):
    import torchvision

    from cssbench.models import TorchvisionResNet
    imagenet = torchvision.models.resnet18()
    torch.save(imagenet.state_dict(), tmp_path / 'r18.pth')
    monkeypatch.setenv('HOME', str(tmp_path))
    backbone = TorchvisionResNet(depth=18, output_stride=32, pretrained='~/r18.pth')
    assert torch.equal(backbone.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)


def test_residual_block_adds_its_shortcut_before_the_relu():
    """With zero convolution weights the residual branch is its last BN's bias (eval mode,
    running mean 0, variance 1): the block computes relu(x + bias) with an identity shortcut;
    a strided block of as many channels projects its shortcut (an identity would not fit)."""
    from cssbench.models import ResidualBlock
    block = ResidualBlock(2, 2).eval()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
        block.conv2[1].bias.copy_(torch.tensor([-0.5, 0.25]))
        x = torch.tensor([[[[1.0, 0.2]], [[-1.0, 0.5]]]])   # (1, 2, 1, 2)
        expected = torch.tensor([[[[0.5, 0.0]], [[0.0, 0.75]]]])
        torch.testing.assert_close(block(x), expected)
        strided = ResidualBlock(2, 2, stride=2).eval()
        assert not isinstance(strided.shortcut, torch.nn.Identity)
        assert strided(torch.randn(1, 2, 8, 8)).shape == (1, 2, 4, 4)


def test_aspp_head_defaults_to_deeplabv3s_256_channels_and_rates_1_6_12_18():
    from cssbench.models import ASPPHead
    head = ASPPHead(16)
    assert head.channels == 256 and head.project[0].out_channels == 256
    assert [(b[0].kernel_size[0], b[0].dilation[0], b[0].padding[0]) for b in head.branches] == [
        (1, 1, 0), (3, 6, 6), (3, 12, 12), (3, 18, 18)]
    assert head.project[0].in_channels == 5 * 256


def test_classifiers_are_1x1_convolutions_whose_logits_concatenate_in_step_order():
    """Each step's classifier is a per-pixel affine map of the head's features (a 1x1
    convolution), its logits after the previous steps'; the constructor's defaults: no
    classifier dropout, a disjoint protocol, and a given data preprocessor is the one used."""
    model = CSSBENCH_MODELS.build(dict(
        type='cssbench.IncrementalSegmentor', step_sizes=[2, 1],
        backbone=dict(type='cssbench.SmallResNet', widths=(8, 8, 8, 8)),
        decode_head=dict(type='cssbench.ASPPHead', channels=2, dilations=(1, 2)))).eval()
    assert model.classifier_dropout.p == 0.0 and model.overlapped is False
    with torch.no_grad():
        model.classifiers[0].weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]).view(2, 2, 1, 1))
        model.classifiers[0].bias.copy_(torch.tensor([0.5, 0.0]))
        model.classifiers[1].weight.copy_(torch.tensor([[3.0, 0.0]]).view(1, 2, 1, 1))
        model.classifiers[1].bias.copy_(torch.tensor([-1.0]))
        features = torch.tensor([[1.0, 0.0], [2.0, -1.0]]).view(1, 2, 1, 2)  # pixel (1, 2), (0, -1)
        # pixel 0: (1 + 4 + .5, 0 - 2, 3 - 1); pixel 1: (0 - 2 + .5, 0 + 1, 0 - 1)
        expected = torch.tensor([[5.5, -1.5], [-2.0, 1.0], [2.0, -1.0]]).view(1, 3, 1, 2)
        torch.testing.assert_close(model.classify(features), expected)
    custom = CSSBENCH_MODELS.build(dict(
        type='cssbench.IncrementalSegmentor', step_sizes=[2],
        backbone=dict(type='cssbench.SmallResNet', widths=(8, 8, 8, 8)),
        decode_head=dict(type='cssbench.ASPPHead', channels=2, dilations=(1, 2)),
        data_preprocessor=dict(type='cssbench.SegDataPreprocessor', mean=(0, 0, 0), std=(2, 2, 2))))
    out = custom.data_preprocessor(dict(inputs=torch.full((1, 3, 2, 2), 8, dtype=torch.uint8)))
    assert torch.equal(out['inputs'], torch.full((1, 3, 2, 2), 4.0))


def test_aspp_adds_the_image_pool_branch_channel_by_channel():
    """One 1x1 branch (identity) and the image pool (its 1x1 convolution [[1, 0], [0, 2]]),
    projected to the pool's two channels: every pixel holds channel 0's mean and twice
    channel 1's, each through two eval BNs of default statistics (x / sqrt(1 + eps)) and
    ReLUs. The means differ, so channels swapped or mixed would show."""
    from cssbench.models import ASPPHead
    head = ASPPHead(2, channels=2, dilations=(1,)).eval()
    with torch.no_grad():
        head.branches[0][0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        head.image_pool[1][0].weight.copy_(torch.tensor([[1., 0.], [0., 2.]]).view(2, 2, 1, 1))
        head.project[0].weight.zero_()
        head.project[0].weight[0, 2] = 1.0   # channel 0 of the pooled branch
        head.project[0].weight[1, 3] = 1.0   # its channel 1
        x = torch.stack([torch.arange(9.).view(3, 3), torch.full((3, 3), 10.0)]).unsqueeze(0)
        out = head(x)
    bn = 1 / (1 + 1e-5)   # two BNs on the way
    assert out.shape == (1, 2, 3, 3)
    torch.testing.assert_close(out[0, 0], torch.full((3, 3), 4.0 * bn))    # mean of 0..8
    torch.testing.assert_close(out[0, 1], torch.full((3, 3), 20.0 * bn))   # 2 x 10
