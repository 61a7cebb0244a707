"""The speed settings (config section, run flags, what applies on CPU), float16's loss scaling,
the losses logged without per-iteration host syncs, channels_last models and the teacher made
for inference, on CPU."""
from __future__ import annotations

import copy
from statistics import mean
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import ConfigDict
from mmengine.evaluator import Evaluator
from mmengine.optim import build_optim_wrapper
from torch.utils.data import DataLoader, default_collate

from cssbench.cli import main
from cssbench.config import config_digest, load_config
from cssbench.engine import sgd_config
from cssbench.errors import UserError
from cssbench.hooks import AveragedRuntimeInfoHook
from cssbench.methods import get_method
from cssbench.metrics import IncrementalIoUMetric
from cssbench.models import fold_batch_norms, store_convolutions_in
from cssbench.protocols import load_protocol
from cssbench.registry import LOOPS
from cssbench.runner import build_model, speed_record
from cssbench.speed import (REFERENCE_SPEED, Speed, emulated_bf16_note, optim_wrapper_config,
                            prepare_model, resolve_speed, val_loop_config)
from conftest import (SMALL_DIGEST, batch_norms, float16_steps_by_hand, hook_runner,
                      sdr_losses_with_a_trained_teacher, with_trained_looking_batch_norms)


def test_defaults_config_section_and_run_flags():
    assert resolve_speed(None, 'c.py') == dict(amp='bfloat16', channels_last=True,
                                               cudnn_benchmark=True, compile=False,
                                               inference_teacher=True)
    assert resolve_speed(dict(channels_last=False), 'c.py')['channels_last'] is False
    assert resolve_speed(dict(amp=None), 'c.py', compile=True) == dict(
        amp=None, channels_last=True, cudnn_benchmark=True, compile=True, inference_teacher=True)
    assert resolve_speed(dict(compile=True), 'c.py', fp32=True) == dict(
        amp=None, channels_last=False, cudnn_benchmark=False, compile=False, inference_teacher=False)
    assert Speed(**resolve_speed(None, 'c.py', fp32=True)) == REFERENCE_SPEED


@pytest.mark.parametrize('section, flags, message', [
    (dict(amp='float8'), {}, 'speed.amp must be "bfloat16", "float16" or None'),
    (dict(channel_last=True), {}, r"c.py: unknown speed setting\(s\) \['channel_last'\]"),
    (None, dict(compile=True, fp32=True), '--compile and --fp32 exclude each other'),
    # taken as they were: a string 'False' turned cudnn's benchmark on
    (dict(cudnn_benchmark='False'), {}, "c.py: speed.cudnn_benchmark must be True or False, got 'False'"),
    (dict(channels_last=0), dict(fp32=True), 'c.py: speed.channels_last must be True or False, got 0'),
    (dict(compile=1), {}, 'c.py: speed.compile must be True or False, got 1'),
    ('fast', {}, r"c.py: speed must be a dict of speed settings, e.g. speed = dict\(amp='float16'\), "
                 r"got 'fast'"),
])
def test_bad_speed_settings_are_refused(section, flags, message):
    with pytest.raises(UserError, match=message):
        resolve_speed(section, 'c.py', **flags)


def test_on_cpu_a_run_stays_fp32_contiguous_and_its_config_digest_is_unchanged():
    cfg = load_config('small', compile=True)
    assert cfg.speed['amp'] == 'bfloat16'  # requested (the record shows what applies)
    assert speed_record(cfg) == dict(device='cpu', amp='float32', channels_last=False,
                                     cudnn_benchmark=False, compile=True, inference_teacher=False,
                                     world_size=1, batch_per_process=8, sync_bn=False)
    assert Speed(amp='bfloat16', channels_last=True).on('cpu') == Speed(
        amp=None, channels_last=False, cudnn_benchmark=False, inference_teacher=False)
    assert {config_digest(load_config('small', **flags))
            for flags in ({}, dict(fp32=True), dict(compile=True))} == {SMALL_DIGEST}


def test_a_channels_last_model_computes_what_the_contiguous_one_does():
    protocol, method = load_protocol('voc-15-5-overlap'), get_method('sdr')
    torch.manual_seed(0)
    model = build_model(load_config('small'), method.model_type, protocol, 0).eval()
    reference = build_model(load_config('small'), method.model_type, protocol, 0).eval()
    reference.load_state_dict(model.state_dict())
    prepare_model(model, Speed(amp=None, channels_last=True), 'cpu')
    assert model.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    batch = dict(inputs=torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
                 data_samples=torch.randint(0, 16, (2, 32, 32), dtype=torch.uint8))
    data = model.data_preprocessor(batch)
    assert data['inputs'].is_contiguous(memory_format=torch.channels_last)
    assert data['data_samples'].dtype == torch.int64
    with torch.no_grad():
        torch.testing.assert_close(model(data['inputs']),
                                   reference(reference.data_preprocessor(batch)['inputs']),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('config, folded', [('small', 17), ('deeplabv3-r101', 110)])
def test_folding_batch_norms_into_convolutions_keeps_what_the_network_computes(config, folded):
    # small: a stem, 4 blocks of 2 (3 with a projection shortcut), ASPP's 3 branches, pooling
    # and projection; ResNet-101: a stem, 33 blocks of 3, 4 projections, then ASPP's 6
    cfg = load_config(config)
    torch.manual_seed(0)
    model = with_trained_looking_batch_norms(
        build_model(cfg, 'cssbench.IncrementalSegmentor', load_protocol('voc-15-5-overlap'), 0)).eval()
    inputs = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        reference = model.encode_decode(inputs)
        assert batch_norms(model) == folded
        assert fold_batch_norms(model) == folded
        assert batch_norms(model) == 0
        out = model.encode_decode(inputs)
    for key in ('features', 'logits'):
        torch.testing.assert_close(out[key], reference[key], rtol=1e-4,
                                   atol=1e-4 * reference[key].abs().max())
    for stage, expected in zip(out['body'], reference['body'], strict=True):
        torch.testing.assert_close(stage, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def test_only_a_convolution_whose_output_its_batch_norm_alone_reads_is_folded():
    class Twice(torch.nn.Sequential):   # reads the convolution's output twice
        def forward(self, x):
            y = self[0](x)
            return self[1](y) + y

    def conv_bn():
        return [torch.nn.Conv2d(2, 2, 1, bias=False), torch.nn.BatchNorm2d(2)]

    net = with_trained_looking_batch_norms(torch.nn.Sequential(
        Twice(*conv_bn()), torch.nn.Sequential(*conv_bn(), torch.nn.ReLU()),
        torch.nn.Conv2d(2, 2, 1), torch.nn.BatchNorm2d(2, track_running_stats=False))).eval()
    # (the last BN normalises by the batch's statistics in eval mode too)
    x = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        reference = net(x)
        assert fold_batch_norms(net) == 1
        torch.testing.assert_close(net(x), reference)
    assert [type(m).__name__ for m in (net[0][1], net[1][1], net[3])] == [
        'BatchNorm2d', 'Identity', 'BatchNorm2d']
    with pytest.raises(ValueError, match='batch norms fold only in eval mode'):
        fold_batch_norms(net.train())


def test_batch_norms_of_basic_blocks_fold_and_a_bn_after_no_convolution_stays():
    """ResNet-18/34's BasicBlock (conv1, bn1, conv2, bn2: no conv3; undilated: output stride 32)
    folds both of its pairs;
    a BN whose neighbour before it is not a convolution, or a convolution followed by
    something other than a BN, is left as it is."""
    from cssbench.models import TorchvisionResNet
    torch.manual_seed(0)
    net = with_trained_looking_batch_norms(TorchvisionResNet(depth=18, output_stride=32)).eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        reference = net(x)
        # the stem, 8 blocks of 2 and the 3 projection shortcuts
        assert fold_batch_norms(net) == 1 + 8 * 2 + 3 and batch_norms(net) == 0
        for got, expected in zip(net(x), reference, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    apart = with_trained_looking_batch_norms(torch.nn.Sequential(
        torch.nn.Conv2d(2, 2, 1), torch.nn.ReLU(), torch.nn.BatchNorm2d(2))).eval()
    y = torch.randn(3, 2, 5, 5)
    with torch.no_grad():
        reference = apart(y)
        assert fold_batch_norms(apart) == 0
        torch.testing.assert_close(apart(y), reference, rtol=0, atol=0)
    assert [type(m).__name__ for m in apart] == ['Conv2d', 'ReLU', 'BatchNorm2d']


def test_a_teachers_convolutions_stored_in_bf16_compute_what_autocast_computes():
    torch.manual_seed(0)
    net = build_model(load_config('small'), 'cssbench.IncrementalSegmentor',
                      load_protocol('voc-15-5-overlap'), 0).eval().requires_grad_(False)
    stored = copy.deepcopy(net)
    store_convolutions_in(stored, torch.bfloat16)

    def dtypes(convolutions: bool) -> set:
        return {p.dtype for m in stored.modules() if isinstance(m, torch.nn.Conv2d) == convolutions
                for p in m.parameters(recurse=False)}
    assert dtypes(convolutions=True) == {torch.bfloat16}
    assert dtypes(convolutions=False) == {torch.float32}   # the BNs' as autocast leaves them
    inputs = torch.randn(2, 3, 40, 40)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        expected = net.encode_decode(inputs)
        got = stored.encode_decode(inputs)
    with torch.no_grad():   # outside autocast: bf16 all the way, its input cast on entry
        outside = stored.encode_decode(inputs)
    for out in (got, outside):
        for key in ('features', 'logits'):
            assert torch.equal(out[key], expected[key]), key
        assert all(map(torch.equal, out['body'], expected['body']))


@pytest.mark.parametrize('amp', [None, 'bfloat16'])
@pytest.mark.parametrize('inference', [True, False])
def test_the_fast_path_makes_the_teacher_for_inference_and_leaves_the_student(inference, amp):
    losses = {}
    for made in (False, inference):
        speed = Speed(amp=amp, channels_last=False, inference_teacher=made)
        model, losses[made] = sdr_losses_with_a_trained_teacher(speed, 'cpu')
        assert batch_norms(model) == 17 and {p.dtype for p in model.parameters()} == {torch.float32}
        assert batch_norms(model.teacher) == (0 if made else 17)
        assert {p.dtype for p in model.teacher.parameters()} == {
            getattr(torch, amp) if made and amp else torch.float32}
    # SDR's distillation and prototype matching read the teacher's logits
    assert {k for k, v in losses[inference].items() if v != 0} >= {'loss_kd', 'loss_pm'}
    for key, value in losses[False].items():   # BNs folded: the same to rounding (bf16's)
        tolerance = dict(rtol=1e-4, atol=1e-6) if amp is None else dict(rtol=2e-2, atol=1e-4)
        torch.testing.assert_close(losses[inference][key], value, **tolerance)


@pytest.mark.parametrize('keyed_by_dtype, amp, cached', [
    (False, 'float16', False), (False, 'bfloat16', False), (False, None, True),
    (True, 'float16', True)])
def test_compiling_under_autocast_skips_the_graph_cache_that_mixes_up_dtypes(
        monkeypatch, keyed_by_dtype, amp, cached):
    # torch 2.11's AOTAutograd cache gave a float16 model the graph compiled under bf16
    monkeypatch.setattr('cssbench.speed.AUTOGRAD_CACHE_KEYS_AUTOCAST_DTYPE', keyed_by_dtype)
    model = build_model(load_config('small'), get_method('ft').model_type,
                        load_protocol('synth-15-5-overlap'), 0)
    with torch._functorch.config.patch(enable_autograd_cache=True):  # restored after
        prepare_model(model, Speed(amp=amp, channels_last=False, compile=True), 'cpu')
        assert torch._functorch.config.enable_autograd_cache is cached


def test_the_optimizer_takes_nesterov_sgd_steps_with_weight_decay():
    schedule = ConfigDict(momentum=0.9, nesterov=True, weight_decay=0.01)
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(2.0)
    optim = build_optim_wrapper(model, optim_wrapper_config(Speed().on('cpu'), sgd_config(schedule, 0.1)))
    assert optim.optimizer.defaults['fused'] is True
    # By hand, g' = g + wd p, buffer b = g' at the first step then 0.9 b + g', step lr (g' + 0.9 b):
    # step 1, g = 1: g' = 1.02, b = 1.02, p = 2 - 0.1 * 1.938 = 1.8062;
    # step 2, g = -0.5: g' = -0.481938, b = 0.436062, p = 1.8062 + 0.1 * 0.0894822 = 1.81514822.
    for grad, expected in ((1.0, 1.8062), (-0.5, 1.81514822)):
        model.weight.grad = torch.full_like(model.weight, grad)
        optim.step()
        assert model.weight.item() == pytest.approx(expected, rel=1e-6)


def test_float16_scales_the_loss_and_skips_a_step_whose_gradients_overflowed(monkeypatch):
    float16_steps_by_hand('cpu', monkeypatch)   # test_gpu.py: on a GPU


def test_bf16_on_a_gpu_that_emulates_it_is_noted_with_the_way_to_float16(monkeypatch):
    native = {'NVIDIA H100 80GB HBM3': True, 'Tesla V100-SXM2-32GB': False}
    for name, has_bf16 in native.items():
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda: name)
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported',
                            lambda including_emulation=True: has_bf16 or including_emulation)
        notes = [emulated_bf16_note(Speed(amp=amp)) for amp in ('bfloat16', 'float16', None)]
        assert notes[1:] == [None, None]
        assert notes[0] == (None if has_bf16 else
                            "Tesla V100-SXM2-32GB computes bfloat16 only in emulation (slowly): "
                            "speed = dict(amp='float16') in the config trains in float16 "
                            "(loss-scaled), --fp32 in fp32")


def test_logged_losses_are_the_means_over_each_interval_and_the_epoch_tail():
    runner = hook_runner(7, hub='test_logged_losses')
    hub = runner.message_hub
    hook = AveragedRuntimeInfoHook(interval=3)
    hook.before_train_epoch(runner)
    losses = [0.5, 1.0, 3.0, 2.0, 4.0, 0.25, 0.75]
    published = []
    for i, loss in enumerate(losses):
        outputs = dict(loss=torch.tensor(loss), loss_ce=torch.tensor(2 * loss))
        hook.after_train_iter(runner, i, outputs=outputs)
        published.append(len(hub.get_scalar('train/loss').data[0]) if 'train/loss' in hub.log_scalars
                         else 0)
    history = hub.get_scalar('train/loss').data[0].tolist()
    # published after iterations 3 and 6 (the interval) and 7 (the end of the epoch), only
    means = [mean(losses[0:3]), mean(losses[3:6]), mean(losses[6:])]
    assert history == pytest.approx(means, rel=1e-12)
    assert hub.get_scalar('train/loss_ce').data[0].tolist() == pytest.approx([2 * m for m in means])
    assert published == [0, 0, 1, 1, 1, 2, 3]


def test_run_refuses_compile_with_the_fp32_reference_regime(capsys):
    assert main(['run', '--protocol', 'synth-15-5-overlap', '--compile', '--fp32']) == 2
    assert capsys.readouterr().err.strip() == (
        'cssbench: error: --compile and --fp32 exclude each other (--fp32 is the eager reference regime)')


def test_a_later_steps_new_model_runs_the_graphs_compiled_for_the_step_before(monkeypatch):
    """What the bench's projection relies on: within a run's process, the models of steps 2
    and 3 (a class more each, a new teacher) compile nothing that step 1's did not."""
    from torch._dynamo.utils import counters

    from cssbench.bench import Case, build_step
    from conftest import random_batch

    # Whether a graph is captured again is dynamo's decision (its guards), whatever backend
    # then compiles it; the eager backend spares the test inductor's C++ builds.
    module_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, 'compile',
                        lambda self, **kwargs: module_compile(self, **dict(kwargs, backend='eager')))
    torch._dynamo.reset()
    cfg = load_config('small')
    batch = random_batch(n=2, size=32, classes=16)
    graphs = []
    for step in (1, 2, 3):
        model, optim = build_step(cfg, Case(f'step {step}', 'sdr', step, None),
                                  Speed(compile=True).on('cpu'), 'cpu')
        model.train()
        model.train_step(batch, optim)
        graphs.append(counters['stats']['unique_graphs'])
    torch._dynamo.reset()
    assert graphs[0] >= 4  # the student's backbone and head, and the teacher's
    assert graphs[2] == graphs[1] == graphs[0]


class _RecordingSegmentor:
    """Predicts each batch's ground truth, and records cudnn's benchmark mode at each batch."""

    def __init__(self, fail: bool = False) -> None:
        self.modes, self.fail = [], fail

    def eval(self) -> None:
        pass

    def val_step(self, batch):
        self.modes.append(torch.backends.cudnn.benchmark)
        if self.fail:
            raise RuntimeError('out of memory')
        return [dict(pred=batch['data_samples'], gt=batch['data_samples'])]


def _evaluate(model, varying_sizes: bool) -> dict:
    """Evaluate ``model`` with the run's evaluation loop on three images of two sizes."""
    images = [dict(inputs=torch.zeros(3, h, w, dtype=torch.uint8),
                   data_samples=torch.arange(h * w).reshape(h, w).remainder(2).to(torch.uint8))
              for h, w in ((4, 6), (6, 4), (4, 6))]
    loader = DataLoader(images, batch_size=1, collate_fn=default_collate)
    runner = SimpleNamespace(model=model, visualizer=SimpleNamespace(), call_hook=lambda *a, **k: None)
    settings = val_loop_config(Speed(amp=None), varying_sizes=varying_sizes)
    loop = LOOPS.build(dict(settings, runner=runner, dataloader=loader,
                            evaluator=Evaluator(IncrementalIoUMetric(class_ids=[0, 1]))))
    return loop.run()


@pytest.mark.parametrize('varying_sizes', [False, True])
def test_images_of_varying_sizes_are_evaluated_without_cudnn_benchmark(varying_sizes, monkeypatch):
    # cudnn's benchmark mode would search its algorithms again at every new image size
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', True)   # as the fast path trains
    model = _RecordingSegmentor()
    assert _evaluate(model, varying_sizes)['mIoU'] == 1.0
    assert model.modes == [not varying_sizes] * 3
    assert torch.backends.cudnn.benchmark is True   # training's mode is back

    failing = _RecordingSegmentor(fail=True)
    with pytest.raises(RuntimeError, match='out of memory'):
        _evaluate(failing, varying_sizes)
    assert failing.modes == [not varying_sizes] and torch.backends.cudnn.benchmark is True
