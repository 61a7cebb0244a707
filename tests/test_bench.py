"""``cssbench bench`` end to end on CPU with the small model: the report's structure, positive
finite numbers, and one-line errors for bad flags."""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from cssbench import bench, profiling
from cssbench.bench import project_protocol
from cssbench.cli import main
from cssbench.errors import UserError
from cssbench.speed import REFERENCE_SPEED, Speed
from cssbench.synth import make_synth
from conftest import mount_read_only

NUMBER = r'([0-9.]+)'


@pytest.fixture
def one_thread():
    """A single thread: on a busy 2-core machine, torch's default of 2 threads stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_reports_every_measure_for_both_regimes(one_thread, capsys):
    assert main(['bench', '--config', 'small', '--size', '64', '--batch', '8', '--iters', '5',
                 '--warmup', '2']) == 0
    captured = capsys.readouterr()
    out = captured.out
    train = re.findall(rf'^(fine-tuning, step 0|sdr, step 1 \(\+ teacher\)) +(fp32 eager|fast path) +'
                       rf'{NUMBER} +{NUMBER}x +{NUMBER} +{NUMBER} +{NUMBER}%$', out, re.M)
    assert [(case, regime) for case, regime, *_ in train] == [
        ('fine-tuning, step 0', 'fp32 eager'), ('fine-tuning, step 0', 'fast path'),
        ('sdr, step 1 (+ teacher)', 'fp32 eager'), ('sdr, step 1 (+ teacher)', 'fast path')]
    for _, regime, rate, ratio, gflop, tflops, mfu in train:
        assert all(math.isfinite(float(v)) and float(v) > 0 for v in (rate, ratio, gflop, tflops, mfu))
        if regime == 'fp32 eager':
            assert float(ratio) == 1.0
    # SDR's step does more per image than fine-tuning's: the teacher's forward
    assert float(train[2][4]) > float(train[0][4])
    evaluation = re.findall(rf'^evaluation +(fp32 eager|fast path) +{NUMBER} +{NUMBER}x$', out, re.M)
    assert [regime for regime, *_ in evaluation] == ['fp32 eager', 'fast path']
    assert all(float(rate) > 0 for _, rate, _ in evaluation)
    loader = re.search(rf'data loader: {NUMBER} img/s decode \+ augment in one process; {NUMBER} img/s '
                       r'through the loader with 1 worker', out)
    assert loader and all(float(v) > 0 for v in loader.groups())
    assert 'peak' in out and 'float32 matmul' in out
    assert f'\ndevice: cpu, torch threads: 1 (torch {torch.__version__}); peak ' in out
    # no TF32 on CPU
    assert '  fp32 eager: fp32, contiguous, cudnn benchmark off, eager, teacher as trained\n' in out
    assert 'train images per step 9568/487/299/491/500/548' in out
    projected = re.findall(r'^  (fp32 eager|fast path) +(\d+:\d\d:\d\d) \((\d+:\d\d:\d\d) of it '
                           r"start-up: compilation, cudnn's search\)$", out, re.M)
    assert [regime for regime, *_ in projected] == ['fp32 eager', 'fast path']
    # each measure was announced on stderr as it was taken, with the same rates
    progress = captured.err
    for case in ('fine-tuning, step 0', 'sdr, step 1 (+ teacher)'):
        for regime in ('fp32 eager', 'fast path'):
            assert re.search(rf'^cssbench bench: training, {re.escape(case)}, {regime}: '
                             rf'2 warm-up iterations in {NUMBER} s$', progress, re.M)
            assert re.search(rf'^cssbench bench: training, {re.escape(case)}, {regime}: '
                             rf'2 warm-up iterations of a newly built model in {NUMBER} s$',
                             progress, re.M)
    rates = re.search(rf'^cssbench bench: training, fine-tuning, step 0: fp32 eager {NUMBER} img/s, '
                      rf'fast path {NUMBER} img/s; {NUMBER} GFLOP/img$', progress, re.M)
    assert rates and [float(v) for v in rates.groups()[:2]] == pytest.approx(
        [float(train[0][2]), float(train[1][2])], abs=0.06)
    assert re.search(r'^cssbench bench: evaluation: fp32 eager .* img/s, fast path .* img/s$',
                     progress, re.M)
    assert re.search(r'^cssbench bench: data loader: ', progress, re.M)


def test_regimes_take_turns_in_rounds_and_each_rate_is_its_median(monkeypatch):
    """Two fake regimes on a fake clock: each call advances it by the regime's seconds per
    iteration in that round; the calls must alternate by rounds after the warm-ups."""
    clock, calls, contexts = [0.0], [], []
    seconds = {'a': [1.0, 2.0, 4.0], 'b': [0.5, 0.5, 8.0]}  # per round: medians 2.0 and 0.5
    monkeypatch.setattr(bench.time, 'perf_counter', lambda: clock[0])

    def step(name):
        def call(i):  # i = 0, 1: the warm-ups; then rounds of 2 iterations
            clock[0] += seconds[name][(i - 2) // 2] if i >= 2 else 100.0
            calls.append((name, i))
        return call

    def context(name):
        contexts.append(name)
        return contextlib.nullcontext()

    steps = {name: (step(name), lambda name=name: context(name)) for name in ('a', 'b')}
    rates = bench.interleaved_rates(steps, iters=6, warmup=2, batch=10, device='cpu', rounds=3)
    assert calls == [('a', 0), ('a', 1), ('b', 0), ('b', 1),
                     ('a', 2), ('a', 3), ('b', 2), ('b', 3), ('a', 4), ('a', 5), ('b', 4), ('b', 5),
                     ('a', 6), ('a', 7), ('b', 6), ('b', 7)]
    assert contexts == ['a', 'b'] + ['a', 'b'] * 3   # entered for the warm-ups and each turn
    assert {name: rate.img_s for name, rate in rates.items()} == {
        'a': pytest.approx(10 / 2.0), 'b': pytest.approx(10 / 0.5)}
    # start-up: the 2 warm-ups' 200 s less 2 iterations at the measured rate
    assert rates['a'].startup_s == pytest.approx(200 - 2 * 10 / 5.0)
    assert rates['b'].startup_s == pytest.approx(200 - 2 * 10 / 20.0)
    # fewer timed iterations than rounds: one iteration per round
    calls.clear()
    bench.interleaved_rates(steps, iters=2, warmup=0, batch=1, device='cpu', rounds=4)
    assert calls == [('a', 0), ('b', 0), ('a', 1), ('b', 1)]


def test_a_restart_is_a_new_models_warm_up_beyond_its_iterations_at_the_measured_rate(monkeypatch):
    clock, built = [0.0], []
    monkeypatch.setattr(bench.time, 'perf_counter', lambda: clock[0])
    first_call = {'slow': 30.0, 'fast': 0.0}  # extra seconds of a new model's first call

    def make_step(speed):
        name = 'slow' if speed.compile else 'fast'
        built.append(name)

        def step(i):
            clock[0] += 2.0 + (first_call[name] if i == 0 else 0.0)  # 2 s per iteration
        return step, contextlib.nullcontext

    rates = {'fast': bench.Rate(5.0, startup_s=9.0), 'slow': bench.Rate(5.0, startup_s=99.0)}
    regimes = {'fast': Speed(), 'slow': Speed(compile=True)}
    lines = []
    result = bench.with_restarts(rates, regimes, make_step, warmup=3, batch=10, device='cpu',
                                 progress=lines.append)
    assert built == ['fast', 'slow']  # one new model each
    # 3 calls: 6 s (+30 s for the slow one's first), less 3 batches of 10 at 5 img/s (6 s)
    assert result == {'fast': bench.Rate(5.0, startup_s=9.0, restart_s=0.0),
                      'slow': bench.Rate(5.0, startup_s=99.0, restart_s=30.0)}
    assert lines == ['fast: 3 warm-up iterations of a newly built model in 6.0 s',
                     'slow: 3 warm-up iterations of a newly built model in 36.0 s']


def test_the_projection_adds_30_epochs_of_each_step_and_its_evaluation(monkeypatch):
    monkeypatch.setattr(bench, 'VOC_15_1_OVERLAP_STEP_IMAGES',
                        [(8000, 1200), (400, 1250), (300, 1300), (200, 1350), (100, 1400), (50, 1449)])
    report = dict(train=[dict(step=0, regime='r', img_s=100.0, startup_s=60.0, restart_s=1.0),
                         dict(step=1, regime='r', img_s=50.0, startup_s=15.0, restart_s=2.0)],
                  eval={'r': bench.Rate(500.0, startup_s=5.0, restart_s=0.5)},
                  loader=dict(with_workers=80.0))
    # step 0 at fine-tuning's rate capped by the loader's, the others at SDR's. Start-ups:
    # step 0 fine-tuning's and evaluation's; step 1 SDR's and evaluation's restart; steps
    # 2-5 SDR's restart and evaluation's
    startup = (60.0 + 5.0) + (15.0 + 0.5) + 4 * (2.0 + 0.5)
    expected = (8000 * 30 / 80.0 + (400 + 300 + 200 + 100 + 50) * 30 / 50.0
                + (1200 + 1250 + 1300 + 1350 + 1400 + 1449) / 500.0 + startup)
    assert project_protocol(report, 'r') == (pytest.approx(expected), pytest.approx(startup))


def test_compile_adds_the_fast_path_compiled_as_a_third_regime():
    fast = Speed(amp='bfloat16', channels_last=True, cudnn_benchmark=True, compile=True)
    eager_fast = Speed(amp='bfloat16', channels_last=True, cudnn_benchmark=True, compile=False)
    assert bench.bench_regimes(fast, 'cuda', compile=False) == {
        'fp32 eager': REFERENCE_SPEED, 'fast path': eager_fast}
    assert bench.bench_regimes(eager_fast, 'cuda', compile=True) == {
        'fp32 eager': REFERENCE_SPEED, 'fast path': eager_fast, 'fast+compile': fast}
    # on CPU the CUDA-only settings fall away; compiling stays
    cpu = bench.bench_regimes(fast, 'cpu', compile=True)
    assert cpu['fast path'] == REFERENCE_SPEED
    assert cpu['fast+compile'] == Speed(amp=None, channels_last=False, cudnn_benchmark=False,
                                        compile=True, inference_teacher=False)


def test_a_regime_says_when_its_fp32_convolutions_run_in_tf32():
    assert bench.describe(REFERENCE_SPEED, tf32=True) == (
        "fp32 (TF32 convolutions, PyTorch's default), contiguous, cudnn benchmark off, eager, "
        'teacher as trained')
    assert bench.describe(REFERENCE_SPEED) == (
        'fp32, contiguous, cudnn benchmark off, eager, teacher as trained')
    # bf16 autocast: the TF32 setting concerns fp32 convolutions only
    assert bench.describe(Speed(compile=True), tf32=True) == (
        'bfloat16, channels_last, cudnn benchmark on, torch.compile, teacher for inference')


@pytest.mark.parametrize('flags, message', [
    (['--iters', '0'], '--iters must be at least 1, got 0'),
    (['--batch', '0'], '--batch must be at least 1, got 0'),
    (['--size', '8'], '--size must be at least 16, got 8'),
    (['--workers', '-1'], '--workers must be at least 0, got -1'),
    (['--config', 'nope'], "unknown config 'nope'"),
    (['--data-root', '/nowhere'], '/nowhere: dataset root not found'),
])
def test_bad_flags_give_one_line_errors(flags, message, capsys):
    assert main(['bench', *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()   # a dataset's: after the header line
    assert err[-1].startswith('cssbench: error: ') and message in err[-1]
    assert len(err) == (2 if '--data-root' in flags else 1)


@pytest.mark.parametrize('hip, expected', [(None, 'torch 9.9, CUDA 12.8, cuDNN 91002'),
                                           ('6.4.1', 'torch 9.9, HIP 6.4.1, MIOpen 91002')])
def test_the_device_line_names_the_gpu_toolkit_and_its_kernel_library(hip, expected, monkeypatch):
    monkeypatch.setattr(torch, '__version__', '9.9')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.version, 'cuda', None if hip else '12.8')
    monkeypatch.setattr(torch.version, 'hip', hip)
    monkeypatch.setattr(torch.backends.cudnn, 'version', lambda: 91002)
    assert bench._software() == expected


def test_the_mfu_is_against_the_matmul_peak_of_the_fast_paths_dtype():
    from cssbench.bench import peak_dtype
    assert peak_dtype('cuda', 'bfloat16') == peak_dtype('cuda', None) == torch.bfloat16
    assert peak_dtype('cuda', 'float16') == torch.float16   # bf16 may be emulated there
    assert peak_dtype('cpu', 'float16') == torch.float32


def test_amp_measures_the_fast_path_in_each_dtype_given_side_by_side():
    fast = Speed(amp='bfloat16', channels_last=True, cudnn_benchmark=True, compile=False)
    fp16 = Speed(amp='float16', channels_last=True, cudnn_benchmark=True, compile=False)
    assert bench.bench_regimes(fast, 'cuda', compile=True, amps=['bfloat16', 'float16']) == {
        'fp32 eager': REFERENCE_SPEED,
        'fast path (bf16)': fast, 'fast path (fp16)': fp16,
        'fast+compile (bf16)': Speed(compile=True), 'fast+compile (fp16)': Speed(amp='float16', compile=True)}
    # one dtype: the fast path keeps its name, in that dtype
    assert bench.bench_regimes(fast, 'cuda', compile=False, amps=['float16']) == {
        'fp32 eager': REFERENCE_SPEED, 'fast path': fp16}
    assert bench.parse_amps(' float16, bfloat16 ', 'cuda') == ['float16', 'bfloat16']
    assert bench.parse_amps(None, 'cpu') is None


def test_teacher_measures_the_fast_path_with_each_teacher_given_side_by_side():
    fast = Speed(compile=False)
    trained = replace(fast, inference_teacher=False)
    assert bench.bench_regimes(fast, 'cuda', compile=False, teachers=[True, False]) == {
        'fp32 eager': REFERENCE_SPEED,
        'fast path (inference teacher)': fast, 'fast path (trained teacher)': trained}
    # with several dtypes too: one regime per combination, each name saying both
    regimes = bench.bench_regimes(fast, 'cuda', compile=True, amps=['bfloat16', 'float16'],
                                  teachers=[False, True])
    assert list(regimes)[1:5] == ['fast path (bf16, trained teacher)',
                                  'fast path (bf16, inference teacher)',
                                  'fast path (fp16, trained teacher)',
                                  'fast path (fp16, inference teacher)']
    assert len(regimes) == 9
    assert regimes['fast+compile (fp16, trained teacher)'] == Speed(
        amp='float16', compile=True, inference_teacher=False)
    # one setting: the fast path keeps its name, with that teacher
    assert bench.bench_regimes(fast, 'cuda', compile=False, teachers=[False]) == {
        'fp32 eager': REFERENCE_SPEED, 'fast path': trained}
    assert bench.parse_teachers(' trained,inference', 'cuda') == [False, True]
    assert bench.parse_teachers(None, 'cpu') is None


def test_the_report_names_the_batch_norm_kernels_pytorch_chooses_for_each_dtype(monkeypatch):
    # the CPU has PyTorch's own kernels alone
    assert bench.batch_norm_kernels('cpu') == (
        "float32 PyTorch's own, bfloat16 PyTorch's own, float16 PyTorch's own")
    # a CUDA build's choice (as torch 2.x makes it): cuDNN, except for bf16 input
    def select(x, weight, bias, mean, var, training, eps):
        assert training and x.is_contiguous(memory_format=torch.channels_last)
        assert weight.dtype == torch.float32   # autocast leaves a batch norm's weights fp32
        return SimpleNamespace(name='Native' if x.dtype == torch.bfloat16 else 'Cudnn')
    monkeypatch.setattr(torch._C, '_select_batch_norm_backend', select)
    assert bench.batch_norm_kernels('cpu') == (
        "float32 cuDNN, bfloat16 PyTorch's own, float16 cuDNN")
    monkeypatch.delattr(torch._C, '_select_batch_norm_backend')
    assert bench.batch_norm_kernels('cpu') is None   # a torch that does not say


def test_the_report_widens_its_regime_column_to_the_longest_name():
    rate = bench.Rate(img_s=100.0, startup_s=1.0, restart_s=0.0)
    regimes = bench.bench_regimes(Speed(), 'cuda', compile=True, amps=['bfloat16', 'float16'])
    report = dict(config='r101.py', size=512, batch=24, iters=20, warmup=5, device='GPU',
                  software='torch', peak_flops=1e15, peak_label='bfloat16 matmul', tf32=True,
                  batch_norm="float32 cuDNN, bfloat16 PyTorch's own, float16 cuDNN",
                  regimes=regimes, eval={name: rate for name in regimes},
                  train=[dict(case='fine-tuning, step 0', step=0, regime=name, img_s=100.0 + i,
                              startup_s=1.0, restart_s=0.0, flops_per_img=4e11)
                         for i, name in enumerate(regimes)],
                  loader=dict(per_process=100.0, workers=8, with_workers=900.0),
                  projection={name: (3600.0, 60.0) for name in regimes})
    lines = bench.format_report(report).splitlines()
    rows = [line for line in lines if line.startswith('fine-tuning, step 0 ')]
    assert [line[27:46].rstrip() for line in rows] == list(regimes)
    # the numbers stand in one column, whatever the regime's name
    assert len({line.index('x ') for line in rows}) == 1
    assert 'fast+compile (fp16)     104.0    1.04x' in rows[-1]
    assert '  fast+compile (fp16) 1:00:00 (0:01:00 of it start-up' in '\n'.join(lines)
    assert lines[2] == ("batch norm's kernels (training, channels_last): "
                        "float32 cuDNN, bfloat16 PyTorch's own, float16 cuDNN")


@pytest.mark.parametrize('option, value, message', [
    ('--amp', 'fp8', "--amp: unknown autocast dtype(s) 'fp8' (known: bfloat16, float16)"),
    ('--amp', 'bfloat16,bf16', "--amp: unknown autocast dtype(s) 'bf16' (known: bfloat16, float16)"),
    ('--amp', ',', '--amp: no autocast dtype (known: bfloat16, float16)'),
    ('--amp', 'float16,float16', '--amp: float16 given twice'),
    ('--amp', 'float16', '--amp: autocast applies on a CUDA GPU only'),   # this test's machine: the CPU
    ('--teacher', 'folded', "--teacher: unknown teacher(s) 'folded' (known: inference, trained)"),
    ('--teacher', ',', '--teacher: no teacher (known: inference, trained)'),
    ('--teacher', 'trained,trained', '--teacher: trained given twice'),
    ('--teacher', 'trained', '--teacher: the teacher is made for inference on a CUDA GPU only'),
])
def test_a_bad_or_cpu_amp_or_teacher_is_refused_in_one_line_before_any_measure(
        option, value, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, 'training_device', lambda: 'cpu')
    monkeypatch.setattr(bench, 'bench_dataset', lambda *a: pytest.fail('measured'))
    assert main(['bench', option, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f'cssbench: error: {message}')


@pytest.mark.parametrize('name, kind', [
    # kernels of an H100 profile (bf16 and float16 eager, bf16 compiled), and CPU operators
    ('sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64', 'convolution, matmul'),
    ('nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT', 'convolution, matmul'),
    ('void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816fprop_optimized_bf16_256x64_32x4>', 'convolution, matmul'),
    ('void at::native::batch_norm_collect_statistics_channels_last_kernel<at::native::Var, c10::BFloat16>', 'batch norm'),
    ('void cudnn::batchnorm_fwtr_nhwc_semiPersist<__half, float, __half, 512, 16, 5, 4>', 'batch norm'),
    ('void cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, 512, true, 1>', 'batch norm'),   # fp32's
    ('void cudnn::bn_bw_1C11_kernel_new<float, float, float2, 512, true, 1>', 'batch norm'),
    ('triton_poi_fused__native_batch_norm_legit_functional_convolution_backward_native_batch_norm_backward_threshold_backward_7', 'batch norm'),
    ('void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedSgdMathFunctor>', 'optimizer'),
    ('void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>', 'elementwise, other'),
    ('triton_poi_fused_add_threshold_backward_26', 'elementwise, other'),
    ('aten::mkldnn_convolution', 'convolution, matmul'), ('aten::convolution_backward', 'convolution, matmul'),
    ('aten::bmm', 'convolution, matmul'), ('aten::mm', 'convolution, matmul'),
    ('aten::native_batch_norm_backward', 'batch norm'), ('aten::_fused_sgd_', 'optimizer'),
    ('aten::clamp_min_', 'elementwise, other'), ('aten::_log_softmax', 'elementwise, other'),
])
def test_a_profile_sorts_kernels_and_operators_into_kinds_of_work(name, kind):
    assert profiling.kind_of(name) == kind


def test_a_profile_sums_the_kernels_by_kind_per_step_leaving_out_compiled_ranges():
    def event(key, us, count, device='cuda'):
        on_gpu = device == 'cuda'
        return SimpleNamespace(key=key, count=count, self_device_time_total=us if on_gpu else 0,
                               self_cpu_time_total=0 if on_gpu else us,
                               device_type=DeviceType.CUDA if on_gpu else DeviceType.CPU)
    events = [event('## Call CompiledFxGraph fghjy2uhj ##', 90_000, 3),   # spans kernels below
              event('sm90_xmma_fprop_implicit_gemm_bf16', 30_000, 54),
              event('triton_red_fused__native_batch_norm_legit_functional_24', 15_000, 30),
              event('multi_tensor_apply_kernel<FusedSgdMathFunctor>', 600, 3),
              event('vectorized_elementwise_kernel<CUDAFunctor_add>', 900, 69),
              event('aten::convolution', 50_000, 54, device='cpu')]   # the host's side: not counted
    p = profiling.summarize(events, steps=3, device='cuda', wall_s=0.0171)
    assert p.busy == 'kernels' and p.wall_ms == pytest.approx(17.1)
    assert p.by_kind == pytest.approx({'batch norm': 5.0, 'convolution, matmul': 10.0,
                                       'optimizer': 0.2, 'elementwise, other': 0.3})
    assert p.busy_ms == pytest.approx(15.5)
    assert [(name[:12], round(ms, 6), calls) for name, ms, calls in p.top] == [
        ('sm90_xmma_fp', 10.0, 18), ('triton_red_f', 5.0, 10), ('vectorized_e', 0.3, 23),
        ('multi_tensor', 0.2, 1)]
    # on the CPU: the operators' own time, aten's alone (not the Python ranges around them)
    cpu = profiling.summarize([event('aten::mkldnn_convolution', 3_000, 6, 'cpu'),
                               event('Optimizer.step#SGD.step', 9_000, 1, 'cpu'),
                               event('aten::_fused_sgd_', 1_000, 1, 'cpu')],
                              steps=1, device='cpu', wall_s=0.005)
    assert (cpu.busy, cpu.busy_ms, cpu.by_kind['optimizer']) == ('operators', pytest.approx(4.0),
                                                                pytest.approx(1.0))


def test_bench_profile_reports_each_regimes_step_by_kind_of_work(one_thread, capsys):
    assert main(['bench', '--config', 'small', '--size', '64', '--batch', '8', '--iters', '2',
                 '--warmup', '1', '--profile']) == 0
    out = capsys.readouterr().out
    for case in ('fine-tuning, step 0', 'sdr, step 1 (+ teacher)'):
        section = out.split(f'where a step of {case} spends its time (torch.profiler, ms per step):\n')[1]
        lines = section.split('\n\n')[0].splitlines()
        assert len(lines) == 2 * (1 + profiling.TOP), section
        for regime, line in zip(('fp32 eager', 'fast path'), lines[::1 + profiling.TOP]):
            found = re.fullmatch(rf'  {regime}: wall {NUMBER}, operators {NUMBER}: batch norm {NUMBER} '
                                 rf'\(\d+ %\), convolution, matmul {NUMBER} \(\d+ %\), optimizer '
                                 rf'{NUMBER} \(\d+ %\), elementwise, other {NUMBER} \(\d+ %\)', line)
            assert found, line
            wall, busy, *kinds = map(float, found.groups())
            assert busy > 0 and sum(kinds) == pytest.approx(busy, abs=0.25)
            assert kinds[1] > 0   # the convolutions


def test_a_cpus_small_numbers_are_printed_to_three_significant_digits(capsys):
    """On CPU the peak is a few hundredths of a TFLOP/s and a step a fraction of a GFLOP per
    image: one or two decimals printed them as 0.0 and 0.4, so that neither the TFLOP/s
    (GFLOP/img x img/s) nor the MFU (TFLOP/s / peak) could be checked from the report."""
    rate = bench.Rate(img_s=0.613, startup_s=0.0, restart_s=0.0)
    regimes = bench.bench_regimes(Speed(), 'cpu', compile=False)
    report = dict(config='small.py', size=64, batch=8, iters=5, warmup=2, device='cpu',
                  software='torch', peak_flops=1.234e11, peak_label='float32 matmul', tf32=False,
                  regimes=regimes, eval={name: rate for name in regimes},
                  train=[dict(case='fine-tuning, step 0', step=0, regime=name, img_s=img_s,
                              startup_s=0.0, restart_s=0.0, flops_per_img=4.33e8)
                         for name, img_s in zip(regimes, [208.3, 52.07])],
                  loader=dict(per_process=100.0, workers=1, with_workers=900.0),
                  projection={name: (3600.0, 60.0) for name in regimes})
    lines = bench.format_report(report).splitlines()
    assert 'peak 0.123 TFLOP/s (float32 matmul;' in lines[1]
    # 0.433 GFLOP/img x 208.3 img/s = 0.0902 TFLOP/s, 73.1 % of 0.1234
    assert ('fine-tuning, step 0        fp32 eager       208.3    1.00x      0.433    0.0902   73.1%'
            in lines)
    # 52.07 img/s: 0.0225 TFLOP/s
    assert ('fine-tuning, step 0        fast path         52.1    0.25x      0.433    0.0225   18.3%'
            in lines)
    assert 'evaluation                 fast path        0.613    1.00x' in lines
    # on stderr, as each is measured, the same figures
    assert bench._rates({'fp32 eager': rate}) == 'fp32 eager 0.613 img/s'
    # a GPU's numbers keep their decimals
    assert [bench._figures(v, d) for v, d in [(402.51, 1), (77.291, 2), (749.04, 1), (0.0, 2)]] == [
        '402.5', '77.29', '749.0', '0.00']


def test_an_interrupted_bench_exits_130_without_advising_to_resume(monkeypatch, capsys):
    """A Ctrl-C during the measures said 'rerun the same command to resume', as `run` says;
    a bench keeps nothing to resume: a rerun measures everything again."""
    def interrupted(**kwargs):
        bench._to_stderr('training, fine-tuning, step 0: fp32 eager 208.3 img/s')
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, 'run_bench', interrupted)
    assert main(['bench', '--iters', '1']) == 130
    captured = capsys.readouterr()
    assert captured.out == ''
    assert captured.err.splitlines() == [
        'cssbench bench: training, fine-tuning, step 0: fp32 eager 208.3 img/s',
        'cssbench: interrupted; the measures taken so far are above']


@pytest.mark.parametrize('layout', ['file', 'under a file', 'read-only', 'read-only, other sizes'])
def test_a_cache_that_cannot_hold_the_dataset_is_refused_naming_cssbench_cache(layout, tmp_path,
                                                                               monkeypatch, capsys):
    """$CSSBENCH_CACHE a file, or a read-only folder, gave a bare OSError line naming no
    variable ('[Errno 20] Not a directory: .../bench'); a read-only cache that holds the
    dataset already is read as it is (generating nothing)."""
    cache = tmp_path / 'cache'
    if layout == 'file':
        cache.write_text('not a folder')
    elif layout == 'under a file':
        (tmp_path / 'file').write_text('not a folder')
        cache = tmp_path / 'file' / 'cache'
    elif layout == 'read-only':
        cache.mkdir()
    else:   # a shared cache holding the dataset of another size
        (cache / 'bench' / 'synth-64px-640-256').mkdir(parents=True)
    monkeypatch.setenv('CSSBENCH_CACHE', str(cache))
    if layout.startswith('read-only'):
        mount_read_only(monkeypatch, cache)
    monkeypatch.setattr(bench, 'make_synth', lambda *a, **k: pytest.fail('generating'))
    assert main(['bench', '--size', '64', '--batch', '8']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == {
        'file': f'cssbench: error: $CSSBENCH_CACHE {cache}: {cache} is not a folder',
        'under a file': f'cssbench: error: $CSSBENCH_CACHE {cache}: {tmp_path / "file"} is not a folder',
        'read-only': f'cssbench: error: $CSSBENCH_CACHE {cache}: cannot write in {cache} '
                     '(Read-only file system)',
        'read-only, other sizes': f'cssbench: error: $CSSBENCH_CACHE {cache}: cannot write in '
                                  f'{cache / "bench"} (Read-only file system)'}[layout]
    assert len(err) == 2   # after the bench's first line, naming the device and the settings
    if layout.startswith('read-only'):   # nothing written there
        assert sorted(p.name for p in cache.rglob('*')) == (
            [] if layout == 'read-only' else ['bench', 'synth-64px-640-256'])


def test_too_few_evaluation_images_are_refused_naming_the_setting_that_sets_their_batch(
        tmp_path, capsys):
    """Evaluation takes batches of the config's data.eval_batch_size, which no option sets: a
    dataset of 5 step-0 val images, benched with --batch 4, was refused as 'fewer than a
    batch of 64', a batch the user never gave."""
    make_synth(tmp_path / 'synth', n_train=40, n_val=8, size=64, seed=0, progress=False)
    assert main(['bench', '--batch', '4', '--data-root', str(tmp_path / 'synth')]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f'cssbench: error: {tmp_path / "synth"}: 5 evaluation images at step 0 of '
        "synth-15-1-overlap, fewer than a batch of 64 (the config's data.eval_batch_size; "
        '--batch sets the training batch)')


def test_size_is_refused_with_a_data_root_whose_images_the_report_names(tmp_path, capsys,
                                                                       monkeypatch):
    """--size sets the synthetic images' side: with --data-root it was ignored, and the
    report's first line still said '512 px images' (64 on CPU, without --size too)."""
    assert main(['bench', '--size', '512', '--data-root', str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "cssbench: error: --size sets the side of the synthetic images; --data-root's images "
        'are read as they are (give one of the two)']
    report = dict(config='small.py', size=None, data_root='/data/voc', batch=8, iters=5,
                  warmup=2, device='cpu', software='torch', peak_flops=1e11,
                  peak_label='float32 matmul', tf32=False, regimes={'fp32 eager': REFERENCE_SPEED},
                  eval={}, train=[], loader=dict(per_process=1.0, workers=1, with_workers=1.0),
                  projection={})
    assert bench.format_report(report).splitlines()[0] == (
        'cssbench bench: small.py, images of /data/voc, batch 8, 5 timed iterations after 2 '
        'warm-up, in 4 rounds taking turns (median)')
    # the synthetic images: their side, as before; and on stderr as the bench starts
    assert bench.format_report(dict(report, size=64, data_root=None)).splitlines()[0].startswith(
        'cssbench bench: small.py, 64 px images, batch 8, ')
    lines = []

    def stop(*args):
        raise UserError('stop')

    monkeypatch.setattr(bench, 'bench_datasets', stop)
    with pytest.raises(UserError, match='stop'):
        bench.run_bench(config='small', data_root='/data/voc', batch=8, progress=lines.append)
    assert lines == [f'cpu, torch threads: {torch.get_num_threads()}; small.py, batch 8, '
                     'images of /data/voc']
