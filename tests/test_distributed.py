"""Several processes on one run (torchrun, DDP), tested on CPU with gloo: two processes train
SDR through two steps, rank 0 alone writes, the metrics are those of the saved model; the
state methods derive from the data is summed over the processes."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cssbench.baselines.sdr import update_prototypes
from cssbench.config import load_config
from cssbench.datasets import IncrementalSegDataset, eval_lut
from cssbench.distributed import decided_by_main, sum_over_processes
from cssbench.engine import per_process_batch
from cssbench.errors import RaisedByMainProcess, RunHeldElsewhere, UserError
from cssbench.methods import get_method
from cssbench.metrics import IncrementalIoUMetric
from cssbench.protocols import load_protocol
from cssbench.runner import build_model, run_protocol
from cssbench.splits import index_dataset, protocol_splits, select
from cssbench.transforms import EvalTransform

CONFIGS = Path(__file__).resolve().parent.parent / 'benchmark' / 'configs'
PROTOCOL = 'synth-15-5-overlap'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def evaluate_alone(weights: Path, config: Path, data: Path, step: int,
                   protocol_name: str = PROTOCOL) -> dict[str, float]:
    """IoU per class of the saved model over the step's whole val set, in this one process."""
    protocol, cfg = load_protocol(protocol_name), load_config(str(config))
    model = build_model(cfg, get_method('sdr').model_type, protocol, step)
    model.load_state_dict(torch.load(weights, weights_only=True))
    index = index_dataset('synth', data, progress=False)
    split = protocol_splits(protocol, index)[step]
    val = IncrementalSegDataset(select(index.samples['val'], split['val']), eval_lut(protocol, step),
                                EvalTransform(cfg.data.crop_size))
    metric = IncrementalIoUMetric(class_ids=list(protocol.classes_seen(step)))
    model.eval()
    for start in range(0, len(val), 8):
        batch = [val[i] for i in range(start, min(start + 8, len(val)))]
        data_batch = {k: torch.stack([item[k] for item in batch]) for k in batch[0]}
        metric.process(data_batch, model.val_step(data_batch))
    return {k.removeprefix('IoU.'): v for k, v in metric.evaluate(len(val)).items() if k != 'mIoU'}


def test_two_processes_train_sdr_and_rank0_writes_the_saved_models_metrics(synth32, tmp_path):
    config = tmp_path / 'tiny.py'
    config.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\n"
                      "data = dict(crop_size=32, batch_size=8, eval_batch_size=8, num_workers=0)\n")
    results = tmp_path / 'results'
    def torchrun(protocol: str, succeeds: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', '--nproc_per_node=2',
               f'--master_port={free_port()}', '-m', 'cssbench', 'run', '--protocol', protocol,
               '--method', 'sdr', '--config', str(config), '--data-root', str(synth32),
               '--epochs', '1', '--results', str(results), '--run-name', 'ddp',
               '--keep-epoch-checkpoints']
        env = dict(os.environ, OMP_NUM_THREADS='1')
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert (proc.returncode == 0) == succeeds, proc.stdout + proc.stderr
        return proc

    proc = torchrun(PROTOCOL)

    run_dir = results / PROTOCOL / 'sdr' / 'ddp'
    run = json.loads((run_dir / 'run.json').read_text())
    assert (run['speed']['world_size'], run['speed']['batch_per_process']) == (2, 4)
    steps = json.loads((run_dir / 'metrics.json').read_text())['steps']
    assert [s['step'] for s in steps] == [0, 1]
    assert json.loads((run_dir / 'run.json').read_text())['status'] == 'complete'
    # Rank 1 prints nothing: each step's table and the run's once.
    assert proc.stdout.count('step 1/1: classes 16-20') == 1
    # One mmengine log per step (rank 0's), and no temporary folder of mmengine's collection.
    assert len(list((run_dir / 'work' / 'step1').glob('*/*.log'))) == 1
    assert not (tmp_path / '.dist_test').exists()
    # The gathered evaluation is the saved model's over the whole val set.
    alone = evaluate_alone(run_dir / 'work' / 'step1' / 'model.pth', config, synth32, 1)
    stored = {c: (float('nan') if v is None else v) for c, v in steps[1]['iou'].items()}
    assert stored.keys() == alone.keys()
    for c in stored:
        assert stored[c] == pytest.approx(alone[c], abs=1e-6, nan_ok=True), c

    # Stopped in step 1's evaluation (its last epoch's checkpoint written, not yet its weights
    # or metrics), the run is finished by one process, which only evaluates that checkpoint:
    # to the same weights and metrics.
    step1 = run_dir / 'work' / 'step1'
    trained = torch.load(step1 / 'model.pth', weights_only=True)
    (step1 / 'model.pth').unlink()
    (run_dir / 'steps' / 'step1.json').unlink()
    (run_dir / 'run.json').write_text(json.dumps(dict(run, status='running')))
    (step1 / 'clock.json').write_text('{"train_seconds": 1.0, "processes": 2}')   # StepClockHook's
    finished = run_protocol(PROTOCOL, 'sdr', config=str(config), data_root=str(synth32), epochs=1,
                            results_root=results, run_name='ddp', progress=False,
                            log=lambda *a: None)
    assert finished[1] == dict(steps[1], wall_time_s=finished[1]['wall_time_s'])
    evaluated = torch.load(step1 / 'model.pth', weights_only=True)
    assert all(torch.equal(evaluated[k], trained[k]) for k in trained)

    # A protocol that scores otherwise takes that step 0 from the step-0 cache, and the two
    # processes evaluate it, untrained, as one process does.
    other = tmp_path / 'unseen-as-background.yaml'
    other.write_text(f'name: unseen-as-background\ndataset: synth\nmode: overlap\n'
                     f'steps: {load_protocol(PROTOCOL).to_dict()["steps"]}\neval_unseen: background\n')
    proc = torchrun(str(other))
    assert 'step 0: evaluating it' in proc.stdout
    step0 = json.loads((results / 'unseen-as-background' / 'sdr' / 'ddp' / 'steps' / 'step0.json').read_text())
    alone = evaluate_alone(run_dir / 'work' / 'step0' / 'model.pth', config, synth32, 0, str(other))
    assert step0['iou'] != steps[0]['iou'] and step0['iou'].keys() == alone.keys()
    for c, v in step0['iou'].items():
        assert (float('nan') if v is None else v) == pytest.approx(alone[c], abs=1e-6, nan_ok=True), c

    # Rank 0 alone says why a run is refused (here: it is complete).
    refused = torchrun(PROTOCOL, succeeds=False)
    assert refused.stderr.count('cssbench: error: ') == 1, refused.stderr
    assert f'{run_dir}: this run is complete' in refused.stderr

    # One process does not take the step 0 that two trained, each on half of every batch.
    alone = run_protocol(PROTOCOL, 'sdr', config=str(config), data_root=str(synth32), epochs=1,
                         results_root=results, run_name='alone', progress=False, log=lambda *a: None)
    assert alone[0]['step0_cache'] is None
    ddp_weights, alone_weights = (torch.load(results / PROTOCOL / 'sdr' / name / 'work' / 'step0' /
                                             'model.pth', weights_only=True) for name in ('ddp', 'alone'))
    assert not all(torch.equal(ddp_weights[k], alone_weights[k]) for k in ddp_weights)


def _descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and those they started, as /proc shows them now."""
    children: dict[int, list[int]] = {}
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            ppid = int(stat.read_text().rsplit(')', 1)[1].split()[1])
        except OSError:   # ended meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, parents = [], [pid]
    while parents:
        started = children.get(parents.pop(), [])
        found += started
        parents += started
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


only_on_linux = pytest.mark.skipif(not sys.platform.startswith('linux'),
                                   reason='a process ends with its parent on Linux only')


@only_on_linux
@pytest.mark.parametrize('processes', [1, 2])
def test_the_processes_of_a_run_end_when_torchrun_is_killed(synth32, tmp_path, processes):
    """torchrun's agent killed with SIGKILL (by a scheduler, the OOM killer) cannot stop its
    workers: they end themselves, their loader workers after them, and the run is left to be
    continued."""
    config = tmp_path / 'tiny.py'
    config.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\n"
                      "data = dict(crop_size=32, batch_size=8, num_workers=1)\n")
    run_dir = tmp_path / 'results' / PROTOCOL / 'ft' / 'killed'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', f'--nproc_per_node={processes}',
           f'--master_port={free_port()}', '-m', 'cssbench', 'run', '--protocol', PROTOCOL,
           '--config', str(config), '--data-root', str(synth32), '--epochs', '50',
           '--results', str(tmp_path / 'results'), '--run-name', 'killed']
    log = tmp_path / 'log'
    with open(log, 'w') as out:
        launcher = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS='1'), cwd=tmp_path,
                                    stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while not (run_dir / 'work' / 'step0' / 'epoch_1.pth').exists():   # mid-way through step 0
        assert launcher.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.05)
    started = _descendants(launcher.pid)
    assert len(started) >= 2 * processes, started   # the workers, a loader worker each
    launcher.kill()
    launcher.wait()
    try:
        deadline = time.time() + 20   # a loader worker notices its worker gone within 5 s
        while any(map(_running, started)) and time.time() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in started if _running(pid)], log.read_text()
    finally:
        for pid in filter(_running, started):
            os.kill(pid, signal.SIGKILL)
    # gone with rank 0: a rerun continues the run. Its lock goes as the kernel closes its files,
    # which may trail /proc's last word on it (once, in CI, the first try found it held)
    deadline = time.time() + 10
    with open(run_dir / '.lock', 'w') as lock:
        while True:
            try:
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.time() < deadline, 'the run stays locked after its processes ended'
                time.sleep(0.1)


@only_on_linux
@pytest.mark.parametrize('torchrun', [True, False])
def test_a_process_of_torchrun_whose_parent_died_before_it_asked_to_end_with_it_ends(torchrun):
    # A process is never its own parent: as if the parent had died (the process been adopted).
    # Only torchrun's processes ask: another launcher may start them from a thread that ends.
    code = ('import os; from cssbench.distributed import start_from_env; '
            'start_from_env(parent=os.getpid()); print("went on")')
    env = {k: v for k, v in os.environ.items() if k not in ('TORCHELASTIC_RUN_ID', 'WORLD_SIZE')}
    if torchrun:
        env['TORCHELASTIC_RUN_ID'] = 'none'   # as torchrun sets it without --rdzv-id
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          env=env)
    assert (proc.returncode, proc.stdout) == ((-signal.SIGTERM, '') if torchrun else (0, 'went on\n'))


def _prototype_update_on_half_batch(rank: int, port: int, features, labels, out) -> None:
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        half = slice(rank * 2, rank * 2 + 2)
        protos, counts = update_prototypes(torch.ones(5, 3), torch.full((5,), 4), features[half],
                                           labels[half], exclude_background=True,
                                           reduce=sum_over_processes)
        out[rank] = (protos, counts)
    finally:
        dist.destroy_process_group()


def test_sdr_prototypes_are_updated_with_the_whole_batch_on_every_process():
    g = torch.Generator().manual_seed(0)
    features = torch.rand(4, 3, 5, 5, generator=g)
    labels = torch.randint(0, 5, (4, 5, 5), generator=g)
    labels[2:][labels[2:] == 3] = 1  # class 3 only in the first process's half
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_prototype_update_on_half_batch, args=(free_port(), features, labels, out), nprocs=2)
        (p0, n0), (p1, n1) = out[0], out[1]
    whole, counts = update_prototypes(torch.ones(5, 3), torch.full((5,), 4), features, labels,
                                      exclude_background=True)
    assert torch.equal(p0, p1) and torch.equal(n0, n1)
    torch.testing.assert_close(p0, whole)
    assert torch.equal(n0, counts) and n0[0] == 4  # background left out


def _plop_batches() -> list[dict]:
    batches = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        classes = [0, 16, 17, 255] if seed % 2 == 0 else [16, 17, 18, 255]  # odd: no background
        labels = torch.tensor(classes)[torch.randint(0, 4, (2, 32, 32), generator=g)]
        batches.append(dict(inputs=torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g),
                            data_samples=labels))
    return batches


def _plop_thresholds_on_half_the_batches(rank: int, port: int, out) -> None:
    from conftest import method_model
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        out[rank] = method_model('plop', 1).eval().compute_thresholds(_plop_batches()[rank::2])
    finally:
        dist.destroy_process_group()


def test_plop_thresholds_are_taken_from_every_processs_share_of_the_data():
    """Under DDP each process labels its share of the step's data; the entropy histograms are
    summed over the processes, so both take the thresholds of the whole data (those one
    process computes from every batch), not those of their own half: rank 1's half has no
    background pixel, and alone would give the base threshold to every class."""
    from conftest import method_model
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_plop_thresholds_on_half_the_batches, args=(free_port(), out), nprocs=2)
        t0, t1 = out[0], out[1]
    whole = method_model('plop', 1).eval().compute_thresholds(_plop_batches())
    # rank 1's half holds no background pixel: alone, it would keep every base threshold
    half = method_model('plop', 1).eval().compute_thresholds(_plop_batches()[1::2])
    assert torch.equal(half, torch.full((21,), 0.001)) and not torch.equal(whole, half)
    torch.testing.assert_close(t0, whole, equal_nan=True)
    torch.testing.assert_close(t1, whole, equal_nan=True)


def _decide_on_main(rank: int, port: int, out) -> None:
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    try:
        out[rank, 'value'] = decided_by_main(lambda: f'rank {dist.get_rank()}')()
        for error in (UserError('bad input'), RunHeldElsewhere('held'), FileNotFoundError(2, 'gone'),
                      ValueError('a bug')):
            def fail(error=error):
                raise error
            try:
                decided_by_main(fail)()
            except Exception as e:
                out[rank, type(error).__name__] = (
                    [kind.__name__ for kind in (UserError, RunHeldElsewhere, OSError, RuntimeError,
                                                ValueError, RaisedByMainProcess) if isinstance(e, kind)],
                    str(e))
    finally:
        dist.destroy_process_group()


def test_a_decision_of_rank_0_reaches_every_process_and_so_do_its_errors():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_decide_on_main, args=(free_port(), out), nprocs=2)
        out = dict(out)
    assert out[0, 'value'] == out[1, 'value'] == 'rank 0'
    # rank 0 raises its own error; the other process the same kind, with the same message,
    # marked as rank 0's (the CLI prints it once, on rank 0)
    assert out[0, 'UserError'] == (['UserError'], 'bad input')
    assert out[1, 'UserError'] == (['UserError', 'RaisedByMainProcess'], 'bad input')
    # a run held by another cssbench process: every process leaves it (a command of several runs)
    assert out[0, 'RunHeldElsewhere'] == (['UserError', 'RunHeldElsewhere'], 'held')
    assert out[1, 'RunHeldElsewhere'] == (['UserError', 'RunHeldElsewhere', 'RaisedByMainProcess'], 'held')
    assert out[0, 'FileNotFoundError'] == (['OSError'], '[Errno 2] gone')
    assert out[1, 'FileNotFoundError'] == (['OSError', 'RaisedByMainProcess'], '[Errno 2] gone')
    assert out[0, 'ValueError'] == (['ValueError'], 'a bug')
    assert out[1, 'ValueError'] == (['RuntimeError', 'RaisedByMainProcess'], 'a bug')


def test_a_batch_that_does_not_split_over_the_processes_is_refused(monkeypatch):
    assert per_process_batch(24, 4) == 6
    with pytest.raises(UserError, match='batch size 24 does not split evenly over 5 processes'):
        per_process_batch(24, 5)
    # one image a process: BN (the head's pooled branch) cannot train on it unless synchronised
    assert per_process_batch(4, 2) == 2
    with pytest.raises(UserError, match=r'batch size 2 over 2 processes leaves each 1 image, and '
                                        r'on the CPU .* set data.batch_size to 4 or more'):
        per_process_batch(2, 2)
    monkeypatch.setattr('cssbench.engine.training_device', lambda: 'cuda')   # SyncBN
    assert per_process_batch(2, 2) == 1
