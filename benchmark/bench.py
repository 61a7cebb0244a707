"""``cssbench bench``: training and evaluation throughput, the reference regime against the
fast path, and what it means for a full protocol.

In one process, on the synthetic dataset at the real size (512 px on GPU, generated into the
cache once) or on a dataset given with ``--data-root``:

* training img/s of a fine-tuning step (step 0 of voc-15-1-overlap's split of the data,
  synth-15-1-overlap's on the synthetic dataset) and of an SDR incremental step (step 1:
  the teacher's forward and SDR's losses too), each in
  the reference regime (fp32 eager, PyTorch's defaults), in the fast path (the config's
  speed settings; with ``--amp``, in each autocast dtype given, with ``--teacher``, with each
  teacher given: made for inference, as trained) and, with ``--compile``, in
  the fast path with torch.compile. The step is
  the runner's: the same model preparation, optimizer wrapper and ``train_step``. Batches
  are loaded onto the device beforehand, so that the model's speed is timed (the loader is
  timed apart); warm-up iterations are not timed; the timed ones are cut into rounds in
  which the regimes take turns, so that a drift of the machine (clocks, other load) falls
  on all alike, and a regime's rate is its median over the rounds; the device is
  synchronised only around each round;
* FLOPs per image (``torch.utils.flop_counter`` over one training step: forward, backward,
  teacher forward), the achieved TFLOP/s and the model FLOP utilisation against this
  device's matmul peak as measured here (on GPU bf16's, or float16's where the fast path's
  first autocast dtype is float16; every regime against that one);
* evaluation img/s in each regime;
* the data loader: decoding and augmentation in one process, and the step's DataLoader with
  the config's workers, so that one sees whether it keeps up with the GPU;
* the projected wall time of voc-15-1-overlap with SDR: per step, its training images x 30
  epochs at the training rate (step 0 at fine-tuning's, later steps at SDR's, capped by the
  loader's), plus its val images at the evaluation rate, plus the start-up of its training
  and of its evaluation (what the warm-up took beyond its iterations: compilation, cudnn's
  search). A run's later steps build new models of a kind the process has run before, whose
  compiled graphs and cudnn's choices it keeps: their start-up is measured apart, by warming
  up a newly built model again.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from mmengine.dataset import default_collate
from mmengine.optim import build_optim_wrapper
from mmengine.registry import DefaultScope
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from .config import CPU_CONFIG, PAPERS_CONFIG, load_config
from .datasets import IncrementalSegDataset, eval_lut, is_synthetic, train_lut
from .engine import loader_settings, sgd_config, shut_down_loader_workers
from .errors import UserError, comma_list, refuse_repeats, refuse_unwritable_folder
from .hooks import EpochKeyedSampler
from .io import cache_dir, cache_root
from .methods import get_method
from .profiling import StepProfile, format_profiles, profile_step
from .protocols import load_protocol
from .runner import attach_previous_step, build_model
from .speed import (AMP_DTYPES, REFERENCE_SPEED, Speed, autocast, optim_wrapper_config,
                    prepare_model, training_device)
from .splits import index_dataset, protocol_splits, select
from .synth import make_synth, writes_into
from .transforms import EvalTransform, TrainTransform

EPOCHS_PER_STEP = 30  # the papers' VOC schedule
PROJECTED_PROTOCOL = 'voc-15-1-overlap'
# (train, val) images of each step of voc-15-1-overlap on VOC 2012 + SBD (10,582 / 1,449):
# the lengths of the reference's split files, fcdl94/MiB and LTTM/SDR
# data/voc/15-5s-ov/train-<t>.npy (identical in both) and LTTM/SDR
# data/voc/15-5s/test_on_val-<t>.npy (val images holding a class seen so far).
VOC_15_1_OVERLAP_STEP_IMAGES = [(9568, 1240), (487, 1277), (299, 1329), (491, 1353), (500, 1421),
                                (548, 1449)]
PRELOADED_BATCHES = 4   # distinct batches cycled through by the timed loops
ROUNDS = 4              # the timed iterations of each regime, in this many alternating rounds
PROFILED_STEPS = 3      # with --profile: each regime's steps timed, then as many profiled
LOADER_BATCHES = 30     # batches timed through the DataLoader (at most)
AMP_SHORT_NAMES = {'bfloat16': 'bf16', 'float16': 'fp16'}
BATCH_NORM_KERNELS = {'Native': "PyTorch's own", 'Cudnn': 'cuDNN', 'Miopen': 'MIOpen'}
TEACHERS = {'inference': True, 'trained': False}   # --teacher's names for Speed.inference_teacher


@dataclass(frozen=True)
class Rate:
    """A regime's measured speed on one kind of step."""
    img_s: float       # images per second, the median over the timed rounds
    startup_s: float   # the warm-up's seconds beyond its iterations at that rate: compilation,
                       # cudnn's search, first allocations
    restart_s: float | None = None  # the same for a newly built model of the same kind in the
                       # same process (graphs and cudnn's choices kept): what a later step pays


@dataclass
class Case:
    """A kind of training step: which method's model, at which step, on which images."""
    label: str
    method: str
    step: int
    dataset: IncrementalSegDataset | None


def run_bench(config: str | None = None, size: int | None = None, data_root: str | None = None,
              batch: int | None = None, iters: int = 20, warmup: int = 5,
              workers: int | None = None, compile: bool = False, amp: str | None = None,
              teacher: str | None = None, profile: bool = False, log=print,
              progress=None) -> dict:
    """Measure, print the report, and return its numbers. Each measure is announced on
    ``progress`` (default: stderr) as it is taken, so a run cut short still tells what it
    measured."""
    progress = progress or _to_stderr
    device = training_device()
    on_gpu = device == 'cuda'
    cfg = load_config(config or (PAPERS_CONFIG if on_gpu else CPU_CONFIG))
    if data_root is not None and size is not None:
        raise UserError('--size sets the side of the synthetic images; --data-root\'s images are '
                        'read as they are (give one of the two)')
    if data_root is None:
        size = (512 if on_gpu else 64) if size is None else size
    batch = cfg.data.batch_size if batch is None else batch
    _check_flags(size=size, batch=batch, iters=iters, warmup=warmup, workers=workers)
    fast = Speed(**cfg.speed)
    amps = parse_amps(amp, device) or [fast.amp]
    teachers = parse_teachers(teacher, device) or [fast.inference_teacher]
    if workers is not None:
        cfg.data.num_workers = workers
    regimes = bench_regimes(fast, device, compile, amps, teachers)
    loops = dict(iters=iters, warmup=warmup, device=device, progress=progress)

    device_name = _device_name()
    progress(f'{device_name}; {os.path.basename(cfg.filename)}, batch {batch}, '
             f'{_images(size, data_root)}')
    root = data_root or bench_dataset(size, batch, cfg.data.eval_batch_size)
    cases, val_set = bench_datasets(cfg, root, batch)
    peak, peak_label = matmul_peak(device, peak_dtype(device, amps[0]))
    progress(f'peak {_figures(peak / 1e12, 1)} TFLOP/s ({peak_label})')
    report = dict(device=device_name, software=_software(), config=cfg.filename, size=size,
                  data_root=data_root,
                  batch=batch, iters=iters, warmup=warmup, peak_flops=peak, peak_label=peak_label,
                  batch_norm=batch_norm_kernels(device) if on_gpu else None,
                  regimes=regimes, tf32=on_gpu and torch.backends.cudnn.allow_tf32,
                  train=[row for case in cases
                         for row in measure_training(cfg, case, regimes, batch, profile, **loops)],
                  eval=measure_eval(cfg, cases[0], val_set, regimes, **loops))
    report['loader'] = measure_loader(cfg, cases[0].dataset, batch, progress)
    report['projection'] = {name: project_protocol(report, name) for name in regimes}
    log(format_report(report))
    return report


def bench_regimes(fast: Speed, device: str, compile: bool, amps: list[str | None] | None = None,
                  teachers: list[bool] | None = None) -> dict[str, Speed]:
    """The regimes compared, by name: the reference (fp32 eager), the config's fast path
    (eager) and, with ``compile``, the same compiled, so that one run shows what compiling
    adds on this machine. ``amps``: the fast path's autocast dtypes (default: the config's);
    ``teachers``: its ``inference_teacher`` settings (default: the config's); given several,
    the fast path is measured in each combination, its name saying which."""
    amps = amps or [fast.amp]
    teachers = teachers or [fast.inference_teacher]
    regimes = {'fp32 eager': REFERENCE_SPEED}
    for name, compiled in [('fast path', False)] + [('fast+compile', True)] * compile:
        for amp in amps:
            for teacher in teachers:
                parts = ([AMP_SHORT_NAMES[amp]] if len(amps) > 1 else []) + (
                    [f'{_teacher_name(teacher)} teacher'] if len(teachers) > 1 else [])
                label = f'{name} ({", ".join(parts)})' if parts else name
                regimes[label] = replace(fast, amp=amp, compile=compiled,
                                         inference_teacher=teacher)
    return {name: speed.on(device) for name, speed in regimes.items()}


def _teacher_name(inference_teacher: bool) -> str:
    return next(name for name, value in TEACHERS.items() if value == inference_teacher)


def parse_amps(amp: str | None, device: str) -> list[str] | None:
    """``--amp``'s autocast dtypes, comma-separated (None: not given)."""
    amps = _choices('--amp', amp, [name for name in AMP_DTYPES if name], 'autocast dtype')
    if amps and device != 'cuda':
        raise UserError('--amp: autocast applies on a CUDA GPU only, and this machine has none '
                        '(on the CPU every regime trains in fp32)')
    return amps


def parse_teachers(teacher: str | None, device: str) -> list[bool] | None:
    """``--teacher``'s settings of ``inference_teacher``, comma-separated (None: not given)."""
    names = _choices('--teacher', teacher, list(TEACHERS), 'teacher')
    if names and device != 'cuda':
        raise UserError('--teacher: the teacher is made for inference on a CUDA GPU only, and '
                        'this machine has none (on the CPU every regime runs it as trained)')
    return None if names is None else [TEACHERS[name] for name in names]


def _choices(option: str, text: str | None, known: list[str], what: str) -> list[str] | None:
    """The comma-separated choices of ``option`` among ``known`` (None: not given)."""
    if text is None:
        return None
    given = comma_list(text)
    unknown = [name for name in given if name not in known]
    if unknown:
        raise UserError(f'{option}: unknown {what}(s) {", ".join(map(repr, unknown))} '
                        f'(known: {", ".join(known)})')
    if not given:
        raise UserError(f'{option}: no {what} (known: {", ".join(known)})')
    refuse_repeats(option, given)
    return given


def measure_training(cfg, case: Case, regimes: dict[str, Speed], batch: int, profile: bool = False,
                     *, iters: int, warmup: int, device: str, progress) -> list[dict]:
    """The case's training img/s in each regime, and its FLOPs per image; with ``profile``,
    where each regime's step spends its time."""
    batches = preload(case.dataset, batch, device)
    try:
        rates, flops, profiles = _time_training(
            cfg, case, regimes, batches, iters, warmup, device, profile,
            partial(_prefixed, progress, f'training, {case.label}'))
    except torch.cuda.OutOfMemoryError:
        raise UserError(f'out of GPU memory: {case.label} at batch {batch}; '
                        f'try --batch {max(1, batch // 2)}') from None
    finally:
        _release_memory(device)  # the models went with _time_training's frame
    progress(f'training, {case.label}: {_rates(rates)}; {_figures(flops / 1e9, 1)} GFLOP/img')
    return [dict(case=case.label, step=case.step, regime=name, img_s=rate.img_s,
                 startup_s=rate.startup_s, restart_s=rate.restart_s, flops_per_img=flops,
                 profile=profiles.get(name))
            for name, rate in rates.items()]


def _time_training(cfg, case: Case, regimes: dict[str, Speed], batches: list[dict], iters: int,
                   warmup: int, device: str, profile: bool,
                   progress) -> tuple[dict[str, Rate], float, dict[str, StepProfile]]:
    batch = len(batches[0]['inputs'])

    def training_step(speed: Speed):
        model, optim = build_step(cfg, case, speed, device)
        return model, optim, (partial(_train_on, model, optim, batches),
                              partial(regime_context, speed, model, train=True))

    steps, flops = {}, None
    for name, speed in regimes.items():
        model, optim, steps[name] = training_step(speed)
        if flops is None:  # counted once, on the reference regime's eager model
            flops = training_flops(model, optim, batches[0]) / batch
    rates = interleaved_rates(steps, iters, warmup, batch, device, progress=progress)
    profiles = {}
    for name, (step, context) in steps.items() if profile else ():
        with context():   # PROFILED_STEPS timed, then as many more profiled
            wall = _timed_calls(step, warmup + iters, PROFILED_STEPS, device) / PROFILED_STEPS
            profiles[name] = profile_step(step, warmup + iters + PROFILED_STEPS, PROFILED_STEPS,
                                          device, wall)
        progress(f'{name}: profiled {PROFILED_STEPS} steps')
    del steps, model, optim
    return with_restarts(rates, regimes, lambda speed: training_step(speed)[2], warmup, batch,
                         device, progress), flops, profiles


def measure_eval(cfg, case: Case, val_set, regimes: dict[str, Speed], *, iters: int, warmup: int,
                 device: str, progress) -> dict[str, Rate]:
    """Evaluation img/s (forward and argmax, as the val loop runs them) in each regime."""
    batches = preload(val_set, cfg.data.eval_batch_size, device)
    try:
        rates = _time_eval(cfg, case, regimes, batches, iters, warmup, device,
                           partial(_prefixed, progress, 'evaluation'))
    finally:
        _release_memory(device)
    progress(f'evaluation: {_rates(rates)}')
    return rates


def _time_eval(cfg, case: Case, regimes: dict[str, Speed], batches: list[dict], iters: int,
               warmup: int, device: str, progress) -> dict[str, Rate]:
    batch = len(batches[0]['inputs'])

    def eval_step(speed: Speed):
        model, _ = build_step(cfg, case, speed, device)
        return (partial(_evaluate_on, model, batches),
                partial(regime_context, speed, model, train=False))

    rates = interleaved_rates({name: eval_step(speed) for name, speed in regimes.items()},
                              iters, warmup, batch, device, progress=progress)
    return with_restarts(rates, regimes, eval_step, warmup, batch, device, progress)


def _train_on(model, optim, batches: list[dict], i: int) -> None:
    model.train_step(batches[i % len(batches)], optim)


def _evaluate_on(model, batches: list[dict], i: int) -> None:
    model.val_step(batches[i % len(batches)])


def _check_flags(**flags) -> None:
    minimum = dict(size=16, batch=1, iters=1, warmup=0, workers=0)
    for name, value in flags.items():
        if value is not None and value < minimum[name]:
            raise UserError(f'--{name} must be at least {minimum[name]}, got {value}')


# ----------------------------------------------------------------------------- data

def bench_dataset(size: int, batch: int, eval_batch: int) -> str:
    """The synthetic dataset of ``size`` px images, generated into the cache on first use;
    enough images for every timed loop."""
    n_train, n_val = 40 * batch, 4 * eval_batch
    out = cache_dir('bench') / f'synth-{size}px-{n_train}-{n_val}'
    if writes_into(out):   # to generate: a shared read-only cache holds other sizes only
        refuse_unwritable_folder('$CSSBENCH_CACHE', cache_root(), out)
    return str(make_synth(out, n_train=n_train, n_val=n_val, size=size, seed=0,
                          workers=os.cpu_count() or 1))


def bench_datasets(cfg, root: str, batch: int) -> tuple[list[Case], IncrementalSegDataset]:
    """voc-15-1-overlap's step-0 and step-1 training sets of the data (label sets and
    splits from the cache) and step 0's evaluation set; on the synthetic dataset, which VOC's
    protocols refuse, its twin synth-15-1-overlap's (the same steps, so the same models)."""
    protocol = load_protocol('synth-15-1-overlap' if is_synthetic(Path(root).expanduser())
                             else PROJECTED_PROTOCOL)
    index = index_dataset(protocol.dataset, root)
    splits = protocol_splits(protocol, index)
    crop = cfg.data.crop_size

    def train_set(step: int) -> IncrementalSegDataset:
        samples = select(index.samples['train'], splits[step]['train'])
        if len(samples) < batch:
            raise UserError(f'{root}: {len(samples)} training images at step {step} of '
                            f'{protocol.name}, fewer than a batch of {batch}')
        return IncrementalSegDataset(samples, train_lut(protocol, step), TrainTransform(crop))

    val = IncrementalSegDataset(select(index.samples['val'], splits[0]['val']),
                                eval_lut(protocol, 0), EvalTransform(crop))
    if len(val) < cfg.data.eval_batch_size:
        raise UserError(f'{root}: {len(val)} evaluation images at step 0 of {protocol.name}, '
                        f'fewer than a batch of {cfg.data.eval_batch_size} (the config\'s '
                        f'data.eval_batch_size; --batch sets the training batch)')
    return [Case('fine-tuning, step 0', 'ft', 0, train_set(0)),
            Case('sdr, step 1 (+ teacher)', 'sdr', 1, train_set(1))], val


def preload(dataset, batch: int, device: str) -> list[dict]:
    """A few batches on the device, as the loader would deliver them."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, drop_last=True,
                        collate_fn=default_collate)
    batches = []
    for data in loader:
        batches.append({k: v.to(device) for k, v in data.items()})
        if len(batches) == PRELOADED_BATCHES:
            break
    return batches


def measure_loader(cfg, dataset, batch: int, progress) -> dict:
    loader = dict(per_process=decode_rate(dataset, 2 * batch), workers=cfg.data.num_workers,
                  with_workers=loader_rate(dataset, cfg, batch))
    progress(f'data loader: {loader["per_process"]:.1f} img/s in one process, '
             f'{loader["with_workers"]:.1f} img/s with {loader["workers"]} worker(s)')
    return loader


def decode_rate(dataset, n: int) -> float:
    """Images per second that one process reads, decodes and augments."""
    n = min(n, len(dataset))
    start = time.perf_counter()
    for i in range(n):
        dataset[(0, i)]
    return n / (time.perf_counter() - start)


def loader_rate(dataset, cfg, batch: int) -> float:
    """Images per second through the step's DataLoader (the runner's settings), after the
    first batch (worker start-up is not counted)."""
    loader = DataLoader(dataset, sampler=EpochKeyedSampler(dataset, shuffle=True, seed=0),
                        collate_fn=default_collate, drop_last=True, **loader_settings(cfg.data, batch))
    n = min(LOADER_BATCHES, len(loader) - 1)
    if n < 1:
        return math.nan
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(n):
        next(iterator)
    elapsed = time.perf_counter() - start
    shut_down_loader_workers(iterator)
    return n * batch / elapsed


# ----------------------------------------------------------------------------- models

def build_step(cfg, case: Case, speed: Speed, device: str):
    """The case's model (with a teacher after step 0) prepared for ``speed`` as the runner
    prepares it, and its optimizer wrapper."""
    protocol, model_type = load_protocol(PROJECTED_PROTOCOL), get_method(case.method).model_type
    torch.manual_seed(0)
    model = build_model(cfg, model_type, protocol, case.step)
    if case.step > 0:
        teacher = build_model(cfg, model_type, protocol, case.step - 1)
        attach_previous_step(model, teacher, teacher.state_dict(), 'bench')
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    prepare_model(model, speed, device)
    with DefaultScope.overwrite_default_scope('cssbench'):
        optim = build_optim_wrapper(model, optim_wrapper_config(
            speed, sgd_config(cfg.schedule, cfg.schedule.lr[min(case.step, 1)])))
    return model, optim


def training_flops(model, optim, data: dict) -> int:
    """FLOPs of one training step (forward, backward, the teacher's forward)."""
    with FlopCounterMode(display=False) as counter:
        model.train_step(data, optim)
    return counter.get_total_flops()


@contextlib.contextmanager
def regime_context(speed: Speed, model, *, train: bool):
    """What a regime's calls run under: the model's mode, grad mode, cudnn's benchmark flag
    (a global, so set at each turn) and, for evaluation, autocast (training autocasts in
    ``train_step``, through the optimizer wrapper, as in a run)."""
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    model.train(train)
    with torch.set_grad_enabled(train), contextlib.nullcontext() if train else autocast(speed.amp):
        yield


def interleaved_rates(steps: dict, iters: int, warmup: int, batch: int, device: str, *,
                      rounds: int = ROUNDS, progress=lambda line: None) -> dict[str, Rate]:
    """The speed of each regime's ``step(i)``; ``steps`` maps a regime's name to
    ``(step, context)``, ``context()`` giving what its calls run under. Each regime first
    makes ``warmup`` untimed calls (their time and the peak GPU memory go to ``progress``);
    then ``iters`` timed calls each, in ``rounds`` rounds (fewer if ``iters`` is smaller) in
    which the regimes take turns. A regime's rate is its median over its rounds; its
    start-up, what its warm-up took beyond ``warmup`` calls at that rate."""
    warmup_s = {}
    for name, (step, context) in steps.items():
        with context():
            _reset_peak_memory(device)
            warmup_s[name] = _timed_calls(step, 0, warmup, device)
            progress(f'{name}: {warmup} warm-up iterations in {warmup_s[name]:.1f} s'
                     f'{_peak_memory(device)}')
    rounds = min(rounds, iters)
    sizes = [iters // rounds + (r < iters % rounds) for r in range(rounds)]
    rates = {name: [] for name in steps}
    first = warmup
    for size in sizes:
        for name, (step, context) in steps.items():
            with context():
                rates[name].append(size * batch / _timed_calls(step, first, size, device))
        first += size
    medians = {name: statistics.median(values) for name, values in rates.items()}
    return {name: Rate(rate, _beyond_calls(warmup_s[name], warmup, batch, rate))
            for name, rate in medians.items()}


def with_restarts(rates: dict[str, Rate], regimes: dict[str, Speed], make_step, warmup: int,
                  batch: int, device: str, progress) -> dict[str, Rate]:
    """``rates`` with each regime's restart: ``make_step(speed)`` builds a new model and gives
    its ``(step, context)``, whose ``warmup`` calls are timed; what they took beyond
    ``warmup`` calls at the regime's rate is what a later step of a run pays to start."""
    result = {}
    for name, speed in regimes.items():
        step, context = make_step(speed)
        with context():
            seconds = _timed_calls(step, 0, warmup, device)
        del step, context
        progress(f'{name}: {warmup} warm-up iterations of a newly built model in {seconds:.1f} s')
        rate = rates[name]
        result[name] = replace(rate, restart_s=_beyond_calls(seconds, warmup, batch, rate.img_s))
    return result


def _timed_calls(step, first: int, n: int, device: str) -> float:
    """Seconds that ``step(first) ... step(first + n - 1)`` take, the device synchronised
    before and after."""
    _synchronize(device)
    start = time.perf_counter()
    for i in range(first, first + n):
        step(i)
    _synchronize(device)
    return time.perf_counter() - start


def _beyond_calls(seconds: float, calls: int, batch: int, img_s: float) -> float:
    """What ``calls`` calls took beyond their time at ``img_s``: the start-up."""
    return max(0.0, seconds - calls * batch / img_s)


def peak_dtype(device: str, amp: str | None) -> torch.dtype:
    """The dtype of the matmul peak that the MFU is against: on GPU the fast path's autocast
    dtype, float16 where it is that (a GPU without bf16 units emulates bf16: its bf16 peak would
    be low), else bf16; fp32 on CPU."""
    if device != 'cuda':
        return torch.float32
    return torch.float16 if amp == 'float16' else torch.bfloat16


def matmul_peak(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """The device's measured matmul throughput (FLOP/s) in ``dtype``; the best of a few
    trials. On a CPU, 512x512 products measured 15-20 % under 1024's on an idle 2-core
    machine, and far under on a busy one: the convolutions' MFU against them passed 100 %."""
    n, reps = (8192, 20) if device == 'cuda' else (1024, 4)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = 0.0
    for _ in range(4):  # the first is the warm-up
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        _synchronize(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best, f'{str(dtype).removeprefix("torch.")} matmul {n}x{n}, measured'


def _synchronize(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def _release_memory(device: str) -> None:
    if device == 'cuda':
        torch.cuda.empty_cache()


def _reset_peak_memory(device: str) -> None:
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()


def _peak_memory(device: str) -> str:
    if device != 'cuda':
        return ''
    return f', peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB'


def _rates(rates: dict[str, Rate]) -> str:
    return ', '.join(f'{name} {_figures(rate.img_s, 1)} img/s' for name, rate in rates.items())


def _figures(value: float, decimals: int) -> str:
    """``value`` with ``decimals`` decimals, or with more where it is small: at least three
    significant digits (a CPU's TFLOP/s, GFLOP/img and peak, which one decimal would print as
    0.0), so that the report's arithmetic can be checked from its printed numbers."""
    if value and math.isfinite(value):
        decimals = max(decimals, 2 - math.floor(math.log10(abs(value))))
    return f'{value:.{decimals}f}'


def _images(size: int | None, data_root: str | None) -> str:
    """What the bench reads: the synthetic images of ``size`` px, or ``data_root``'s."""
    return f'images of {data_root}' if data_root else f'{size} px images'


def _prefixed(progress, prefix: str, line: str) -> None:
    progress(f'{prefix}, {line}')


def _to_stderr(line: str) -> None:
    print(f'cssbench bench: {line}', file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f'cpu, torch threads: {torch.get_num_threads()}'


def _software() -> str:
    """The versions that set a GPU's kernels (two machines' rates differ with them)."""
    versions = [f'torch {torch.__version__}']
    if torch.cuda.is_available():   # a ROCm build: HIP and MIOpen in CUDA's and cuDNN's place
        toolkit = f'HIP {torch.version.hip}' if torch.version.hip else f'CUDA {torch.version.cuda}'
        library = 'MIOpen' if torch.version.hip else 'cuDNN'
        versions += [toolkit, f'{library} {torch.backends.cudnn.version()}']
    return ', '.join(versions)


def batch_norm_kernels(device: str) -> str | None:
    """Whose kernels a training batch norm of channels_last activations runs, in fp32 and
    under each autocast dtype (its weights stay fp32): cuDNN's (MIOpen's), or PyTorch's own.
    PyTorch chooses, and its choice sets much of a step's time: 110 batch norms in
    DeepLabV3-ResNet101, and it keeps cuDNN's for fp32 and float16 inputs, not bf16 ones.
    None where this torch does not say."""
    select = getattr(torch._C, '_select_batch_norm_backend', None)
    if select is None:
        return None
    stats = torch.zeros(64, device=device)
    kernels = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.zeros(2, 64, 8, 8, device=device, dtype=dtype).to(
            memory_format=torch.channels_last)
        backend = select(x, stats + 1, stats, stats, stats + 1, True, 1e-5).name
        kernels.append(f'{str(dtype).removeprefix("torch.")} {BATCH_NORM_KERNELS.get(backend, backend)}')
    return ', '.join(kernels)


# ----------------------------------------------------------------------------- projection

def project_protocol(report: dict, regime: str) -> tuple[float, float]:
    """Seconds for voc-15-1-overlap with SDR in ``regime``, and the start-ups' share of
    them: step 0 at fine-tuning's rate, later steps at SDR's (its teacher's forward
    included), each capped by the loader's rate; 30 epochs per step; each step's evaluation
    at the evaluation rate. Start-ups, as one process runs the steps: step 0 pays
    fine-tuning's and evaluation's, step 1 SDR's (its teacher is new) and evaluation's
    restart, later steps SDR's and evaluation's restarts."""
    train = {row['step']: row for row in report['train'] if row['regime'] == regime}
    evaluation = report['eval'][regime]
    loader = report['loader']['with_workers']
    cap = math.inf if math.isnan(loader) else loader
    seconds = startup = 0.0
    for t, (n_train, n_val) in enumerate(VOC_15_1_OVERLAP_STEP_IMAGES):
        row = train[min(t, 1)]
        startup += ((row['startup_s'] if t <= 1 else row['restart_s'])
                    + (evaluation.startup_s if t == 0 else evaluation.restart_s))
        seconds += n_train * EPOCHS_PER_STEP / min(row['img_s'], cap) + n_val / evaluation.img_s
    return seconds + startup, startup


# ----------------------------------------------------------------------------- report

def describe(speed: Speed, tf32: bool = False) -> str:
    """A regime's settings; ``tf32``: cudnn runs fp32 convolutions in TF32."""
    fp32 = "fp32 (TF32 convolutions, PyTorch's default)" if tf32 else 'fp32'
    return ', '.join([speed.amp or fp32,
                      'channels_last' if speed.channels_last else 'contiguous',
                      f'cudnn benchmark {"on" if speed.cudnn_benchmark else "off"}',
                      'torch.compile' if speed.compile else 'eager',
                      'teacher for inference' if speed.inference_teacher else 'teacher as trained'])


def format_report(report: dict) -> str:
    peak = report['peak_flops']
    reference = {row['case']: row['img_s'] for row in report['train'] if row['regime'] == 'fp32 eager'}
    lines = [f'cssbench bench: {os.path.basename(report["config"])}, '
             f'{_images(report["size"], report.get("data_root"))}, '
             f'batch {report["batch"]}, {report["iters"]} timed iterations after '
             f'{report["warmup"]} warm-up, in {min(ROUNDS, report["iters"])} rounds taking '
             f'turns (median)',
             f'device: {report["device"]} ({report["software"]}); peak {_figures(peak / 1e12, 1)} TFLOP/s '
             f'({report["peak_label"]}; the MFU of every regime is against it)']
    if report.get('batch_norm'):
        lines.append(f"batch norm's kernels (training, channels_last): {report['batch_norm']}")
    lines += [f'  {name}: {describe(speed, report["tf32"])}'
              for name, speed in report['regimes'].items()]
    width = max(12, *map(len, report['regimes']))
    lines += ['', f'{"training step":<26} {"regime":<{width}} {"img/s":>9} {"vs fp32":>8} '
                  f'{"GFLOP/img":>10} {"TFLOP/s":>9} {"MFU":>7}']
    for row in report['train']:
        achieved = row['flops_per_img'] * row['img_s']
        lines.append(f'{row["case"]:<26} {row["regime"]:<{width}} {_figures(row["img_s"], 1):>9} '
                     f'{row["img_s"] / reference[row["case"]]:>7.2f}x '
                     f'{_figures(row["flops_per_img"] / 1e9, 1):>10} {_figures(achieved / 1e12, 2):>9} '
                     f'{100 * achieved / peak:>6.1f}%')
    for name, rate in report['eval'].items():
        lines.append(f'{"evaluation":<26} {name:<{width}} {_figures(rate.img_s, 1):>9} '
                     f'{rate.img_s / report["eval"]["fp32 eager"].img_s:>7.2f}x')
    loader = report['loader']
    lines += ['', f'data loader: {loader["per_process"]:.1f} img/s decode + augment in one process; '
                  f'{loader["with_workers"]:.1f} img/s through the loader with '
                  f'{loader["workers"]} worker(s)']
    train_images = '/'.join(str(n) for n, _ in VOC_15_1_OVERLAP_STEP_IMAGES)
    lines += [f'projected {PROJECTED_PROTOCOL} with sdr ({len(VOC_15_1_OVERLAP_STEP_IMAGES)} steps '
              f'x {EPOCHS_PER_STEP} epochs, one process; train images per step {train_images}):']
    lines += [f'  {name:<{width}} {_duration(seconds)} ({_duration(startup)} of it start-up: '
              f'compilation, cudnn\'s search)'
              for name, (seconds, startup) in report['projection'].items()]
    for case in dict.fromkeys(row['case'] for row in report['train'] if row.get('profile')):
        profiles = {row['regime']: row['profile'] for row in report['train'] if row['case'] == case}
        lines += ['', *format_profiles(case, profiles)]
    return '\n'.join(lines)
