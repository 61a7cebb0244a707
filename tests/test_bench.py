"""``cssbench bench`` end to end on CPU with the small model: the report's structure, positive
finite numbers, and one-line errors for bad flags."""
from __future__ import annotations

import math
import re

import pytest
import torch

from cssbench import bench
from cssbench.bench import project_protocol
from cssbench.cli import main

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
    out = capsys.readouterr().out
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
    assert 'train images per step 9568/487/299/491/500/548' in out
    projected = re.findall(r'^  (fp32 eager|fast path) +(.+)$', out, re.M)
    assert [regime for regime, _ in projected] == ['fp32 eager', 'fast path']


def test_the_projection_adds_30_epochs_of_each_step_and_its_evaluation(monkeypatch):
    monkeypatch.setattr(bench, 'VOC_15_1_OVERLAP_STEP_IMAGES',
                        [(8000, 1200), (400, 1250), (300, 1300), (200, 1350), (100, 1400), (50, 1449)])
    report = dict(train=[dict(step=0, regime='r', img_s=100.0), dict(step=1, regime='r', img_s=50.0)],
                  eval={'r': 500.0}, loader=dict(with_workers=80.0))
    # step 0 at fine-tuning's rate capped by the loader's, the others at SDR's
    expected = (8000 * 30 / 80.0 + (400 + 300 + 200 + 100 + 50) * 30 / 50.0
                + (1200 + 1250 + 1300 + 1350 + 1400 + 1449) / 500.0)
    assert project_protocol(report, 'r') == pytest.approx(expected)


@pytest.mark.parametrize('flags, message', [
    (['--iters', '0'], '--iters must be at least 1, got 0'),
    (['--batch', '0'], '--batch must be at least 1, got 0'),
    (['--size', '8'], '--size must be at least 16, got 8'),
    (['--workers', '-1'], '--workers must be at least 0, got -1'),
    (['--config', 'nope'], "unknown config 'nope'"),
])
def test_bad_flags_give_one_line_errors(flags, message, capsys):
    assert main(['bench', *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and '\n' not in err
