"""End to end: the runner trains through a protocol's steps, stores its results, and forgets.

These run the real mmengine training loop on CPU, on small synthetic datasets at 32 px.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from cssbench import step0
from cssbench.cli import main
from cssbench.config import load_config
from cssbench.datasets import IncrementalSegDataset, eval_lut
from cssbench.errors import UserError
from cssbench.io import file_sha256
from cssbench.methods import get_method
from cssbench.metrics import confusion_matrix, iou_per_class, range_label
from cssbench.protocols import load_protocol
from cssbench.runner import WORK_MARKER, build_model, method_settings, run_protocol
from cssbench.splits import index_dataset, protocol_splits, select
from cssbench.store import open_store, training_regime
from cssbench.synth import make_synth
from cssbench.transforms import EvalTransform
from conftest import (SMALL_DIGEST, join_val_images_in_pairs, locked_by_another_process,
                      mount_read_only, stop_run_in_step, unregister_methods)

CONFIGS = Path(__file__).resolve().parent.parent / 'benchmark' / 'configs'


@pytest.fixture(scope='module')
def synth64(tmp_path_factory) -> Path:
    return make_synth(tmp_path_factory.mktemp('synth') / 'data', n_train=800, n_val=100, size=64,
                      seed=4, progress=False)


def test_a_cpu_test_keeps_mmengine_on_the_cpu():
    """On a GPU machine too (conftest): mmengine chose its device when imported, and its
    Runner would move the model there, out of the bit-for-bit checks' reach."""
    from mmengine.device import get_device
    assert (torch.cuda.is_available(), get_device()) == (False, 'cpu')


def test_the_git_revision_is_marked_where_the_code_differs_from_the_commit(tmp_path, monkeypatch):
    from cssbench import runner
    repo = tmp_path / 'repo'
    for folder in ('baselines', 'benchmark', 'vendor/cssbench/benchmark'):
        (repo / folder).mkdir(parents=True)
    (repo / 'baselines' / 'ft.py').write_text('x = 1\n')
    for code in ('benchmark', 'vendor/cssbench/benchmark'):
        (repo / code / 'runner.py').write_text('# cssbench\n')
    git = ['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t']
    for args in (['init', '-q'], ['add', '.'], ['commit', '-q', '-m', 'c']):
        subprocess.run(git + args, check=True)
    head = subprocess.run(git + ['rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(runner, 'REPO_ROOT', repo)
    assert runner.git_revision() == head
    (repo / 'results').mkdir()   # outside the code: results, caches
    (repo / 'results' / 'run.json').write_text('{}')
    assert runner.git_revision() == head
    (repo / 'baselines' / 'anchor.py').write_text('y = 2\n')   # a method file not committed
    assert runner.git_revision() == head + '+dirty'
    (repo / 'baselines' / 'anchor.py').unlink()
    (repo / 'baselines' / 'ft.py').write_text('x = 2\n')       # a change to a committed one
    assert runner.git_revision() == head + '+dirty'
    monkeypatch.setattr(runner, 'REPO_ROOT', tmp_path / 'elsewhere')   # no checkout
    (tmp_path / 'elsewhere').mkdir()
    assert runner.git_revision() == 'unknown'
    # installed from a wheel into a venv inside another project's checkout: not its commit
    site = repo / '.venv' / 'lib' / 'site-packages'
    (site / 'cssbench').mkdir(parents=True)
    (site / 'cssbench' / 'runner.py').write_text('# cssbench\n')
    monkeypatch.setattr(runner, 'REPO_ROOT', site)
    assert runner.git_revision() == 'unknown'
    # a copy committed inside another project: that project's commit holds this code
    monkeypatch.setattr(runner, 'REPO_ROOT', repo / 'vendor' / 'cssbench')
    assert runner.git_revision() == head


def test_runs_record_the_revision_their_process_started_at_not_one_committed_since(
        tmp_path, monkeypatch):
    # A command of several runs (--method all, --seeds) goes on for hours on the code it
    # imported; a commit made meanwhile is not what its later runs ran.
    import functools
    from cssbench import runner
    repo = tmp_path / 'repo'
    (repo / 'benchmark').mkdir(parents=True)
    (repo / 'benchmark' / 'runner.py').write_text('# cssbench\n')
    git = ['git', '-C', str(repo), '-c', 'user.name=t', '-c', 'user.email=t@t']
    commit = lambda: subprocess.run(git + ['commit', '-q', '-am', 'c'], check=True)
    for args in (['init', '-q'], ['add', '.']):
        subprocess.run(git + args, check=True)
    commit()
    monkeypatch.setattr(runner, 'REPO_ROOT', repo)
    # a cache of this test's own: the suite's process keeps its real one
    monkeypatch.setattr(runner, 'revision_of_this_process',
                        functools.cache(runner.revision_of_this_process.__wrapped__))
    started_at = runner.revision_of_this_process()
    (repo / 'benchmark' / 'runner.py').write_text('# cssbench, changed\n')
    commit()
    assert runner.git_revision() != started_at
    assert runner.revision_of_this_process() == started_at


def test_two_step_run_writes_results_and_refuses_to_overwrite(synth32, config32, tmp_path, capsys):
    results = tmp_path / 'results'
    kwargs = dict(config=str(config32), data_root=str(synth32), epochs=1, results_root=results,
                  run_name='r', log=lambda *a: None)
    steps = run_protocol('synth-15-5-overlap', 'ft', **kwargs)

    assert [s['step'] for s in steps] == [0, 1]
    assert steps[0]['classes'] == list(range(16)) and steps[1]['classes'] == [16, 17, 18, 19, 20]
    assert [steps[1]['columns'][k]['label'] for k in ('old', 'new', 'all')] == ['0-15', '16-20', 'all']
    assert set(steps[0]['iou']) == {str(c) for c in range(16)}
    assert set(steps[1]['iou']) == {str(c) for c in range(21)}
    assert all(0.0 <= v <= 1.0 for v in steps[1]['iou'].values() if v is not None)

    run_dir = results / 'synth-15-5-overlap' / 'ft' / 'r'
    record = json.loads((run_dir / 'run.json').read_text())
    assert record['status'] == 'complete' and record['seed'] == 0
    assert record['protocol']['steps'][1] == [16, 17, 18, 19, 20]
    assert record['environment']['torch']
    assert record['speed']['world_size'] == 1 and record['speed']['batch_per_process'] == 16
    stored = json.loads((run_dir / 'metrics.json').read_text())['steps']
    assert stored == json.loads(json.dumps(steps))
    csv_lines = (run_dir / 'metrics.csv').read_text().splitlines()
    assert csv_lines[0].startswith('step,num_train,num_val,old_classes,old_mIoU')
    assert len(csv_lines) == 3
    for t in (0, 1):   # the weights, and mmengine's logs (no copy of an empty config)
        files = {p.suffix for p in (run_dir / 'work' / f'step{t}').rglob('*') if p.is_file()}
        assert (run_dir / 'work' / f'step{t}' / 'model.pth').is_file() and '.py' not in files
        # mmengine's log keeps its iterations' lines (the console's level, WARNING, left them
        # out: it held the parameters' dump alone); the console shows none of them
        [log] = (run_dir / 'work' / f'step{t}').glob('*/*.log')
        trained = [line for line in log.read_text().splitlines() if 'Epoch(train)' in line]
        n = steps[t]['num_train'] // 16
        assert trained and trained[-1].split(' - mmengine - INFO - Epoch(train) [1]')[1].startswith(
            f'[{n}/{n}]') and ' loss: ' in trained[-1]
        assert any('Epoch(val) [1]' in line for line in log.read_text().splitlines())
    printed = capsys.readouterr()
    assert 'mmengine' not in printed.out + printed.err and 'Epoch(train)' not in printed.out
    assert 'step 1 epoch 1/1 iter' in printed.out
    # The learning rate: lr[0] at step 0, lr[1] later, decayed as the reference's poly schedule,
    # lr (1 - k/N)^0.9 at iteration k of N (per mmengine's log of the iterations it logged).
    for t, lr in ((0, 0.05), (1, 0.005)):
        [scalars] = (run_dir / 'work' / f'step{t}').glob('*/vis_data/scalars.json')
        logged = [r for line in scalars.read_text().splitlines() if 'lr' in (r := json.loads(line))]
        n = steps[t]['num_train'] // 16       # config32: batch 16, whole batches, 1 epoch
        assert [r['iter'] for r in logged][-1] == n
        for r in logged:
            assert r['lr'] == pytest.approx(lr * (1 - (r['iter'] - 1) / n) ** 0.9, rel=1e-6), (t, r)
    index = json.loads((results / 'index.json').read_text())   # brought up to date by the run
    assert index['runs']['synth-15-5-overlap/ft/r']['run']['steps'] == stored
    assert index['runs']['synth-15-5-overlap/ft/r']['run']['regime'] == 'cpu float32'

    with pytest.raises(UserError, match='complete'):
        run_protocol('synth-15-5-overlap', 'ft', **kwargs)

    assert main(['table', '--protocol', 'synth-15-5-overlap', '--results', str(results)]) == 0
    out = capsys.readouterr().out
    assert 'ft' in out and '0-15' in out and '16-20' in out

    metrics = run_dir / 'metrics.json'   # damaged since: named, not called complete
    metrics.write_text(metrics.read_text()[:40])
    with pytest.raises(UserError, match=f'{metrics}: cannot read it .*--overwrite the run'):
        run_protocol('synth-15-5-overlap', 'ft', **kwargs)


def test_run_json_names_the_class_that_trained_the_run_and_its_config_keeps_its_digest(
        synth32, tmp_path, monkeypatch):
    """run.json's config is the file's, whose model.type (the base segmentor) the digest
    hashes: stored runs of it continue. ``model_type`` names the class the method built."""
    import cssbench.runner as runner

    def stop_before_training(*args, **kwargs):
        raise RuntimeError('stopped before training')
    monkeypatch.setattr(runner, 'run_step', stop_before_training)
    results = tmp_path / 'results'
    for method, model_type in (('ft', 'cssbench.FineTuning'), ('sdr+mib', 'cssbench.SDRMiB')):
        with pytest.raises(RuntimeError, match='stopped before training'):
            run_protocol('synth-15-5-overlap', method, config='small', data_root=str(synth32),
                         results_root=results, log=lambda *a: None)
        record = json.loads((results / 'synth-15-5-overlap' / method / 'small-seed0' /
                             'run.json').read_text())
        assert record['model_type'] == model_type
        assert record['config']['model']['type'] == 'cssbench.IncrementalSegmentor'
        assert record['config_digest'] == SMALL_DIGEST


def test_whole_image_evaluation_scores_every_pixel_of_images_of_any_size(synth32, config32,
                                                                          tmp_path, capsys):
    data = tmp_path / 'data'
    shutil.copytree(synth32, data)
    join_val_images_in_pairs(data)   # synth32 is the VOC2012 folder
    protocol_file = tmp_path / 'whole.yaml'
    protocol_file.write_text('name: whole\ndataset: synth\nmode: overlap\nsteps: ["0-15", "16-20"]\n'
                             'eval_crop: whole\n')
    results = tmp_path / 'results'
    # config32 evaluates 64 images a batch: images of two sizes would not stack
    steps = run_protocol(str(protocol_file), 'ft', config=str(config32), data_root=str(data),
                         epochs=1, results_root=results, run_name='r', log=lambda *a: None)
    run_dir = results / 'whole' / 'ft' / 'r'
    assert json.loads((run_dir / 'run.json').read_text())['protocol']['eval_crop'] == 'whole'

    # The stored IoU is the step-1 model's over the whole images, not over their central
    # squares (evaluated here as the run evaluates, on the CPU in fp32).
    protocol, cfg = load_protocol(str(protocol_file)), load_config(str(config32))
    model = build_model(cfg, get_method('ft').model_type, protocol, 1)
    model.load_state_dict(torch.load(run_dir / 'work' / 'step1' / 'model.pth'))
    model.eval()
    index = index_dataset('synth', data, progress=False)
    val = select(index.samples['val'], protocol_splits(protocol, index)[1]['val'])
    assert {tuple(s['data_samples'].shape) for s in IncrementalSegDataset(val, eval_lut(protocol, 1))} \
        == {(32, 64), (64, 32)}

    def iou_scoring(transform) -> np.ndarray:
        dataset = IncrementalSegDataset(val, eval_lut(protocol, 1), transform)
        cm = sum(confusion_matrix(out['pred'], out['gt'], 21)
                 for item in dataset for out in model.val_step(default_collate([item])))
        return iou_per_class(cm.cpu().numpy())

    stored = np.array([np.nan if v is None else v for v in steps[1]['iou'].values()])
    assert list(steps[1]['iou']) == [str(c) for c in range(21)]
    np.testing.assert_allclose(stored, iou_scoring(EvalTransform(None)), rtol=1e-9)
    assert not np.allclose(stored, iou_scoring(EvalTransform(32)), equal_nan=True)

    assert main(['table', '--protocol', 'whole', '--results', str(results)]) == 0
    assert 'evaluation scores whole images at their own resolution' in capsys.readouterr().out


def test_seeds_of_a_random_class_order_are_run_and_aggregated(synth32, config32, tmp_path, capsys):
    protocol = tmp_path / 'rand.yaml'
    protocol.write_text('name: rand\ndataset: synth\nmode: overlap\nclass_order: random\n'
                        'steps: ["0-15", "16-20"]\n')
    results = tmp_path / 'results'
    assert main(['run', '--protocol', str(protocol), '--seeds', '0,1', '--config', str(config32),
                 '--data-root', str(synth32), '--epochs', '1', '--results', str(results)]) == 0
    log = capsys.readouterr().out
    orders = []
    for seed in (0, 1):
        record = json.loads((results / 'rand' / 'ft' / f'small32-seed{seed}' / 'run.json').read_text())
        drawn = load_protocol(str(protocol)).with_class_order(seed)
        assert record['seed'] == seed and record['protocol'] == drawn.to_dict()
        steps = json.loads((results / 'rand' / 'ft' / f'small32-seed{seed}' / 'metrics.json').read_text())['steps']
        assert steps[1]['classes'] == list(drawn.steps[1])
        # the log names each step's run (its seed) and classes, drawn ones too: e.g.
        # 'classes 0-3,5-9,11-14,16,19', and each run's table its run
        for t, classes in enumerate(drawn.steps):
            assert f'[rand/ft/small32-seed{seed}] step {t}/1: classes {range_label(classes)}, ' in log
        # after step 0 and at the run's end (step_tables_of_the_output)
        assert log.count(f'rand / ft / small32-seed{seed} (mIoU %)') == 2
        orders.append(drawn.steps)
    assert orders[0] != orders[1]
    assert main(['table', '--protocol', 'rand', '--results', str(results)]) == 0
    out = capsys.readouterr().out
    # two class orders: the old/new columns cover different classes, so they are named so
    assert '| method | seeds | old | new | all |' in out and '| ft | 2 |' in out
    for seeds, says in [('0,x', 'comma-separated non-negative integers'),
                        ('0,-1', 'comma-separated non-negative integers'),
                        ('1,1', 'distinct non-negative integers'), (',', 'distinct')]:
        with pytest.raises(SystemExit) as stopped:   # argparse's usage error
            main(['run', '--protocol', str(protocol), '--seeds', seeds])
        assert stopped.value.code == 2
        assert f"argument --seeds: expected {says}" in capsys.readouterr().err
    # --seed with --seeds is refused whatever its value; 0, its default, passed unnoticed
    for seed in ('0', '1'):
        with pytest.raises(SystemExit) as stopped:
            main(['run', '--protocol', str(protocol), '--seed', seed, '--seeds', '1,2'])
        assert stopped.value.code == 2
        assert 'argument --seeds: not allowed with argument --seed' in capsys.readouterr().err


def test_finished_steps_are_reused_not_retrained(synth32, config32, tmp_path):
    results = tmp_path / 'results'
    kwargs = dict(config=str(config32), data_root=str(synth32), epochs=1, results_root=results,
                  run_name='r', log=lambda *a: None)
    first = run_protocol('synth-15-5-overlap', 'ft', **kwargs)
    run_dir = results / 'synth-15-5-overlap' / 'ft' / 'r'
    # Simulate a run that died after step 0, started on four GPUs: step 1's outputs gone,
    # run not complete.
    (run_dir / 'steps' / 'step1.json').unlink()
    first_record = json.loads((run_dir / 'run.json').read_text())
    four_gpus = dict(first_record['speed'], device='cuda', amp='bfloat16', world_size=4,
                     batch_per_process=4, sync_bn=True)
    (run_dir / 'run.json').write_text(json.dumps(dict(first_record, status='running',
                                                      started='2026-01-02T03:04:05',
                                                      speed=four_gpus, speed_history=[four_gpus])))
    weights0 = (run_dir / 'work' / 'step0' / 'model.pth').stat().st_mtime_ns
    weights0_bytes = (run_dir / 'work' / 'step0' / 'model.pth').read_bytes()
    # step 1 had trained 1000 s in the sessions before (StepClockHook's record)
    (run_dir / 'work' / 'step1' / 'clock.json').write_text('{"train_seconds": 1000.0}')

    messages = []
    second = run_protocol('synth-15-5-overlap', 'ft', **dict(kwargs, log=messages.append))
    assert 1000 < second[1]['wall_time_s'] < 1000 + 600
    assert not (run_dir / 'work' / 'step1' / 'clock.json').exists()   # the step is done
    assert any('step 0: done before' in m for m in messages)
    assert (run_dir / 'work' / 'step0' / 'model.pth').stat().st_mtime_ns == weights0
    assert second[0] == first[0]
    record = json.loads((run_dir / 'run.json').read_text())
    assert record['status'] == 'complete'
    # when it started (kept), and when it went on
    assert record['started'] == '2026-01-02T03:04:05' and len(record['continued']) == 1
    # how each session trained: the tables name both
    assert record['speed_history'] == [four_gpus, first_record['speed']]
    assert open_store(results).runs[0].regime == \
        f'cuda bfloat16, 4 processes of batch 4, SyncBN, then {training_regime(first_record["speed"])}'
    assert record['wall_time_s'] == round(sum(s['wall_time_s'] for s in second), 1)

    # A finished step's metrics without its weights: another work dir, or weights deleted. Not
    # trained again (its metrics would be overwritten): refused, naming what is missing.
    (run_dir / 'steps' / 'step1.json').unlink()
    (run_dir / 'run.json').write_text(json.dumps(dict(record, status='running')))
    (run_dir / 'work' / 'step0' / 'model.pth').unlink()
    step0, stored = ((run_dir / name).read_bytes() for name in ('steps/step0.json', 'run.json'))
    with pytest.raises(UserError, match=r'step0.json: step 0 is done, but its weights are not in '):
        run_protocol('synth-15-5-overlap', 'ft', **kwargs)
    assert (run_dir / 'steps' / 'step0.json').read_bytes() == step0
    assert (run_dir / 'run.json').read_bytes() == stored   # refused before this session began
    (run_dir / 'work' / 'step0' / 'model.pth').write_bytes(b'damaged')
    with pytest.raises(UserError, match=r'step0/model.pth: cannot read these weights \('):
        run_protocol('synth-15-5-overlap', 'ft', **kwargs)
    # A run continued otherwise than it started is refused too: another config, or determinism.
    with pytest.raises(UserError, match='a run with another config .* is stored there'):
        run_protocol('synth-15-5-overlap', 'ft', **dict(kwargs, epochs=2))
    with pytest.raises(UserError, match='this run was started without --deterministic'):
        run_protocol('synth-15-5-overlap', 'ft', **dict(kwargs, deterministic=True))
    from cssbench.synth import make_synth   # its steps would mix two datasets
    other = make_synth(tmp_path / 'other', n_train=120, n_val=30, size=32, seed=4, progress=False)
    stored = (run_dir / 'run.json').read_bytes()
    with pytest.raises(UserError, match=rf'this run was started on other data \({synth32}, '
                                        rf'fingerprint \w+\) than {other} \(fingerprint \w+\)'):
        run_protocol('synth-15-5-overlap', 'ft', **dict(kwargs, data_root=str(other)))
    assert (run_dir / 'run.json').read_bytes() == stored
    # Started before the fingerprint counted the files' bytes: its data is known by its label
    # sets alone, and continues; another dataset's label sets do not.
    from cssbench.splits import index_dataset
    (run_dir / 'work' / 'step0' / 'model.pth').write_bytes(weights0_bytes)
    for data, continues in ((other, False), (synth32, True)):
        legacy = index_dataset('synth', data, progress=False).label_set_fingerprint
        (run_dir / 'run.json').write_text(json.dumps(dict(record, status='running',
                                                          dataset_fingerprint=legacy)))
        if continues:
            assert len(run_protocol('synth-15-5-overlap', 'ft', **kwargs)) == 2
            record = json.loads((run_dir / 'run.json').read_text())
            assert record['dataset_fingerprint'] == index_dataset('synth', synth32).fingerprint
        else:
            with pytest.raises(UserError, match=f'fingerprint {legacy}'):
                run_protocol('synth-15-5-overlap', 'ft', **kwargs)


def test_a_run_continues_with_other_loader_workers_and_from_a_digest_of_the_older_rule(
        synth32, config32, tmp_path):
    results = tmp_path / 'results'
    kwargs = dict(config=str(config32), data_root=str(synth32), epochs=1, results_root=results,
                  run_name='r', log=lambda *a: None)
    first = run_protocol('synth-15-5-overlap', 'ft', **kwargs)
    run_dir = results / 'synth-15-5-overlap' / 'ft' / 'r'
    marker = run_dir / 'work' / WORK_MARKER
    complete = json.loads((run_dir / 'run.json').read_text())
    digest = complete['config_digest']

    def stopped_after_step0(recorded_digest: str) -> None:
        (run_dir / 'steps' / 'step1.json').unlink()
        (run_dir / 'run.json').write_text(json.dumps(dict(complete, status='running',
                                                          config_digest=recorded_digest)))
        marker.write_text(json.dumps(dict(json.loads(marker.read_text()),
                                          config_digest=recorded_digest)))

    # other loader workers and evaluation batch: the same run
    faster = tmp_path / 'faster.py'
    faster.write_text(f"_base_ = ['{config32}']\ndata = dict(num_workers=1, eval_batch_size=3)\n")
    stopped_after_step0(digest)
    again = run_protocol('synth-15-5-overlap', 'ft', **dict(kwargs, config=str(faster)))
    assert [s['iou'] for s in again] == [s['iou'] for s in first]   # the same numbers, too
    # Stored by code whose digest counted them: continued, its record and marker brought to
    # today's digest, and tabled as its config's.
    sections = {k: v for k, v in complete['config'].items() if k != 'speed'}
    older_rule = hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:16]
    assert older_rule != digest
    stopped_after_step0(older_rule)
    assert len(run_protocol('synth-15-5-overlap', 'ft', **kwargs)) == 2
    assert json.loads((run_dir / 'run.json').read_text())['config_digest'] == digest
    assert json.loads(marker.read_text())['config_digest'] == digest
    (run_dir / 'run.json').write_text(json.dumps(dict(complete, config_digest=older_rule)))
    assert [r.config_digest for r in open_store(results).runs] == [digest]
    # a marker of another config is still refused, whatever rule its digest is by
    stopped_after_step0(older_rule)
    marker.write_text(json.dumps(dict(json.loads(marker.read_text()), config_digest='0' * 16)))
    with pytest.raises(UserError, match='holds checkpoints of this run with another config_digest'):
        run_protocol('synth-15-5-overlap', 'ft', **kwargs)


def test_a_run_records_its_data_folder_absolute_however_it_was_given(synth32, config32, tmp_path,
                                                                     monkeypatch):
    results = tmp_path / 'results'
    kwargs = dict(config=str(config32), epochs=1, results_root=results, run_name='r',
                  log=lambda *a: None)
    monkeypatch.chdir(synth32.parent)                  # .../VOCdevkit
    run_protocol('synth-15-5-overlap', 'ft', data_root='VOC2012', **kwargs)
    run_dir = results / 'synth-15-5-overlap' / 'ft' / 'r'
    record = json.loads((run_dir / 'run.json').read_text())
    assert record['data_root'] == str(synth32.resolve())
    # continued elsewhere, on other data given relative too: both folders named in full
    make_synth(tmp_path / 'other', n_train=120, n_val=30, size=32, seed=4, progress=False)
    stop_run_in_step(run_dir, run_dir / 'work', 1)
    monkeypatch.chdir(tmp_path)
    started_on, given = (re.escape(str(path.resolve())) for path in (synth32, tmp_path / 'other'))
    with pytest.raises(UserError, match=rf'this run was started on other data \({started_on}, '
                                        rf'fingerprint \w+\) than {given} \(fingerprint'):
        run_protocol('synth-15-5-overlap', 'ft', data_root='other', **kwargs)
    # a record written before, relative, still reads
    (run_dir / 'run.json').write_text(json.dumps(dict(record, status='running', data_root='VOC2012')))
    with pytest.raises(UserError, match=r'this run was started on other data \(VOC2012, fingerprint'):
        run_protocol('synth-15-5-overlap', 'ft', data_root='other', **kwargs)
    # the same folder, whose data changed since (another fingerprint recorded): said so
    (run_dir / 'run.json').write_text(json.dumps(dict(record, status='running',
                                                      dataset_fingerprint='0' * 16)))
    fingerprint = index_dataset('synth', synth32, progress=False).fingerprint
    with pytest.raises(UserError) as refused:
        run_protocol('synth-15-5-overlap', 'ft', data_root=str(synth32), **kwargs)
    assert str(refused.value) == (
        f'{run_dir}: the data in {synth32.resolve()} changed since this run started on it '
        f'(fingerprint {"0" * 16}, now {fingerprint}: an image or mask, a list, or the mask folder '
        f'read); continue it on the data it started on, or --overwrite it')


def step_tables_of_the_output(out: str, header: str) -> list[list[str]]:
    """The steps each table of a run printed in ``out`` lists, in print order: a table is
    its header, a line of column names, one of the index's name, then a row per step."""
    tables = out.split(header + '\n')[1:]
    return [[row.split()[0] for row in itertools.takewhile(lambda line: line[:1].isdigit(),
                                                          table.splitlines()[2:])]
            for table in tables]


def test_a_run_prints_each_step_table_as_it_ends_and_the_last_step_only_in_its_own(
        synth32, config32, tmp_path, capsys):
    run = ['run', '--protocol', 'synth-15-5-overlap', '--config', str(config32),
           '--data-root', str(synth32), '--epochs', '1', '--results', str(tmp_path / 'results')]
    header = 'synth-15-5-overlap / ft / small32-seed0 (mIoU %)'
    assert main(run) == 0
    # step 0's as it ends; the run's, whose last row is step 1's, with nothing of step 1's before
    assert step_tables_of_the_output(capsys.readouterr().out, header) == [['0'], ['0', '1']]
    # continued after step 0: step 0 reused, step 1 trained; the run's table holds both
    run_dir = tmp_path / 'results' / 'synth-15-5-overlap' / 'ft' / 'small32-seed0'
    stop_run_in_step(run_dir, run_dir / 'work', 1)
    assert main(run) == 0
    assert step_tables_of_the_output(capsys.readouterr().out, header) == [['0', '1']]


def test_a_copied_run_folder_continues_in_its_own_work_dir(synth32, config32, tmp_path):
    """The work dir run.json names, the original's, still holds its checkpoints, but its marker
    names the original run folder: the copy continues in its own default work dir (a moved
    run folder leaves no work dir behind)."""
    kwargs = dict(config=str(config32), data_root=str(synth32), epochs=1, run_name='r',
                  keep_epoch_checkpoints=True, step0_cache=False)
    run_protocol('synth-15-5-overlap', 'ft', results_root=tmp_path / 'results',
                 log=lambda *a: None, **kwargs)
    original, copy = (tmp_path / root / 'synth-15-5-overlap' / 'ft' / 'r'
                      for root in ('results', 'copy'))
    stop_run_in_step(original, original / 'work', 1)
    shutil.copytree(tmp_path / 'results', tmp_path / 'copy')
    stored = (original / 'run.json').read_bytes()
    messages = []
    assert len(run_protocol('synth-15-5-overlap', 'ft', results_root=tmp_path / 'copy',
                            log=messages.append, **kwargs)) == 2
    assert any('step 0: done before' in m for m in messages)
    run = json.loads((copy / 'run.json').read_text())
    assert (run['status'], run['work_dir']) == ('complete', str((copy / 'work').resolve()))
    assert (original / 'run.json').read_bytes() == stored


def test_a_command_of_several_runs_keeps_the_finished_ones_and_trains_the_rest(
        synth32, config32, tmp_path, capsys):
    results = tmp_path / 'results'
    run = ['run', '--protocol', 'synth-15-5-overlap', '--config', str(config32),
           '--data-root', str(synth32), '--epochs', '1', '--results', str(results)]
    assert main([*run, '--method', 'ft']) == 0
    ft_record = results / 'synth-15-5-overlap' / 'ft' / 'small32-seed0' / 'run.json'
    written = ft_record.stat().st_mtime_ns
    capsys.readouterr()

    assert main([*run, '--method', 'ft,joint', '--resume']) == 0
    out = capsys.readouterr().out
    assert f'{ft_record.parent}: complete, kept (--overwrite trains it again)' in out
    # each run's table once: ft's kept one, and joint's (one step: no separate step table)
    assert out.count('synth-15-5-overlap / ft / small32-seed0 (mIoU %)') == 1
    assert out.count('synth-15-5-overlap / joint / small32-seed0 (mIoU %)') == 1
    assert ft_record.stat().st_mtime_ns == written
    joint = json.loads((results / 'synth-15-5-overlap' / 'joint' / 'small32-seed0' / 'run.json').read_text())
    assert joint['status'] == 'complete'
    # joint's one step is reported in the protocol's last-step columns, its new classes scored
    [step] = json.loads((results / 'synth-15-5-overlap' / 'joint' / 'small32-seed0' / 'metrics.json')
                        .read_text())['steps']
    assert [step['columns'][k]['label'] for k in ('old', 'new', 'all')] == ['0-15', '16-20', 'all']
    assert all(step['columns'][k]['mIoU'] is not None for k in ('old', 'new', 'all'))

    # One run: a finished one is refused, as before; several never started: nothing to resume.
    assert main([*run, '--method', 'ft']) == 2
    assert (f'this run is complete; `cssbench table --protocol synth-15-5-overlap --results '
            f'{results}` shows it' in capsys.readouterr().err)
    assert main(['table', '--protocol', 'synth-15-5-overlap', '--results', str(results)]) == 0
    capsys.readouterr()
    assert main([*run, '--method', 'ft,joint', '--resume', '--results', str(tmp_path / 'none')]) == 2
    assert 'none of these runs is stored; no run to resume' in capsys.readouterr().err
    assert main([*run, '--method', 'ft,joint', '--work-dir', str(tmp_path / 'w')]) == 2
    assert '--work-dir holds the checkpoints of one run' in capsys.readouterr().err
    assert not (tmp_path / 'w').exists()

    # One of several refused with advice to --overwrite it: given to this command, --overwrite
    # would train the other, complete, run again too; the advice names the run's own command,
    # which does what it says.
    assert main([*run, '--method', 'ft,joint', '--epochs', '2']) == 2
    err = capsys.readouterr().err
    alone = (f'cssbench run --protocol=synth-15-5-overlap --method=ft --seed=0 --config={config32} '
             f'--data-root={synth32} --epochs=2 --results={results}')
    assert err == (
        f'cssbench: error: {ft_record.parent}: a run with another config ({config32}, as it was '
        f'then: schedule.epochs was 1, now 2) is stored there; give --run-name to keep both, or '
        f'--overwrite to replace it '
        f'(with several runs, --overwrite would train every one again and --work-dir is refused: '
        f'give what this advises to the command of this run alone, {alone})\n')
    assert main([*run, '--method', 'ft', '--epochs', '2']) == 2   # one run: the advice as it is
    assert capsys.readouterr().err.endswith('give --run-name to keep both, or --overwrite to replace it\n')
    assert ft_record.stat().st_mtime_ns == written
    joint_record = results / 'synth-15-5-overlap' / 'joint' / 'small32-seed0' / 'run.json'
    joint_written = joint_record.stat().st_mtime_ns
    assert main([*shlex.split(alone)[1:], '--overwrite']) == 0
    assert json.loads(ft_record.read_text())['config']['schedule']['epochs'] == 2
    assert joint_record.stat().st_mtime_ns == joint_written


def test_a_command_of_several_runs_leaves_the_runs_other_processes_run_to_them(
        synth32, config32, tmp_path, capsys):
    """Two terminals given the same methods share the work: a run whose folder (ft) or work dir
    (joint) another cssbench process holds is left to it, the others train, the leaderboard is
    printed, and the exit status says that it may lack the runs left."""
    results = tmp_path / 'results'
    runs = results / 'synth-15-5-overlap'
    ft, lwf, joint = (runs / method / 'small32-seed0' for method in ('ft', 'lwf', 'joint'))
    with locked_by_another_process(ft), locked_by_another_process(joint / 'work'):
        status = main(['run', '--protocol', 'synth-15-5-overlap', '--method', 'ft,lwf,joint',
                       '--config', str(config32), '--data-root', str(synth32), '--epochs', '1',
                       '--results', str(results)])
    out, err = capsys.readouterr()
    assert status == 1
    assert json.loads((lwf / 'run.json').read_text())['status'] == 'complete'
    # nothing written there but joint's own lock (its folder's, taken before its work dir's)
    assert sorted(p.relative_to(runs).as_posix() for p in runs.rglob('*') if 'lwf' not in p.parts) \
        == ['ft', 'ft/small32-seed0', 'ft/small32-seed0/.lock', 'joint', 'joint/small32-seed0',
            'joint/small32-seed0/.lock', 'joint/small32-seed0/work', 'joint/small32-seed0/work/.lock']
    leaderboard = out[out.index('### synth-15-5-overlap: mIoU'):]
    assert '| lwf |' in leaderboard and '| ft |' not in leaderboard
    err_lines = err.splitlines()
    assert f'cssbench: note: {ft}: another cssbench process is running this run; left to it' in err_lines
    assert (f'cssbench: note: {joint / "work"}: another cssbench process is running a run in this '
            f'work dir; left to it') in err_lines
    assert err_lines[-1] == (f'cssbench: runs left to other cssbench processes, which the '
                             f'leaderboards may lack: {ft}, {joint}')


@pytest.fixture
def methods_that_stop_at_step1():
    """Three methods that train step 0 as fine-tuning and stop at step 1's first iteration:
    their loss NaN (the step is stopped), one loss a per-pixel map (refused), a bug."""
    from cssbench.baselines.ft import FineTuning
    from cssbench.methods import register_method

    def at_step1(change):
        def loss(self, inputs, targets):
            losses = FineTuning.loss(self, inputs, targets)
            return change(losses, inputs) if self.step == 1 else losses
        return loss

    def bug(losses, inputs):
        raise ValueError('a bug in the method')

    # class statements, not type(): a class's module is where its statement is
    @register_method('goes-nan')
    class GoesNan(FineTuning):
        loss = at_step1(lambda losses, inputs: dict(loss_ce=losses['loss_ce'] * float('nan')))

    @register_method('per-pixel')
    class PerPixel(FineTuning):
        loss = at_step1(lambda losses, inputs: dict(losses, loss_map=inputs[:, 0].abs()))

    @register_method('has-a-bug')
    class HasABug(FineTuning):
        loss = at_step1(bug)
    names = ['goes-nan', 'per-pixel', 'has-a-bug']
    yield names
    unregister_methods(*names)


def test_a_command_of_several_runs_goes_on_after_one_stops_and_ends_naming_it(
        synth32, config32, tmp_path, capsys, methods_that_stop_at_step1):
    """A run stopped by an error (a step gone NaN, a refused loss, a method's bug) is reported
    as a command of one run reports it, and the command goes on with its other runs, prints
    the leaderboard of those complete, and ends with status 2 naming the runs stopped."""
    results = tmp_path / 'results'
    runs = results / 'synth-15-5-overlap'
    nan, per_pixel, bug = methods_that_stop_at_step1
    status = main(['run', '--protocol', 'synth-15-5-overlap', '--method', f'{nan},{per_pixel},{bug},ft',
                   '--config', str(config32), '--data-root', str(synth32), '--epochs', '1',
                   '--results', str(results)])
    out, err = capsys.readouterr()
    assert status == 2
    folder = {method: runs / method / 'small32-seed0' for method in (nan, per_pixel, bug, 'ft')}
    record = {m: json.loads((f / 'run.json').read_text()) for m, f in folder.items()}
    assert record['ft']['status'] == 'complete'
    assert all(record[m]['status'] == 'stopped' for m in (nan, per_pixel, bug))
    assert record[bug]['stopped_by'] == 'ValueError: a bug in the method'
    leaderboard = out[out.index('### synth-15-5-overlap: mIoU'):]
    assert '| ft |' in leaderboard and not any(f'| {m} |' in leaderboard for m in (nan, per_pixel, bug))
    assert (f'- skipped synth-15-5-overlap/{bug}/small32-seed0: unfinished (stopped by ValueError: '
            f'a bug in the method, 1 step(s) done)') in leaderboard
    assert re.search(rf'^cssbench: error: {re.escape(str(folder[nan]))}/work/step1: epoch 1 .*'
                     rf'losses not finite: loss_ce', err, re.M)
    assert (f"cssbench: error: PerPixel.loss returned 'loss_map' as a tensor of shape (16, 32, 32): "
            f"each term is one number, a tensor reduced as the method means it\n") in err
    assert 'Traceback (most recent call last)' in err and 'ValueError: a bug in the method\n' in err
    for m in (nan, per_pixel, bug):
        assert f"cssbench: note: {folder[m]} stopped; going on with the command's other runs\n" in err
    assert err.splitlines()[-1] == (f'cssbench: error: runs stopped by an error (above), which the '
                                    f'leaderboards lack: {folder[nan]}, {folder[per_pixel]}, {folder[bug]}')

    # A command of one run ends at its error, as before.
    assert main(['run', '--protocol', 'synth-15-5-overlap', '--method', per_pixel, '--config',
                 str(config32), '--data-root', str(synth32), '--epochs', '1', '--results',
                 str(results)]) == 2
    assert capsys.readouterr().err.startswith("cssbench: error: PerPixel.loss returned 'loss_map'")


def test_a_command_of_several_runs_stops_after_a_loader_worker_is_killed(synth32, tmp_path,
                                                                      capsys):
    """A loader worker killed (as the kernel's OOM killer kills one: no memory left on the
    host) is the machine's error, which the next run would meet too: it stops the command."""
    import multiprocessing
    import signal
    from cssbench.baselines.ft import FineTuning
    from cssbench.methods import register_method

    @register_method('workers-killed')
    class WorkersKilled(FineTuning):
        def loss(self, inputs, targets):   # the error comes from the loader, not from here
            for worker in multiprocessing.active_children():
                os.kill(worker.pid, signal.SIGKILL)
            return super().loss(inputs, targets)
    config = tmp_path / 'workers.py'
    config.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\n"
                      "data = dict(crop_size=32, batch_size=8, num_workers=1)\n")
    results = tmp_path / 'results'
    try:
        with pytest.raises(RuntimeError, match=r'^DataLoader worker \(pid'):
            main(['run', '--protocol', 'synth-15-5-overlap', '--method', 'workers-killed,ft',
                  '--config', str(config), '--data-root', str(synth32), '--epochs', '1',
                  '--results', str(results), '--no-step0-cache'])
    finally:
        unregister_methods('workers-killed')
    assert not (results / 'synth-15-5-overlap' / 'ft').exists()
    assert 'going on' not in capsys.readouterr().err


def test_a_command_of_several_runs_stops_after_an_error_outside_the_methods_code(
        synth32, config32, tmp_path, capsys, monkeypatch):
    """An error that is no refusal and not raised in the method's code (torch.save on a full
    disk raises a RuntimeError) is the machine's: the command ends there, as before."""
    from cssbench import runner

    def full_disk(model, path):
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 64')
    monkeypatch.setattr(runner, 'save_weights', full_disk)
    results = tmp_path / 'results'
    with pytest.raises(RuntimeError, match='unexpected pos'):
        main(['run', '--protocol', 'synth-15-5-overlap', '--method', 'lwf,mib', '--config',
              str(config32), '--data-root', str(synth32), '--epochs', '1', '--results',
              str(results)])
    assert not (results / 'synth-15-5-overlap' / 'mib').exists()
    assert 'going on' not in capsys.readouterr().err


def test_a_protocol_whose_runs_were_all_left_to_others_has_no_leaderboard_yet(
        synth32, config32, tmp_path, capsys):
    results = tmp_path / 'results'
    held = results / 'synth-19-1-overlap' / 'ft' / 'small32-seed0'
    with locked_by_another_process(held):
        status = main(['run', '--protocol', 'synth-19-1-overlap,synth-15-5-overlap',
                       '--config', str(config32), '--data-root', str(synth32), '--epochs', '1',
                       '--results', str(results)])
    out, err = capsys.readouterr()
    assert status == 1 and '### synth-15-5-overlap: mIoU' in out and 'synth-19-1-overlap: mIoU' not in out
    assert err.splitlines()[-2:] == [
        'cssbench: note: no leaderboard of synth-19-1-overlap: no run of it is complete yet',
        f'cssbench: runs left to other cssbench processes, which the leaderboards may lack: {held}']


def test_a_command_runs_several_protocols_which_share_their_step0(synth32, config32, tmp_path,
                                                                  capsys, monkeypatch):
    three = tmp_path / 'three.yaml'
    three.write_text('name: three\ndataset: synth\nmode: overlap\nsteps: ["0-15", [16, 17], "18-20"]\n')
    results = tmp_path / 'results'
    run = ['run', '--config', str(config32), '--data-root', str(synth32), '--epochs', '1',
           '--results', str(results)]
    assert main([*run, '--protocol', f'synth-15-5-overlap, {three}']) == 0
    out = capsys.readouterr().out
    steps = {name: json.loads((results / name / 'ft' / 'small32-seed0' / 'metrics.json').read_text())['steps']
             for name in ('synth-15-5-overlap', 'three')}
    assert [len(s) for s in steps.values()] == [2, 3]
    assert steps['synth-15-5-overlap'][0]['step0_cache'] is None and steps['three'][0]['step0_cache']
    assert steps['three'][0]['iou'] == steps['synth-15-5-overlap'][0]['iou']
    assert out.index('### synth-15-5-overlap: mIoU') < out.index('### three: mIoU')  # each leaderboard

    # Refused before anything trains: a protocol unknown, given twice (by two files of one
    # name too), on another dataset than --data-root's, with a step of fewer training images
    # than a batch (config32's 16: synth-15-1-overlap's later steps), or taking the name of
    # another stored in the results; none without a folder for its dataset.
    monkeypatch.delenv('CSSBENCH_VOC_ROOT', raising=False)
    other_three = tmp_path / 'other' / 'three.yaml'
    other_three.parent.mkdir()
    other_three.write_text('name: three\ndataset: synth\nmode: overlap\nsteps: ["0-15", 16, "17-20"]\n')
    none = tmp_path / 'none'
    for protocols, results_root, message in (
            ('synth-15-5-overlap,nope', none, "unknown protocol 'nope'"),
            (f'{three},synth-15-5-overlap,{three}', none, f'--protocol: {three} given twice'),
            (f'{three},{other_three}', none, '--protocol: three given twice'),
            ('synth-15-5-overlap,voc-15-5-overlap', none, 'these protocols are on synth and voc'),
            ('synth-15-5-overlap,synth-15-1-overlap', none, 'fewer than a batch (16)'),
            (f'synth-10-10-overlap,{other_three}', results, "another protocol named 'three' has runs stored")):
        assert main([*run, '--results', str(results_root), '--protocol', protocols]) == 2
        assert message in capsys.readouterr().err
    assert main(['run', '--protocol', 'synth-15-5-overlap,voc-15-5-overlap', '--results', str(none)]) == 2
    assert 'pass --data-root or set CSSBENCH_VOC_ROOT' in capsys.readouterr().err
    # the first refusal is the command line's own: --data-root before the methods
    assert main([*run, '--results', str(none), '--protocol', 'synth-15-5-overlap,voc-15-5-overlap',
                 '--method', 'bogus']) == 2
    assert 'these protocols are on synth and voc' in capsys.readouterr().err
    assert not none.exists() and not (results / 'synth-10-10-overlap').exists()

    # A later run's stored one, of another config (2 epochs, not 1), is refused before an
    # earlier run trains; and a command whose runs are complete keeps them without their data.
    assert main([*run, '--protocol', 'synth-15-5-overlap', '--seeds', '1,0', '--epochs', '2']) == 2
    assert 'small32-seed0: a run with another config (' in capsys.readouterr().err
    assert not (results / 'synth-15-5-overlap' / 'ft' / 'small32-seed1').exists()
    assert main([*run, '--protocol', f'synth-15-5-overlap,{three}', '--data-root', str(none)]) == 0
    assert out.index('### synth-15-5-overlap: mIoU') < out.index('### three: mIoU')

    # One protocol file whose path holds a comma is one protocol.
    comma = tmp_path / 'a,b' / 'five.yaml'
    comma.parent.mkdir()
    comma.write_text('name: five\ndataset: synth\nmode: overlap\nsteps: ["0-15", "16-20"]\n')
    assert main([*run, '--protocol', str(comma)]) == 0
    assert (results / 'five' / 'ft' / 'small32-seed0' / 'metrics.json').exists()


def test_fine_tuning_forgets_joint_does_not_and_mib_and_sdr_forget_less(synth64, tmp_path):
    """The phenomenon the suite measures: after a new step, fine-tuning loses the old classes."""
    config = tmp_path / 'small_bs4.py'  # more updates per epoch: learns in fewer epochs
    config.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\ndata = dict(batch_size=4)\n")
    kwargs = dict(config=str(config), data_root=str(synth64), epochs=8,
                  results_root=tmp_path / 'results', log=lambda *a: None)
    ft = run_protocol('synth-15-5-overlap', 'ft', **kwargs)
    joint = run_protocol('synth-15-5-overlap', 'joint', **kwargs)

    old_before = ft[0]['columns']['old']['mIoU']
    old_after = ft[1]['columns']['old']['mIoU']
    joint_old = joint[-1]['columns']['old']['mIoU']
    assert len(joint) == 1 and joint[0]['columns']['old']['label'] == '0-15'
    print(f'ft old: {old_before:.3f} -> {old_after:.3f}; joint old {joint_old:.3f}, '
          f'new {joint[-1]["columns"]["new"]["mIoU"]:.3f}')
    # Predicting background everywhere scores about 0.9 / 16 = 0.056 on the 16 old classes.
    assert old_before > 0.15, f'step 0 did not learn: old-class mIoU {old_before:.3f}'
    assert old_after < 0.5 * old_before, f'ft did not forget: {old_before:.3f} -> {old_after:.3f}'
    assert joint_old > 0.75 * old_before, f'joint lost old classes: {joint_old:.3f} vs {old_before:.3f}'
    assert joint[-1]['columns']['new']['mIoU'] > 0.1

    # Methods built against forgetting keep clearly more of the old classes than ft does.
    # MiB reuses ft's step 0 from the step-0 cache; SDR trains its own (it gathers prototypes).
    for method in ('mib', 'sdr'):
        steps = run_protocol('synth-15-5-overlap', method, **kwargs)
        kept = steps[1]['columns']['old']['mIoU']
        print(f'{method} old: {steps[0]["columns"]["old"]["mIoU"]:.3f} -> {kept:.3f}')
        assert bool(steps[0]['step0_cache']) == (method == 'mib')
        assert kept > 2 * old_after, f'{method} forgot like ft: {kept:.3f} vs ft {old_after:.3f}'


def test_step0_is_trained_once_and_shared_by_methods_whose_step0_is_fine_tuning(
        synth32, config32, tmp_path):
    kwargs = dict(config=str(config32), data_root=str(synth32), epochs=1,
                  results_root=tmp_path / 'results', log=lambda *a: None)
    ft = run_protocol('synth-15-5-overlap', 'ft', **kwargs)
    messages = []
    lwf = run_protocol('synth-15-5-overlap', 'lwf', **dict(kwargs, log=messages.append))
    assert any('reusing the cached step-0 model' in m for m in messages)
    assert lwf[0]['iou'] == ft[0]['iou'] and lwf[0]['step0_cache'] and ft[0]['step0_cache'] is None
    runs = tmp_path / 'results' / 'synth-15-5-overlap'
    ft_weights = (runs / 'ft' / 'small32-seed0' / 'work' / 'step0' / 'model.pth').read_bytes()
    assert (runs / 'lwf' / 'small32-seed0' / 'work' / 'step0' / 'model.pth').read_bytes() == ft_weights

    # Another seed is another step 0; and the cache can be bypassed.
    other = run_protocol('synth-15-5-overlap', 'lwf', **dict(kwargs, seed=1))
    assert other[0]['step0_cache'] is None
    assert (runs / 'lwf' / 'small32-seed1' / 'work' / 'step0' / 'model.pth').read_bytes() != ft_weights
    fresh = run_protocol('synth-15-5-overlap', 'mib', **dict(kwargs, step0_cache=False))
    assert fresh[0]['step0_cache'] is None and fresh[0]['iou'] == ft[0]['iou']   # deterministic
    # another config (2 epochs) is another step 0
    longer = run_protocol('synth-15-5-overlap', 'lwf', **dict(kwargs, epochs=2, run_name='e2'))
    assert longer[0]['step0_cache'] is None
    assert (runs / 'lwf' / 'e2' / 'work' / 'step0' / 'model.pth').read_bytes() != ft_weights

    # A config setting only what the method's step 0 never reads (LwF's distillation) shares
    # it; one setting what step 0 does read (SDR's sparsification there) does not.
    def config_setting(name: str, settings: str) -> str:
        path = tmp_path / f'{name}.py'
        path.write_text(f"_base_ = ['{config32}']\nmodel = dict({settings})\n")
        return str(path)
    tuned = run_protocol('synth-15-5-overlap', 'lwf', **dict(
        kwargs, config=config_setting('kd10', 'loss_kd=10.0, kd_alpha=0.5')))
    assert tuned[0]['step0_cache'] and tuned[0]['iou'] == ft[0]['iou']
    # nor the later steps' learning rate, nor the loader's workers
    later_lr = tmp_path / 'later-lr.py'
    later_lr.write_text(f"_base_ = ['{config32}']\nschedule = dict(lr=(0.05, 0.123))\n"
                        "data = dict(num_workers=1)\n")
    assert load_config(str(later_lr)).schedule.lr[0] == load_config(str(config32)).schedule.lr[0]
    swept = run_protocol('synth-15-5-overlap', 'lwf', **dict(kwargs, config=str(later_lr)))
    assert swept[0]['step0_cache'] and swept[0]['iou'] == ft[0]['iou']
    sdr = run_protocol('synth-15-5-overlap', 'sdr', **kwargs)
    sdr_kd = run_protocol('synth-15-5-overlap', 'sdr', **dict(
        kwargs, config=config_setting('sdr-kd10', 'loss_kd=10.0, lfc_divide_in_loop=False')))
    assert sdr[0]['step0_cache'] is None and sdr_kd[0]['step0_cache']
    sparse = run_protocol('synth-15-5-overlap', 'sdr', **dict(
        kwargs, config=config_setting('sparse', 'featspars_at_step0=True')))
    assert sparse[0]['step0_cache'] is None
    step0_of = lambda name: (runs / 'sdr' / name / 'work' / 'step0' / 'model.pth').read_bytes()
    assert step0_of('sparse-seed0') != step0_of('small32-seed0') == step0_of('sdr-kd10-seed0')


def test_each_step_is_evaluated_once_after_its_last_epoch_never_to_select_a_checkpoint(
        synth32, config32, tmp_path, monkeypatch):
    # The VOC val set is the test set: scoring it between epochs would invite choosing on it.
    from cssbench.speed import SpeedValLoop
    scored_after_epochs, real_run = [], SpeedValLoop.run

    def counting_run(self):
        scored_after_epochs.append((self.runner.epoch, self.runner.max_epochs))
        return real_run(self)
    monkeypatch.setattr(SpeedValLoop, 'run', counting_run)
    run_protocol('synth-15-5-overlap', 'ft', config=str(config32), data_root=str(synth32),
                 epochs=2, results_root=tmp_path / 'results', log=lambda *a: None)
    assert scored_after_epochs == [(2, 2), (2, 2)]   # steps 0 and 1, each after epoch 2 of 2


def test_run_json_records_every_setting_of_the_method_with_the_value_it_trained_with(
        synth32, config32, tmp_path):
    # The defaults live in the method's code, and the dataset's in its dataset_defaults: a
    # run's config alone does not say which distillation weight it trained with.
    kd10 = tmp_path / 'kd10.py'
    kd10.write_text(f"_base_ = ['{config32}']\nmodel = dict(loss_kd=10.0)\n")
    run_protocol('synth-15-5-overlap', 'lwf', config=str(kd10), data_root=str(synth32), epochs=1,
                 results_root=tmp_path / 'results', log=lambda *a: None)
    record = json.loads((tmp_path / 'results' / 'synth-15-5-overlap' / 'lwf' / 'kd10-seed0'
                         / 'run.json').read_text())
    assert record['method_settings'] == dict(loss_kd=10.0, kd_alpha=1.0)

    small = load_config('small')
    plop_on = lambda protocol: method_settings(small, 'cssbench.PLOP', load_protocol(protocol))
    assert plop_on('voc-15-1-overlap')['pod_factor'] == 0.01
    assert plop_on('ade-100-50')['pod_factor'] == 0.001   # PLOP's dataset_defaults
    assert plop_on('ade-100-50')['pod_scales'] == [1, 2, 4]
    assert method_settings(small, 'cssbench.FineTuning', load_protocol('voc-15-1-overlap')) == {}


def test_protocols_sharing_their_first_step_share_its_model_and_score_it_their_own_way(
        synth32, config32, tmp_path):
    data = tmp_path / 'data'
    shutil.copytree(synth32, data)
    join_val_images_in_pairs(data)   # central crops and whole images score differently
    files = {}
    for name, extra in (('three-steps', 'steps: ["0-15", [16, 17], "18-20"]\n'),
                        ('whole', 'steps: ["0-15", "16-20"]\neval_crop: whole\n')):
        files[name] = tmp_path / f'{name}.yaml'
        files[name].write_text(f'name: {name}\ndataset: synth\nmode: overlap\n{extra}')
    kwargs = dict(config=str(config32), data_root=str(data), epochs=1,
                  results_root=tmp_path / 'results', run_name='r')
    weights = lambda protocol, run='r': (tmp_path / 'results' / protocol / 'ft' / run / 'work'
                                         / 'step0' / 'model.pth').read_bytes()
    five = run_protocol('synth-15-5-overlap', 'ft', **kwargs, log=lambda *a: None)
    assert five[0]['step0_cache'] is None

    # Other later steps: step 0's model and its scores come from the cache.
    messages = []
    three = run_protocol(str(files['three-steps']), 'ft', **kwargs, log=messages.append)
    assert any('reusing the cached step-0 model' in m for m in messages)
    assert not any('evaluating it' in m for m in messages)
    assert three[0]['step0_cache'] and three[0]['iou'] == five[0]['iou']
    assert weights('three-steps') == weights('synth-15-5-overlap')

    # Scored otherwise (whole images): the same model, evaluated anew, as training it afresh
    # under this protocol would have scored it; the scores are then cached beside the others.
    messages = []
    whole = run_protocol(str(files['whole']), 'ft', **kwargs, log=messages.append)
    assert any('evaluating it: it was not yet scored as this protocol scores (eval_unseen: ignore, eval_crop: whole)' in m
               for m in messages)
    assert whole[0]['step0_cache'] and weights('whole') == weights('synth-15-5-overlap')
    assert whole[0]['iou'] != five[0]['iou']
    fresh = run_protocol(str(files['whole']), 'ft', **dict(kwargs, run_name='fresh'),
                         step0_cache=False, log=lambda *a: None)
    assert fresh[0]['step0_cache'] is None and fresh[0]['iou'] == whole[0]['iou']
    retrained = torch.load(tmp_path / 'results' / 'whole' / 'ft' / 'fresh' / 'work' / 'step0' / 'model.pth')
    cached = torch.load(tmp_path / 'results' / 'whole' / 'ft' / 'r' / 'work' / 'step0' / 'model.pth')
    assert retrained.keys() == cached.keys() and all(torch.equal(retrained[k], cached[k]) for k in cached)
    messages = []
    again = run_protocol(str(files['whole']), 'ft', **dict(kwargs, run_name='again'),
                         log=messages.append)
    assert not any('evaluating it' in m for m in messages) and again[0]['iou'] == whole[0]['iou']


def test_the_step0_cache_pairs_ious_only_with_the_weights_they_scored(tmp_path, isolated_cache,
                                                                      monkeypatch):
    protocol = load_protocol('voc-15-1-overlap')
    whole = replace(protocol, eval_crop='whole')
    a, b, c = (tmp_path / name for name in 'abc')   # three runs' folders
    weights = lambda run: run / 'step0.pth'           # each run's step-0 weights
    for value, run in ((1.0, a), (2.0, b)):
        run.mkdir()
        torch.save({'w': torch.tensor([value])}, weights(run))
    weight_of = lambda run: float(torch.load(weights(run))['w'])
    messages = []
    # a and b trained the same step 0 at once, not bit for bit (as on a GPU): a's, stored
    # first, stays, with a's IoUs; b's IoUs, of other weights, are not stored.
    for run, iou in ((a, {0: 0.5}), (b, {0: 0.25})):
        step0.store('k', protocol, weights(run), run, 1.0, iou, messages.append)
    reused = step0.reuse('k', protocol, weights(c))
    assert (reused['iou'], reused['run'], weight_of(c)) == ({'0': 0.5}, str(a), 1.0)
    assert step0.reuse('k', whole, weights(c))['iou'] is None   # never scored so
    # c holds a copy of a's weights
    step0.store_iou('k', whole, file_sha256(weights(c)), c, {0: 0.75}, messages.append)
    assert step0.reuse('k', whole, weights(c))['iou'] == {'0': 0.75}

    entry = isolated_cache / 'step0' / 'k'
    (entry / 'iou-ignore-center.json').write_text('{"model": ')   # damaged: scored again
    assert step0.reuse('k', protocol, weights(c))['iou'] is None
    model = (entry / 'model.pth').read_bytes()
    (entry / 'model.pth').write_bytes(model[:len(model) // 2])    # cut short: trained again
    assert step0.reuse('k', protocol, weights(c)) is None
    step0.store('k', protocol, weights(b), b, 2.0, {0: 0.5}, messages.append)
    reused = step0.reuse('k', whole, weights(c))
    assert (reused['iou'], reused['run'], weight_of(c)) == (None, str(b), 2.0)
    torch.save(['not', 'weights'], entry / 'model.pth')           # a whole zip, but no weights
    assert step0.reuse('k', protocol, weights(c)) is None
    torch.save({'w': torch.tensor([1.0, float('nan')])}, entry / 'model.pth')   # gone NaN
    assert step0.reuse('k', protocol, weights(c)) is None
    step0.store('k', protocol, weights(a), a, 1.0, {0: 0.5}, messages.append)
    assert step0.reuse('k', protocol, weights(c))['run'] == str(a) and weight_of(c) == 1.0
    assert messages == []

    # Two runs storing at once: b's model lands while a copies its own; b's stays, and a
    # leaves the entry as b left it.
    shutil.rmtree(entry)
    copy = step0.copy_if_absent

    left_by_b = {}

    def b_stores_meanwhile(source, path):
        monkeypatch.setattr(step0, 'copy_if_absent', copy)
        step0.store('k', protocol, weights(b), b, 2.0, {0: 0.25}, messages.append)
        left_by_b.update((p.name, p.read_bytes()) for p in entry.iterdir())
        return copy(source, path)
    monkeypatch.setattr(step0, 'copy_if_absent', b_stores_meanwhile)
    step0.store('k', protocol, weights(a), a, 1.0, {0: 0.5}, messages.append)
    reused = step0.reuse('k', protocol, weights(c))
    assert (reused['run'], reused['iou'], weight_of(c)) == (str(b), {'0': 0.25}, 2.0)
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == left_by_b and messages == []
    assert sorted(left_by_b) == ['iou-ignore-center.json', 'model.json', 'model.pth']

    # A cache that cannot be written stops no run: it says so.
    shutil.rmtree(entry.parent)
    entry.parent.write_text('a file where the cache keeps its step-0 folders')
    assert step0.reuse('k', protocol, weights(c)) is None
    step0.store('k', protocol, weights(b), b, 2.0, {0: 0.5}, messages.append)
    assert len(messages) == 1 and messages[0].startswith(f'step-0 cache: {entry}: not stored (')
    entry.parent.unlink()

    def full_disk(*args):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(step0, 'copy_if_absent', full_disk)
    step0.store('k', protocol, weights(b), b, 2.0, {0: 0.5}, messages.append)
    assert messages[1:] == [f'step-0 cache: {entry}: not stored ([Errno 28] No space left on '
                            f'device); the run goes on']


def test_the_step0_cache_key_counts_the_pretrained_checkpoint_by_its_bytes(tmp_path):
    """A backbone checkpoint replaced at the same path is another step 0 (its key named only
    the path: the model trained from the old weights was reused); one moved is the same."""
    protocol, ft = load_protocol('voc-15-1-overlap'), get_method('ft')
    speed = dict(amp='float32', world_size=1, sync_bn=False)
    checkpoint, moved = tmp_path / 'resnet101.pth', tmp_path / 'moved' / 'r101.pth'

    def key(pretrained: Path | None) -> str:
        cfg = load_config('deeplabv3-r101', dataset='voc')
        cfg.model.backbone.pretrained = None if pretrained is None else str(pretrained)
        key = step0.cache_key(protocol, ft.step0_kind, cfg, (), 0, False, 'data', speed)
        assert cfg.model.backbone.pretrained == (None if pretrained is None else str(pretrained))
        return key

    torch.save({'conv1.weight': torch.zeros(1)}, checkpoint)
    first = key(checkpoint)
    moved.parent.mkdir()
    shutil.copyfile(checkpoint, moved)
    assert key(moved) == first                      # the same weights elsewhere
    torch.save({'conv1.weight': torch.ones(1)}, checkpoint)
    assert key(checkpoint) != first                 # other weights at the same path
    assert len({key(None), first, key(checkpoint)}) == 3


def test_the_step0_cache_key_counts_the_code_that_trains_step0(tmp_path, monkeypatch):
    """A fix to the code that trains or scores step 0 is never served the model trained before
    it (the key named only the version, bumped by hand, and forgotten once): every module of
    cssbench and of the methods counts by its bytes, but those that only report."""
    import cssbench
    import cssbench.baselines
    installed = step0.training_code_digest()
    harness, methods = tmp_path / 'cssbench', tmp_path / 'baselines'
    shutil.copytree(Path(cssbench.__file__).parent, harness)
    shutil.copytree(Path(cssbench.baselines.__file__).parent, methods)

    def digest() -> str:
        step0.training_code_digest.cache_clear()
        return step0.training_code_digest(harness, methods)

    assert digest() == installed                    # the same code, installed elsewhere
    with open(harness / 'tables.py', 'a') as f:     # a module that only reports
        f.write('# a table changed\n')
    assert digest() == installed
    with open(harness / 'models.py', 'a') as f:
        f.write('# a fix\n')
    fixed = digest()
    assert fixed != installed
    (methods / 'mine.py').write_text('# a method of ones own\n')
    assert digest() not in {installed, fixed}

    protocol, ft = load_protocol('synth-15-1-overlap'), get_method('ft')
    speed = dict(amp='float32', world_size=1, sync_bn=False)
    cfg = load_config('small', dataset='synth')
    keys = set()
    for code in ('before', 'after'):
        monkeypatch.setattr(step0, 'training_code_digest', lambda code=code: code)
        keys.add(step0.cache_key(protocol, ft.step0_kind, cfg, (), 0, False, 'data', speed))
    assert len(keys) == 2


def test_the_step0_cache_key_names_each_setting_a_step0_model_depends_on(monkeypatch):
    """A cached step 0 trained otherwise is never reused: each setting it depends on (the first
    step's classes and filtering, the method's step-0 kind, step 0's learning rate, seed,
    determinism, data, cssbench's version, autocast, processes and SyncBN) changes its key,
    while what step 0 never depends on (later steps, how a protocol scores) does not."""
    ft = get_method('ft')
    fp32 = dict(amp='float32', world_size=1, sync_bn=False)

    def key(protocol='synth-15-5-overlap', kind=ft.step0_kind, step0_lr=0.05, later_lr=0.005,
            seed=0, deterministic=False, data='data', **speed) -> str:
        cfg = load_config('small', dataset='synth')
        cfg.schedule.lr = (step0_lr, later_lr)
        protocol = load_protocol(protocol) if isinstance(protocol, str) else protocol
        return step0.cache_key(protocol, kind, cfg, (), seed, deterministic, data,
                               dict(fp32, **speed))

    base = key()
    # shared: other later steps, another evaluation, another later-step learning rate
    assert key('synth-15-1-overlap') == base
    assert key(replace(load_protocol('synth-15-5-overlap'), eval_crop='whole')) == base
    assert key(later_lr=0.123) == base
    assert key(amp='float32') == base   # fp32 named as such: not an autocast
    others = [key('synth-19-1-overlap'), key('synth-15-5-disjoint'), key(kind='sdr'),
              key(step0_lr=0.01), key(seed=1), key(deterministic=True), key(data='other data'),
              key(amp='bfloat16'), key(amp='float16'),
              key(world_size=2, sync_bn=False), key(world_size=2, sync_bn=True),
              key(world_size=4, sync_bn=False)]
    assert len({base, *others}) == 1 + len(others)
    monkeypatch.setattr(step0, '__version__', '0.0.0-other')
    assert key() != base   # another cssbench version


def test_the_training_code_digest_counts_each_file_by_its_package_and_name(tmp_path):
    """Code moved from one module to another, or between cssbench and the methods, is other
    code: each file counts by its package and name as well as its bytes."""
    def digest(files: dict[str, str]) -> str:   # 'package/name.py': its text
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        packages: dict[str, list[Path]] = {'cssbench': [], 'baselines': []}
        for name, text in files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            packages[name.split('/')[0]].append(path)
        return step0._sources_digest(packages)

    digests = [digest({'cssbench/a.py': 'x = 1\n'}), digest({'cssbench/b.py': 'x = 1\n'}),
               digest({'baselines/a.py': 'x = 1\n'}),
               digest({'cssbench/a.py': 'x = 1\n', 'cssbench/b.py': ''}),
               digest({'cssbench/a.py': '', 'cssbench/b.py': 'x = 1\n'})]
    assert len(set(digests)) == len(digests)
    assert digest({'cssbench/a.py': 'x = 1\n'}) == digests[0]   # the same files elsewhere


def test_a_cached_step0_without_its_record_is_reused_as_trained_by_a_run_unknown(tmp_path,
                                                                                isolated_cache):
    protocol = load_protocol('voc-15-1-overlap')
    run, weights = tmp_path / 'a', tmp_path / 'c.pth'
    run.mkdir()
    torch.save({'w': torch.tensor([1.0])}, run / 'step0.pth')
    messages = []
    step0.store('k', protocol, run / 'step0.pth', run, 3.0, {0: 0.5}, messages.append)
    reused = step0.reuse('k', protocol, weights)
    assert (reused['trained_in_s'], reused['run'], reused['iou']) == (3.0, str(run), {'0': 0.5})
    (isolated_cache / 'step0' / 'k' / 'model.json').unlink()   # lost: the model is still good
    reused = step0.reuse('k', protocol, weights)
    assert (reused['trained_in_s'], reused['run'], reused['iou']) == (None, None, {'0': 0.5})
    assert reused['model'] == file_sha256(run / 'step0.pth') == file_sha256(weights)
    assert messages == []


def test_a_datasets_epochs_come_from_the_config_unless_epochs_is_given(synth32, config32, tmp_path):
    from cssbench.config import load_config
    assert load_config('deeplabv3-r101', dataset='ade').schedule.epochs == 60   # the papers' ADE20K
    assert load_config('deeplabv3-r101', dataset='voc').schedule.epochs == 30
    assert load_config('deeplabv3-r101', 7, dataset='ade').schedule.epochs == 7   # --epochs wins
    assert 'epochs_by_dataset' not in load_config('deeplabv3-r101', dataset='ade').schedule

    config = tmp_path / 'synth_epochs.py'
    config.write_text(f"_base_ = ['{config32}']\nschedule = dict(epochs=3, epochs_by_dataset=dict(synth=1))\n")
    results = tmp_path / 'results'
    run_protocol('synth-19-1-overlap', 'ft', config=str(config), data_root=str(synth32),
                 results_root=results, run_name='r', keep_epoch_checkpoints=True, log=lambda *a: None)
    run_dir = results / 'synth-19-1-overlap' / 'ft' / 'r'
    assert json.loads((run_dir / 'run.json').read_text())['config']['schedule']['epochs'] == 1
    for t in (0, 1):
        assert sorted(p.name for p in (run_dir / 'work' / f'step{t}').glob('epoch_*.pth')) == ['epoch_1.pth']


def test_a_run_refused_at_its_start_loses_nothing_and_leaves_nothing(synth32, config32, tmp_path):
    results = tmp_path / 'results'
    kwargs = dict(config=str(config32), epochs=1, results_root=results, run_name='r',
                  log=lambda *a: None)
    with pytest.raises(UserError, match='not found'):
        run_protocol('synth-15-5-overlap', 'ft', data_root=str(tmp_path / 'nowhere'), **kwargs)
    assert not results.exists()     # no empty run folder for `table` to trip over

    run_protocol('synth-15-5-overlap', 'ft', data_root=str(synth32), **kwargs)
    run_dir = results / 'synth-15-5-overlap' / 'ft' / 'r'
    stored = {p: p.read_bytes() for p in run_dir.rglob('*') if p.is_file() and p.name != '.lock'}
    with pytest.raises(UserError, match='not found'):   # --overwrite with a bad input
        run_protocol('synth-15-5-overlap', 'ft', data_root=str(tmp_path / 'nowhere'),
                     overwrite=True, **kwargs)
    assert {p: p.read_bytes() for p in run_dir.rglob('*') if p.is_file() and p.name != '.lock'} == stored


def test_a_run_into_a_store_it_cannot_write_fails_at_its_start(synth32, config32, tmp_path, capsys,
                                                             monkeypatch):
    """Only a reader takes a store it cannot write in its stride (the index is a cache): a run
    is refused before it writes, or reads its data (a command of several runs checks every
    run's data first), in one line naming --results and why."""
    results = tmp_path / 'results'
    results.mkdir()
    refused = mount_read_only(monkeypatch, results)
    for methods in ('ft', 'ft,lwf'):
        assert main(['run', '--protocol', 'synth-15-5-overlap', '--method', methods, '--config',
                     str(config32), '--data-root', str(tmp_path / 'nowhere'), '--epochs', '1',
                     '--results', str(results)]) == 2
        assert capsys.readouterr().err == (f'cssbench: error: --results {results}: cannot write in '
                                           f'{results} (Read-only file system)\n')
    assert os.listdir(results) == [] and refused == []   # not even tried


def test_a_protocol_file_taking_a_stored_protocols_name_is_refused(synth32, config32, tmp_path):
    results = tmp_path / 'results'
    kwargs = dict(config=str(config32), data_root=str(synth32), epochs=1, results_root=results,
                  log=lambda *a: None)
    mine = tmp_path / 'mine.yaml'
    mine.write_text('name: mine-15-5\ndataset: synth\nmode: overlap\nsteps: ["0-15", "16-20"]\n')
    run_protocol(str(mine), 'ft', **kwargs)
    impostor = tmp_path / 'impostor.yaml'   # the same name, other steps
    impostor.write_text('name: mine-15-5\ndataset: synth\nmode: overlap\n'
                        'steps: ["0-10", "11-20"]\n')
    with pytest.raises(UserError, match=f"{impostor}: another protocol named 'mine-15-5' "
                                        f"has runs stored .*; give this one another name"):
        run_protocol(str(impostor), 'lwf', **kwargs)
    assert sorted(p.name for p in (results / 'mine-15-5').iterdir()) == ['ft']
    twin = tmp_path / 'twin.yaml'   # the same protocol written out again is the same protocol
    twin.write_text('name: mine-15-5\ndataset: synth\nmode: overlap\n'
                    'steps: ["0-15", "16-20"]\ndescription: a copy\n')
    assert len(run_protocol(str(twin), 'lwf', **kwargs)) == 2


def test_a_run_name_given_for_another_seed_is_refused_not_taken_for_its_run(
        synth32, config32, tmp_path, capsys):
    """--run-name without --seeds names every seed's run alike: a second seed given the name
    of a stored run is refused, naming both seeds. A single run was told 'this run is
    complete' (its --overwrite would have replaced the other seed's run); a command of several
    kept the other seed's run as this seed's, printed it and exited 0, training nothing."""
    results = tmp_path / 'results'
    run_protocol('synth-15-5-overlap', 'ft', config=str(config32), data_root=str(synth32),
                 epochs=1, results_root=results, run_name='mine', log=lambda *a: None)
    run_dir = results / 'synth-15-5-overlap' / 'ft' / 'mine'
    stored = {p: p.read_bytes() for p in run_dir.rglob('*') if p.is_file() and p.name != '.lock'}
    run = ['run', '--protocol', 'synth-15-5-overlap', '--config', str(config32), '--data-root',
           str(synth32), '--epochs', '1', '--results', str(results), '--run-name', 'mine',
           '--seed', '1']
    refusal = (f'cssbench: error: {run_dir}: a run of seed 0 is stored there, not of seed 1; '
               f'give another --run-name to keep both, or --overwrite to replace it')
    assert main([*run, '--method', 'ft']) == 2
    assert capsys.readouterr().err == refusal + '\n'
    assert main([*run, '--method', 'ft,joint']) == 2   # before joint trains
    assert capsys.readouterr().err.startswith(refusal + ' (with several runs, --overwrite would')
    assert not (results / 'synth-15-5-overlap' / 'joint').exists()
    assert {p: p.read_bytes() for p in run_dir.rglob('*') if p.is_file() and p.name != '.lock'} == stored
    # stopped mid-way: refused alike, not continued with the other seed
    stop_run_in_step(run_dir, run_dir / 'work', 1)
    stored = {p: p.read_bytes() for p in run_dir.rglob('*') if p.is_file() and p.name != '.lock'}
    assert main([*run, '--method', 'ft']) == 2
    assert capsys.readouterr().err == refusal + '\n'
    assert {p: p.read_bytes() for p in run_dir.rglob('*') if p.is_file() and p.name != '.lock'} == stored
