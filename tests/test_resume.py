"""Nothing lost: a run killed with SIGKILL and started again ends with the same numbers."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cssbench.errors import UserError
from cssbench.runner import repair_last_checkpoint, run_protocol
from cssbench.synth import make_synth

CONFIGS = Path(__file__).resolve().parent.parent / 'benchmark' / 'configs'
PROTOCOL = 'synth-15-5-overlap'


@pytest.fixture(scope='module')
def setup(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp('resume')
    data = make_synth(base / 'data', n_train=160, n_val=30, size=32, seed=7, progress=False)
    config = base / 'tiny.py'
    config.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\n"
                      "data = dict(crop_size=32, batch_size=8, num_workers=1)\n")
    return dict(data=data, config=config, cache=base / 'cache')


def cssbench_run(setup, results: Path) -> subprocess.Popen:
    cmd = [sys.executable, '-m', 'cssbench', 'run', '--protocol', PROTOCOL, '--config',
           str(setup['config']), '--data-root', str(setup['data']), '--epochs', '3',
           '--results', str(results), '--run-name', 'r', '--seed', '1', '--no-step0-cache']
    env = dict(os.environ, CSSBENCH_CACHE=str(setup['cache']))
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f'run ended before {path} appeared:\n{proc.stdout.read()}'
        assert time.time() < deadline, f'{path} did not appear'
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def final_metrics(results: Path) -> list[dict]:
    steps = json.loads((results / PROTOCOL / 'ft' / 'r' / 'metrics.json').read_text())['steps']
    for s in steps:
        s.pop('wall_time_s')
    return steps


def test_killed_run_resumes_to_the_same_metrics(setup, tmp_path):
    reference = cssbench_run(setup, tmp_path / 'uninterrupted')
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out

    results = tmp_path / 'interrupted'
    work = results / PROTOCOL / 'ft' / 'r' / 'work'
    # Killed in step 0 right after its first epoch checkpoint appears (maybe while writing),
    # then again in the middle of step 1.
    kill_when(cssbench_run(setup, results), work / 'step0' / 'epoch_1.pth')
    kill_when(cssbench_run(setup, results), work / 'step1' / 'epoch_2.pth')
    assert not (results / PROTOCOL / 'ft' / 'r' / 'metrics.json').exists()
    assert json.loads((results / PROTOCOL / 'ft' / 'r' / 'run.json').read_text())['status'] == 'running'

    resumed = cssbench_run(setup, results)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert 'step 0: done before' in out
    assert re.search(rf'^\[{PROTOCOL}/ft/r\] step 1: continuing after epoch [12]/3, from its '
                     rf'epoch checkpoint in {re.escape(str(work / "step1"))}$', out, re.M), out
    assert 'Loads checkpoint' not in out   # mmengine's line, said so instead
    assert final_metrics(results) == final_metrics(tmp_path / 'uninterrupted')
    # Bit for bit: equal metrics could hide weights a resume changed a little (a dropout mask
    # drawn otherwise in the resumed epoch moves the weights by 1e-6, rarely an argmax).
    import torch
    for t in (0, 1):
        ours, theirs = (torch.load(r / PROTOCOL / 'ft' / 'r' / 'work' / f'step{t}' / 'model.pth',
                                   weights_only=True) for r in (results, tmp_path / 'uninterrupted'))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), f'step {t} weights differ'
    # Only the step weights stay once a step is done; the epoch checkpoints are gone.
    assert sorted(p.name for p in (work / 'step1').glob('*.pth')) == ['model.pth']


def test_resume_flag_needs_a_run_and_a_second_process_is_refused(setup, tmp_path):
    with pytest.raises(UserError, match='no run to resume'):
        run_protocol(PROTOCOL, 'ft', config=str(setup['config']), data_root=str(setup['data']),
                     results_root=tmp_path, resume=True, log=lambda *a: None)

    proc = cssbench_run(setup, tmp_path / 'busy')
    try:
        kill_dir = tmp_path / 'busy' / PROTOCOL / 'ft' / 'r' / 'run.json'
        deadline = time.time() + 120
        while not kill_dir.exists():
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.02)
        with pytest.raises(UserError, match='another cssbench process is running this run'):
            run_protocol(PROTOCOL, 'ft', config=str(setup['config']), data_root=str(setup['data']),
                         epochs=3, results_root=tmp_path / 'busy', run_name='r', seed=1,
                         log=lambda *a: None)
        # nor can another run take its work dir meanwhile (it would find it unmarked yet)
        with pytest.raises(UserError, match='another cssbench process is running a run in this work dir'):
            run_protocol(PROTOCOL, 'ft', config=str(setup['config']), data_root=str(setup['data']),
                         epochs=3, results_root=tmp_path / 'other', work_dir=kill_dir.parent / 'work',
                         log=lambda *a: None)
        assert not (tmp_path / 'other').exists()
    finally:
        proc.kill()
        proc.wait()


def test_repair_last_checkpoint_skips_a_truncated_checkpoint(tmp_path):
    import torch
    torch.save({'a': torch.zeros(3)}, tmp_path / 'epoch_1.pth')
    torch.save({'a': torch.ones(300)}, tmp_path / 'epoch_2.pth')
    data = (tmp_path / 'epoch_2.pth').read_bytes()
    (tmp_path / 'epoch_2.pth').write_bytes(data[:len(data) // 2])   # killed while writing
    (tmp_path / 'last_checkpoint').write_text('')                    # and while pointing

    # the epoch to resume after, the newest whole one's (the step is done once it reaches
    # the schedule's epochs): 1, not 2
    assert repair_last_checkpoint(tmp_path) == 1
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'epoch_1.pth')
    assert not (tmp_path / 'epoch_2.pth').exists()

    (tmp_path / 'epoch_1.pth').unlink()
    assert repair_last_checkpoint(tmp_path) is None
    assert not (tmp_path / 'last_checkpoint').exists()

    for epoch in (2, 9, 10):   # the newest by number, not by name (epoch_9 > epoch_10 as text)
        torch.save({'a': torch.zeros(3)}, tmp_path / f'epoch_{epoch}.pth')
    assert repair_last_checkpoint(tmp_path) == 10   # its epoch, not the count of checkpoints (3)
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'epoch_10.pth')


def test_two_processes_share_one_results_store(setup, tmp_path):
    results = tmp_path / 'results'
    env = dict(os.environ, CSSBENCH_CACHE=str(setup['cache']))
    procs = [subprocess.Popen([sys.executable, '-m', 'cssbench', 'run', '--protocol', PROTOCOL,
                               '--method', method, '--config', str(setup['config']),
                               '--data-root', str(setup['data']), '--epochs', '1',
                               '--results', str(results), '--no-step0-cache'],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for method in ('ft', 'lwf')]
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out
    for method in ('ft', 'lwf'):
        run = json.loads((results / PROTOCOL / method / 'tiny-seed0' / 'run.json').read_text())
        assert run['status'] == 'complete' and run['method'] == method
        assert len(json.loads((results / PROTOCOL / method / 'tiny-seed0' / 'metrics.json')
                              .read_text())['steps']) == 2


def test_deterministic_runs_repeat_bit_for_bit(setup, tmp_path):
    import torch
    kwargs = dict(config=str(setup['config']), data_root=str(setup['data']), epochs=1,
                  deterministic=True, step0_cache=False, log=lambda *a: None)
    try:
        first = run_protocol(PROTOCOL, 'ft', results_root=tmp_path / 'a', **kwargs)
        second = run_protocol(PROTOCOL, 'ft', results_root=tmp_path / 'b', **kwargs)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        a.pop('wall_time_s'), b.pop('wall_time_s')
    assert first == second
    weights = [(root / PROTOCOL / 'ft' / 'tiny-seed0' / 'work' / 'step1' / 'model.pth')
               for root in (tmp_path / 'a', tmp_path / 'b')]
    assert torch.equal(torch.load(weights[0])['classifiers.1.weight'],
                       torch.load(weights[1])['classifiers.1.weight'])
    record = json.loads((tmp_path / 'a' / PROTOCOL / 'ft' / 'tiny-seed0' / 'run.json').read_text())
    assert record['deterministic'] is True and record['seed'] == 0
    assert record['dataset_fingerprint'] and record['environment']['torch'] and record['config']


def test_a_step_stopped_in_its_evaluation_continues_with_any_number_of_processes(
        setup, tmp_path, isolated_cache, capsys):
    """After its last epoch a step trains no more: a rerun under another number of processes
    (torchrun) only evaluates it, to the numbers of the run that was not stopped, and keeps it
    out of the step-0 cache, whose key names the processes that train a step 0."""
    def run() -> list[dict]:
        steps = run_protocol(PROTOCOL, 'ft', config=str(setup['config']),
                             data_root=str(setup['data']), epochs=2, results_root=tmp_path,
                             run_name='r', keep_epoch_checkpoints=True, progress=False,
                             log=lambda *a: None)
        return [{k: v for k, v in s.items() if k != 'wall_time_s'} for s in steps]

    def weights() -> list[dict]:
        return [torch.load(work / f'step{t}' / 'model.pth', weights_only=True) for t in (0, 1)]

    uninterrupted = run()
    run_dir = tmp_path / PROTOCOL / 'ft' / 'r'
    work = run_dir / 'work'
    uninterrupted_weights = weights()

    def stopped_in_step0_evaluation(clock: dict) -> None:
        """As if the processes ``clock`` names had stopped in step 0's evaluation: its last
        epoch's checkpoint written, not yet its weights or metrics."""
        shutil.rmtree(run_dir / 'steps')
        shutil.rmtree(work / 'step1')
        (work / 'step0' / 'model.pth').unlink()
        record = json.loads((run_dir / 'run.json').read_text())
        (run_dir / 'run.json').write_text(json.dumps(dict(record, status='running')))
        (work / 'step0' / 'clock.json').write_text(json.dumps(dict(train_seconds=1.0, **clock)))
        shutil.rmtree(isolated_cache, ignore_errors=True)   # the step 0 cached before
        capsys.readouterr()

    # Two torchrun processes; one under bf16 autocast (a GPU's default: a run continues with
    # other speed settings, here this CPU's fp32), which the key of an fp32 step 0 would
    # have named wrongly; then one in fp32, as this session, whose step 0 is cached.
    for clock, cached in ((dict(processes=2), False), (dict(processes=1, amps=['bfloat16']), False),
                          (dict(processes=1, amps=['bfloat16', 'float32']), False),
                          (dict(processes=1, amps=['float32']), True)):
        stopped_in_step0_evaluation(clock)
        assert run() == uninterrupted
        assert 'step 0 epoch' not in capsys.readouterr().out   # trained nothing
        for ours, theirs in zip(weights(), uninterrupted_weights):
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert len(list(isolated_cache.glob('step0/*/model.pth'))) == cached, clock
