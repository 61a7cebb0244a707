"""The fast path on a GPU: bf16's and float16's losses track fp32's, float16's loss scaling
skips an overflowed step, channels_last computes what the contiguous layout does, a compiled
step matches the eager one, a compiled model computes in its autocast's dtype, no method's
training iteration waits for the GPU (bf16 or float16), the bench compares bf16 with
float16, a fast-path run completes (with whole-image evaluation too, and a cached step 0
evaluated alone), the teacher made for inference gives the teacher's losses, and (with two
GPUs) a torchrun run with NCCL and SyncBN. Skipped without CUDA."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cssbench.bench import Case, build_step
from cssbench.config import load_config
from cssbench.methods import method_names
from cssbench.runner import run_protocol, speed_record
from cssbench.speed import REFERENCE_SPEED, SPEED_DEFAULTS, Speed
from conftest import (float16_steps_by_hand, join_val_images_in_pairs, random_batch,
                      sdr_losses_with_a_trained_teacher)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

CONFIGS = Path(__file__).resolve().parent.parent / 'benchmark' / 'configs'


def gpu_batch(classes: int = 17) -> dict:
    return {k: v.cuda() for k, v in random_batch(size=64, classes=classes).items()}


def losses_of(method: str, step: int, speed: Speed) -> dict[str, float]:
    """One forward of a step's loss in ``speed``, from the same initial weights each time."""
    cfg = load_config('small')
    model, optim = build_step(cfg, Case(method, method, step, dataset=None), speed, 'cuda')
    model.eval()  # no dropout draws: both regimes compute the same function
    data = model.data_preprocessor(gpu_batch(classes=17 if step else 16), True)
    with optim.optim_context(model):
        losses = model(**data, mode='loss')
    return {k: float(v) for k, v in losses.items()}


@pytest.mark.parametrize('amp', ['bfloat16', 'float16'])
@pytest.mark.parametrize('method, step', [('ft', 0), ('sdr', 1)])
def test_autocast_losses_track_fp32_on_the_same_batch(method, step, amp):
    torch.backends.cudnn.allow_tf32 = False  # the reference in true fp32
    try:
        fp32 = losses_of(method, step, REFERENCE_SPEED)
        fast = losses_of(method, step, Speed(amp=amp, channels_last=True))
    finally:
        torch.backends.cudnn.allow_tf32 = True
    assert fp32.keys() == fast.keys()
    for key in fp32:
        # bf16 keeps 8 bits of mantissa (float16 11): a few parts in a thousand through the network
        assert fast[key] == pytest.approx(fp32[key], rel=3e-2, abs=1e-4), key


def test_the_teacher_made_for_inference_gives_the_losses_of_the_teacher_as_trained():
    # its BNs (trained-looking statistics) folded and its weights stored in bf16, on the GPU:
    # SDR's losses under bf16 autocast as with the teacher as trained, to bf16's rounding
    losses = {made: sdr_losses_with_a_trained_teacher(
        Speed(amp='bfloat16', channels_last=True, inference_teacher=made), 'cuda')[1]
        for made in (True, False)}
    assert {k for k, v in losses[True].items() if v != 0} >= {'loss_kd', 'loss_pm'}
    for key, value in losses[False].items():
        assert float(losses[True][key]) == pytest.approx(float(value), rel=2e-2, abs=1e-4), key


def test_float16_scales_the_loss_and_skips_a_step_whose_gradients_overflowed(monkeypatch):
    float16_steps_by_hand('cuda', monkeypatch)


def test_channels_last_computes_what_the_contiguous_layout_does():
    torch.backends.cudnn.allow_tf32 = False
    try:
        outputs = []
        for speed in (REFERENCE_SPEED, Speed(amp=None, channels_last=True)):
            model, _ = build_step(load_config('small'), Case('sdr', 'sdr', 1, None), speed, 'cuda')
            model.eval()
            with torch.no_grad():
                outputs.append(model(model.data_preprocessor(gpu_batch())['inputs']))
    finally:
        torch.backends.cudnn.allow_tf32 = True
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)


def test_a_compiled_training_step_matches_the_eager_one():
    losses = []
    for speed in (Speed(amp='bfloat16'), Speed(amp='bfloat16', compile=True)):
        model, optim = build_step(load_config('small'), Case('ft', 'ft', 0, None), speed, 'cuda')
        model.eval()  # no dropout: both see the same function
        data = gpu_batch(classes=16)
        losses.append([float(model.train_step(data, optim)['loss']) for _ in range(3)])
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)


def test_a_model_compiled_under_float16_computes_in_float16_after_one_compiled_under_bf16():
    # torch 2.11's AOTAutograd cache handed the float16 model the bf16 graph (speed.py)
    for amp in ('bfloat16', 'float16'):
        speed = Speed(amp=amp, compile=True)
        model, optim = build_step(load_config('small'), Case('ft', 'ft', 0, None), speed, 'cuda')
        inputs = model.data_preprocessor(gpu_batch(classes=16), True)['inputs']
        with optim.optim_context(model):
            out = model.extract(inputs)
        assert {t.dtype for t in [*out['body'], out['features']]} == {getattr(torch, amp)}, amp


@pytest.mark.parametrize('amp', ['bfloat16', 'float16'])
@pytest.mark.parametrize('name', method_names('all'))
def test_a_fast_path_training_iteration_does_not_wait_for_the_gpu(name, amp):
    speed = replace(SPEED_DEFAULTS, amp=amp)   # float16: its loss scaler's check stays on the GPU
    model, optim = build_step(load_config('small'), Case(name, name, 1, None), speed, 'cuda')
    data = gpu_batch(classes=sum(model.step_sizes))
    model.before_step_training([data])
    model.train()
    model.train_step(data, optim)  # the first iteration: cudnn's benchmark searches, buffers appear
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')  # any synchronising CUDA call raises
    try:
        model.train_step(data, optim)
    finally:
        torch.cuda.set_sync_debug_mode('default')


def test_a_fast_path_run_completes_and_records_its_settings(synth32, config32, tmp_path):
    steps = run_protocol('synth-15-5-overlap', 'sdr', config=str(config32), data_root=str(synth32),
                         epochs=1, results_root=tmp_path, run_name='fast', log=lambda *a: None)
    assert [s['step'] for s in steps] == [0, 1]
    assert all(0.0 <= v <= 1.0 for v in steps[1]['iou'].values() if v is not None)
    run = json.loads((tmp_path / 'synth-15-5-overlap' / 'sdr' / 'fast' / 'run.json').read_text())
    assert run['config']['speed']['amp'] == 'bfloat16'
    record = speed_record(load_config(str(config32)))
    assert (record['device'], record['amp'], record['channels_last']) == ('cuda', 'bfloat16', True)


def test_a_fast_path_run_scores_whole_images_of_two_sizes(synth32, config32, tmp_path,
                                                         isolated_cache):
    data = tmp_path / 'data'
    shutil.copytree(synth32, data)
    join_val_images_in_pairs(data)
    protocol = tmp_path / 'whole.yaml'
    protocol.write_text('name: whole\ndataset: synth\nmode: overlap\nsteps: ["0-15", "16-20"]\n'
                        'eval_crop: whole\n')
    kwargs = dict(config=str(config32), data_root=str(data), epochs=1,
                  results_root=tmp_path / 'results')
    steps = run_protocol(str(protocol), 'sdr', **kwargs, run_name='whole', log=lambda *a: None)
    assert [s['step'] for s in steps] == [0, 1]
    assert all(0.0 <= v <= 1.0 for v in steps[1]['iou'].values() if v is not None)
    assert torch.backends.cudnn.benchmark   # training's mode, set again after evaluating

    # The cached step 0, evaluated without training, scores as the run that trained it did.
    scores = list((isolated_cache / 'step0').glob('*/iou-*.json'))
    assert len(scores) == 1
    scores[0].unlink()
    messages = []
    again = run_protocol(str(protocol), 'sdr', **kwargs, run_name='again', log=messages.append)
    assert any('step 0: evaluating it' in m for m in messages)
    assert again[0]['iou'].keys() == steps[0]['iou'].keys()
    for c, v in steps[0]['iou'].items():
        assert again[0]['iou'][c] == (None if v is None else pytest.approx(v, abs=1e-3)), c


def test_bench_compares_the_fast_path_in_bf16_and_float16_side_by_side(capsys):
    from cssbench.cli import main
    assert main(['bench', '--config', 'small', '--size', '64', '--batch', '8', '--iters', '2',
                 '--warmup', '1', '--amp', 'bfloat16,float16', '--profile']) == 0
    out = capsys.readouterr().out
    for case in ('fine-tuning, step 0', 'sdr, step 1 (+ teacher)', 'evaluation'):
        rows = [line.split()[len(case.split()):] for line in out.splitlines()
                if line.startswith(case + ' ')]
        assert [' '.join(row[:-2] if case == 'evaluation' else row[:-5])
                for row in rows] == ['fp32 eager', 'fast path (bf16)', 'fast path (fp16)'], out
    assert ('  fast path (fp16): float16, channels_last, cudnn benchmark on, eager, '
            'teacher for inference') in out
    assert 'bfloat16 matmul' in out   # the MFU against the first dtype's peak
    # PyTorch keeps cuDNN's batch norm for fp32 and float16 input, not bf16 (the README says so)
    assert ("batch norm's kernels (training, channels_last): "
            "float32 cuDNN, bfloat16 PyTorch's own, float16 cuDNN") in out
    # --profile: the GPU kernels' time, each regime's, by kind; the convolutions' counted
    for regime in ('fp32 eager', 'fast path (bf16)', 'fast path (fp16)'):
        found = re.findall(rf'^  {re.escape(regime)}: wall ([0-9.]+), kernels ([0-9.]+): batch norm '
                           r'[0-9.]+ \(\d+ %\), convolution, matmul ([0-9.]+)', out, re.M)
        assert len(found) == 2, out   # fine-tuning's step and SDR's
        assert all(0 < float(conv) < float(kernels) for _, kernels, conv in found), found


def test_bench_compares_the_teacher_made_for_inference_with_the_teacher_as_trained(capsys):
    from cssbench.cli import main
    assert main(['bench', '--config', 'small', '--size', '64', '--batch', '8', '--iters', '2',
                 '--warmup', '1', '--teacher', 'inference,trained']) == 0
    out = capsys.readouterr().out
    regimes = ['fp32 eager', 'fast path (inference teacher)', 'fast path (trained teacher)']
    for case in ('fine-tuning, step 0', 'sdr, step 1 (+ teacher)', 'evaluation'):
        names = [re.split(r' {2,}', line[len(case):].strip())[0] for line in out.splitlines()
                 if line.startswith(case + ' ')]
        assert names == regimes, out
    assert ('  fast path (trained teacher): bfloat16, channels_last, cudnn benchmark on, eager, '
            'teacher as trained') in out


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two GPUs')
def test_two_gpus_train_with_nccl_and_syncbn(synth32, config32, tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           '-m', 'cssbench', 'run', '--protocol', 'synth-15-5-overlap', '--method', 'sdr',
           '--config', str(config32), '--data-root', str(synth32), '--epochs', '1',
           '--results', str(tmp_path), '--run-name', 'ddp']
    proc = subprocess.run(cmd, env=dict(os.environ), cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = json.loads((tmp_path / 'synth-15-5-overlap' / 'sdr' / 'ddp' / 'metrics.json')
                       .read_text())['steps']
    assert [s['step'] for s in steps] == [0, 1]
