"""The results store, the leaderboard tables and the plots, on stores written by hand here.

Every expected number below is worked out by hand from the IoUs the test writes.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import shutil
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cssbench.cli import main
from cssbench.config import CONFIGS_DIR, config_digest, load_config, shared_config_digest
from cssbench.errors import UserError
from cssbench.metrics import range_label, summarize_step
from cssbench.plots import class_iou_figure, miou_by_step_figure
from cssbench.protocols import Protocol, load_protocol
from cssbench.store import INDEX_FILE, now_stamp, open_store, select_runs
from cssbench.tables import (format_step_table, forgetting_per_class, leaderboard, mean_std,
                             per_class_forgetting, per_step, render, steps_to_csv)
from conftest import mount_read_only

VOC19 = 'voc-19-1-overlap'


def write_run(root: Path, step_ious: list[dict[int, float | None]], protocol: str | Protocol = VOC19,
              method: str = 'ft', run: str = 'small-seed0', seed: int = 0,
              finished: str = '2026-01-01T00:00:00', config_digest: str = 'digest-small',
              dataset_fingerprint: str = 'fp', speed: dict | None = None,
              joint: bool | None = None, config_name: str = 'small',
              git_revision: str = '0123456789abcdef', shared_config_digest: str | None = None,
              config: dict | None = None, method_settings: dict | None = None) -> Path:
    """A run folder as the runner writes it; step t's IoUs are ``step_ious[t]``. ``joint``,
    ``shared_config_digest`` and ``method_settings``: left out of run.json if None (as runs
    stored before they were written); ``config``: the config it holds (none if None; the store
    computes its digests from it, and reads ``config_digest`` where there is none)."""
    p = load_protocol(protocol) if isinstance(protocol, str) else protocol
    steps = []
    for t, iou in enumerate(step_ious):
        summary_step = p.num_steps - 1 if (method == 'joint' if joint is None else joint) else t
        steps.append(dict(step=t, classes=list(p.steps[t]), num_train=10, num_val=5,
                          iou={str(c): v for c, v in iou.items()},
                          columns=summarize_step(p, summary_step,
                                                 {c: math.nan if v is None else v for c, v in iou.items()})))
    run_dir = root / p.name / method / run
    run_dir.mkdir(parents=True)
    (run_dir / 'run.json').write_text(json.dumps(dict(
        protocol=p.to_dict(), method=method, run=run, seed=seed, config_name=config_name,
        config_digest=config_digest, status='complete', started='2026-01-01T00:00:00',
        finished=finished, wall_time_s=12.5, git_revision=git_revision,
        environment=dict(cssbench='0.1.0'), dataset_fingerprint=dataset_fingerprint,
        **({'speed': speed} if speed else {}), **({} if joint is None else {'joint': joint}),
        **({} if shared_config_digest is None else {'shared_config_digest': shared_config_digest}),
        **({} if config is None else {'config': config}),
        **({} if method_settings is None else {'method_settings': method_settings}))))
    (run_dir / 'metrics.json').write_text(json.dumps(dict(steps=steps)))
    return run_dir


def uniform(classes, value) -> dict[int, float]:
    return {c: value for c in classes}


OLD19 = range(20)


def write_two_ft_runs(root: Path, first: dict, second: dict) -> None:
    """Two ft runs of voc-19-1 (``write_run`` options ``first``, ``second``): old classes at
    80 % after step 0, then at 60 % in the first run and 20 % in the second."""
    for old_after, options in ((0.6, first), (0.2, second)):
        write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, old_after), 20: 0.3}], **options)


@pytest.fixture
def store_19_1(tmp_path: Path) -> Path:
    """ft with two seeds, lwf with one, joint with one, on VOC 19-1.

    ft seed 0: step 0 every class 0.8; step 1 old 0.6, class 20 0.3
        old 60, new 30, all (20*0.6 + 0.3)/21 = 58.5714, avg (80 + 58.5714)/2, forgetting 20
    ft seed 1: step 0 0.7; step 1 old 0.4, class 20 0.5
        old 40, new 50, all (20*0.4 + 0.5)/21 = 40.4762, avg (70 + 40.4762)/2, forgetting 30
    lwf seed 0: step 0 0.8; step 1 old 0.7, class 20 0.2: old 70, new 20, all 67.619
    joint: one step, every class 0.9: all 90
    """
    root = tmp_path / 'results'
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}])
    write_run(root, [uniform(OLD19, 0.7), {**uniform(OLD19, 0.4), 20: 0.5}], run='small-seed1', seed=1)
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.7), 20: 0.2}], method='lwf')
    write_run(root, [uniform(range(21), 0.9)], method='joint')
    return root


def test_mean_std_is_the_sample_std() -> None:
    mean, std = mean_std([60.0, 40.0])
    assert mean == 50.0 and std == pytest.approx(math.sqrt(200))
    assert mean_std([3.0])[0] == 3.0 and math.isnan(mean_std([3.0])[1])
    assert mean_std([1.0, math.nan, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_mean_std_of_no_scored_value_is_nan_without_a_numpy_warning() -> None:
    # a joint row's forgetting: every seed's is NaN; `cssbench table` must not print numpy's
    # 'Mean of empty slice' for it
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        mean, std = mean_std([math.nan, math.nan])
        assert math.isnan(mean) and math.isnan(std)
        mean, std = mean_std([])
        assert math.isnan(mean) and math.isnan(std)
        mean, std = mean_std([3.0, math.nan])   # one seed: its value, no std
        assert mean == 3.0 and math.isnan(std)


def test_forgetting_on_a_hand_made_example() -> None:
    steps = [dict(iou={'0': 0.9, '1': 0.8, '4': 0.95}),
             dict(iou={'0': None, '1': 0.9, '2': 0.7, '4': 0.7}),
             dict(iou={'0': None, '1': 0.5, '2': 0.75, '3': 0.6, '4': 0.5})]
    f = forgetting_per_class(steps)
    # class 1: best earlier 0.9 - 0.5; class 2: 0.7 - 0.75 (improved); class 4: its best is
    # the first, 0.95 - 0.5, not the latest; class 0 not scored at the end, class 3 learned
    # at the last step: neither has a forgetting.
    assert f == {1: pytest.approx(0.4), 2: pytest.approx(-0.05), 4: pytest.approx(0.45)}
    assert forgetting_per_class(steps[:1]) == {}


def _step_records(protocol: str, step_ious: list[dict[int, float]]) -> list[dict]:
    """The runner's per-step records (metrics.json's steps) of ``step_ious``; step t trained
    on 10 + t images."""
    p = load_protocol(protocol)
    return [dict(step=t, classes=list(p.steps[t]), num_train=10 + t, num_val=5,
                 iou={str(c): v for c, v in iou.items()}, columns=summarize_step(p, t, iou))
            for t, iou in enumerate(step_ious)]


def test_the_step_table_a_run_prints_shows_each_steps_miou_in_percent_to_one_decimal() -> None:
    """VOC 19-1, step 0 every class 0.8, step 1 old 0.6 and class 20 0.3: old 80 then 60, new
    none then 30, all 80 then (20 * 0.6 + 0.3) / 21 = 58.571, shown 58.6."""
    steps = _step_records(VOC19, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}])
    lines = format_step_table(VOC19, 'ft', 'small-seed0', steps).splitlines()
    assert lines[0] == 'voc-19-1-overlap / ft / small-seed0 (mIoU %)'
    assert lines[1].split() == ['old', 'classes', 'new', 'classes', 'old', 'new', 'all']
    assert lines[-2].split() == ['0', '0-19', '-', '80.0', '-', '80.0']
    assert lines[-1].split() == ['1', '0-19', '20', '60.0', '30.0', '58.6']
    assert len(lines) == 5   # title, header, index name, two steps


def test_metrics_csv_holds_each_steps_miou_and_class_ious_in_percent_to_two_decimals() -> None:
    steps = _step_records(VOC19, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}])
    lines = steps_to_csv(steps).splitlines()
    header = lines[0].split(',')
    assert header[:9] == ['step', 'num_train', 'num_val', 'old_classes', 'old_mIoU',
                          'new_classes', 'new_mIoU', 'all_classes', 'all_mIoU']
    assert header[9:] == [f'IoU_{c}' for c in range(21)]
    assert len(lines) == 3
    step0, step1 = (dict(zip(header, line.split(','))) for line in lines[1:])
    assert [step0[k] for k in header[:9]] == ['0', '10', '5', '0-19', '80.00', '-', '', 'all', '80.00']
    assert [step1[k] for k in header[:9]] == ['1', '11', '5', '0-19', '60.00', '20', '30.00', 'all',
                                              '58.57']
    assert step0['IoU_3'] == '80.00' and step0['IoU_20'] == ''   # class 20 not yet seen
    assert step1['IoU_3'] == '60.00' and step1['IoU_20'] == '30.00'


def test_leaderboard_values_mean_std_and_gap_to_joint(store_19_1: Path) -> None:
    table = leaderboard(open_store(store_19_1), VOC19)
    f = table.frame
    assert list(f.index) == ['ft', 'joint', 'lwf']
    assert f.at['ft', 'seeds'] == 2 and f.at['lwf', 'seeds'] == 1
    assert f.at['ft', 'old'] == pytest.approx(50.0)
    assert f.at['ft', 'old_std'] == pytest.approx(math.sqrt(200))
    assert f.at['ft', 'new'] == pytest.approx(40.0)
    all0, all1 = 100 * 12.3 / 21, 100 * 8.5 / 21
    assert f.at['ft', 'all'] == pytest.approx((all0 + all1) / 2)
    assert f.at['ft', 'avg'] == pytest.approx(((80 + all0) / 2 + (70 + all1) / 2) / 2)
    assert f.at['ft', 'forgetting'] == pytest.approx(25.0)
    assert f.at['ft', 'forgetting_std'] == pytest.approx(math.sqrt(50))
    assert f.at['ft', 'gap_joint'] == pytest.approx(90 - (all0 + all1) / 2)
    assert f.at['lwf', 'old'] == pytest.approx(70.0) and math.isnan(f.at['lwf', 'old_std'])
    assert f.at['joint', 'all'] == pytest.approx(90.0) and f.at['joint', 'gap_joint'] == 0
    assert math.isnan(f.at['joint', 'forgetting'])

    md = render(table, 'md')
    assert '| method | seeds | 0-19 | 20 | all | avg | forgetting | gap to joint |' in md
    assert '| ft | 2 | 50.0 ± 14.1 | **40.0 ± 14.1** | 49.5 ± 12.8 |' in md
    # best incremental method per column in bold; joint (the upper bound) is never bold
    assert '| lwf | 1 | **70.0** | 20.0 | **67.6** |' in md
    # forgetting and gap to joint: the lowest is best (lwf's 10.0 and 22.4, ft's 25.0, 40.5)
    assert '| lwf | 1 | **70.0** | 20.0 | **67.6** | **73.8** | **10.0** | **22.4** |' in md
    assert '| 25.0 ± 7.1 | 40.5 |' in md
    assert '| joint | 1 | 90.0 | 90.0 | 90.0 |' in md
    # joint has no forgetting (no earlier step): shown as '-', not 'nan'
    assert '| joint | 1 | 90.0 | 90.0 | 90.0 | 90.0 | - | 0.0 |' in md and 'nan' not in md
    assert 'ft (small): small-seed0 (seed 0' in md and 'small-seed1 (seed 1' in md


def test_a_method_registered_as_joint_is_tabulated_as_the_upper_bound_whatever_its_name(
        tmp_path: Path) -> None:
    root = tmp_path / 'results'
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}], joint=False)
    write_run(root, [uniform(range(21), 0.9)], method='oracle', joint=True)
    store = open_store(root)
    f = leaderboard(store, VOC19).frame
    assert f.at['ft', 'gap_joint'] == pytest.approx(90 - 100 * 12.3 / 21)
    assert f.at['oracle', 'gap_joint'] == 0 and math.isnan(f.at['oracle', 'forgetting'])
    assert '**90.0**' not in render(leaderboard(store, VOC19), 'md')   # never ranked
    assert list(per_step(store, VOC19).frame.index) == [('ft', 0), ('ft', 1), ('oracle', 1)]
    assert list(per_class_forgetting(store, VOC19).frame.columns) == ['ft', 'ft_std']


def test_the_forgetting_column_is_the_mean_over_the_old_classes(tmp_path: Path) -> None:
    """Each old class's forgetting (best earlier IoU minus the last), averaged over the old
    classes, improvements counting negative: classes 0-9 fall from 80 to 50 (30 each), 10-18
    stay at 80 (0), 19 rises to 90 (-10): (10 * 30 + 9 * 0 - 10) / 20 = 14.5; not the largest
    (30). Class 20, learned at the last step, has none."""
    root = tmp_path / 'results'
    last = {**uniform(range(10), 0.5), **uniform(range(10, 19), 0.8), 19: 0.9, 20: 0.3}
    write_run(root, [uniform(OLD19, 0.8), last])
    assert leaderboard(open_store(root), VOC19).frame.at['ft', 'forgetting'] == pytest.approx(14.5)


def test_two_joint_rows_of_one_config_and_data_give_the_gap_of_the_first(tmp_path: Path) -> None:
    """Rows whose joint training shares their config and data (here joint, 90, and a method
    registered as joint, oracle, 80; rows ordered by method) take the gap to the first joint
    row: ft's all (20 * 60 + 30) / 21 = 58.571 is 90 - 58.571 = 31.43 below it, not 21.43."""
    root = tmp_path / 'results'
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}])
    write_run(root, [uniform(range(21), 0.9)], method='joint')
    write_run(root, [uniform(range(21), 0.8)], method='oracle', joint=True)
    frame = leaderboard(open_store(root), VOC19).frame
    assert list(frame.index) == ['ft', 'joint', 'oracle']
    assert frame.at['ft', 'gap_joint'] == pytest.approx(90 - 100 * 12.3 / 21)


def test_latex_is_a_booktabs_tabular_with_the_best_bold(store_19_1: Path) -> None:
    tex = render(leaderboard(open_store(store_19_1), VOC19), 'latex')
    body = tex[tex.index('\\begin{tabular}'):]
    assert body.startswith('\\begin{tabular}{lrrrrrrr}\n\\toprule\n')
    assert 'method & seeds & 0-19 & 20 & all & avg & forgetting & gap to joint \\\\' in body
    assert 'ft & 2 & 50.0 $\\pm$ 14.1 & \\textbf{40.0 $\\pm$ 14.1} &' in body
    assert 'lwf & 1 & \\textbf{70.0} & 20.0 & \\textbf{67.6} &' in body
    assert body.rstrip().endswith('\\bottomrule\n\\end{tabular}')
    assert all(line.startswith('%') for line in tex[:tex.index('\\begin')].splitlines())


def test_methods_tied_at_the_shown_precision_are_both_bold(tmp_path: Path) -> None:
    """The best is judged on the numbers as printed (one decimal): ft's old 67.58 and lwf's
    67.62 both read 67.6, so both are bold, not only the larger; ft's new 30.0 beats lwf's
    20.0 alone."""
    root = tmp_path / 'results'
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6758), 20: 0.3}])
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6762), 20: 0.2}], method='lwf')
    md = render(leaderboard(open_store(root), VOC19), 'md')
    assert '| ft | 1 | **67.6** | **30.0** |' in md
    assert '| lwf | 1 | **67.6** | 20.0 |' in md


def test_joint_is_not_bold_where_it_ties_the_best_method(tmp_path: Path) -> None:
    """ft's new (class 20 at 0.9) equals joint's 90.0: ft is bold as the best of ft and lwf;
    joint, the upper bound, is not ranked, tie or not."""
    root = tmp_path / 'results'
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.9}])
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.7), 20: 0.2}], method='lwf')
    write_run(root, [uniform(range(21), 0.9)], method='joint')
    md = render(leaderboard(open_store(root), VOC19), 'md')
    assert '| ft | 1 | 60.0 | **90.0** |' in md
    assert '| joint | 1 | 90.0 | 90.0 | 90.0 | 90.0 |' in md


def test_latex_sets_a_negative_number_with_a_minus_sign(tmp_path: Path) -> None:
    root = tmp_path / 'results'
    write_run(root, [uniform(OLD19, 0.95), {**uniform(OLD19, 0.95), 20: 0.95}])   # above joint
    write_run(root, [uniform(range(21), 0.9)], method='joint')
    table = leaderboard(open_store(root), VOC19)
    assert table.frame.at['ft', 'gap_joint'] == pytest.approx(-5.0)
    assert '| 0.0 | -5.0 |' in render(table, 'md')
    assert '& $-$5.0' in render(table, 'latex') and '& -5.0' not in render(table, 'latex')


def test_csv_keeps_means_and_stds_as_numbers(store_19_1: Path) -> None:
    lines = render(leaderboard(open_store(store_19_1), VOC19), 'csv').splitlines()
    header = lines[0].split(',')
    ft = dict(zip(header, lines[1].split(',')))
    assert ft['method'] == 'ft' and float(ft['old']) == 50.0 and float(ft['old_std']) == 14.14


def test_per_step_table(store_19_1: Path) -> None:
    f = per_step(open_store(store_19_1), VOC19).frame
    assert f.loc[('ft', 0), 'all'] == pytest.approx(75.0)
    assert f.loc[('ft', 0), 'all_std'] == pytest.approx(math.sqrt(50))
    assert math.isnan(f.loc[('ft', 0), 'new'])
    assert f.loc[('ft', 1), 'new'] == pytest.approx(40.0)
    assert f.loc[('joint', 1), 'all'] == pytest.approx(90.0)   # joint's one step, shown last
    assert len(f) == 2 + 2 + 1


def test_per_step_rows_name_the_classes_their_new_column_averages(tmp_path: Path) -> None:
    # VOC 15-1: every class seen at 0.5, but new class 16 + k at 0.1 (k + 1), so the new
    # column after step t is the mean of 0.1 .. 0.1 t: 10 at step 1, 15 at step 2, 30 at step 5
    root = tmp_path / 'results'
    p = load_protocol('voc-15-1-overlap')
    write_run(root, [{**uniform(p.classes_seen(t), 0.5), **{16 + k: 0.1 * (k + 1) for k in range(t)}}
                     for t in range(6)], protocol=p)
    write_run(root, [uniform(range(21), 0.9)], protocol=p, method='joint')
    table = per_step(open_store(root), p.name)
    ft = table.frame.loc['ft']
    assert ft['new_classes'].tolist() == ['-', '16', '16-17', '16-18', '16-19', '16-20']
    assert ft['old_classes'].tolist() == ['0-15'] * 6
    np.testing.assert_allclose(ft['new'].tolist(), [math.nan, 10, 15, 20, 25, 30])
    assert table.frame.loc[('joint', 5), 'new_classes'] == '16-20'

    md = render(table, 'md')
    assert '| method | step | seeds | old classes | new classes | old | new | all |' in md
    assert '| ft | 1 | 1 | 0-15 | 16 | 50.0 | 10.0 | 47.6 |' in md   # all: (16 * 0.5 + 0.1) / 17
    assert '| ft | 2 | 1 | 0-15 | 16-17 | 50.0 | 15.0 | 46.1 |' in md   # (16 * 0.5 + 0.3) / 18
    tex = render(table, 'latex')
    assert 'method & step & seeds & old classes & new classes & old & new & all \\\\' in tex
    assert 'ft & 5 & 1 & 0-15 & 16-20 & 50.0 & 30.0 & 45.2 \\\\' in tex   # (8 + 1.5) / 21
    csv = pd.read_csv(io.StringIO(render(table, 'csv')), dtype={'new_classes': str})
    # the row's name (a method, with its setup where rows differ), then the method and the setup
    assert list(csv.columns[:7]) == ['row', 'step', 'method', 'setup', 'seeds', 'old_classes',
                                     'new_classes']
    assert csv.loc[2, 'new_classes'] == '16-17' and csv.loc[2, 'new'] == 15.0
    assert (csv.loc[2, 'row'], csv.loc[2, 'method'], csv.loc[2, 'setup']) == ('ft', 'ft', 'small')


def test_per_step_rows_of_drawn_class_orders_say_their_classes_differ(tmp_path: Path) -> None:
    root = tmp_path / 'results'
    drawn = [load_protocol('voc-15-1-overlap-random').with_class_order(seed) for seed in (0, 1)]
    assert drawn[0].steps[1] != drawn[1].steps[1]
    for seed, p in enumerate(drawn):
        write_run(root, [uniform(p.classes_seen(t), 0.5) for t in range(6)], protocol=p,
                  run=f'small-seed{seed}', seed=seed)
    store = open_store(root)
    both = per_step(store, drawn[0].name).frame.loc['ft']
    assert both['old_classes'].tolist() == ['differ by run'] * 6
    assert both['new_classes'].tolist() == ['-'] + ['differ by run'] * 5
    one = per_step(store, drawn[0].name, runs=['small-seed1']).frame.loc['ft']
    assert one.at[1, 'new_classes'] == range_label(drawn[1].steps[1])
    assert one.at[0, 'old_classes'] == range_label(drawn[1].steps[0])


def test_per_class_forgetting_table(store_19_1: Path) -> None:
    f = per_class_forgetting(open_store(store_19_1), VOC19).frame
    assert list(f.columns) == ['ft', 'ft_std', 'lwf', 'lwf_std']      # joint has no steps
    assert len(f) == 20 and f.index[0] == '0 background' and f.index[19] == '19 train'
    assert f.at['3 bird', 'ft'] == pytest.approx(25.0)
    assert f.at['3 bird', 'lwf'] == pytest.approx(10.0)


def test_per_class_forgetting_rows_are_in_class_order(tmp_path: Path) -> None:
    """Only classes 1 and 16 scored before the last step (the rest never present in val):
    one row each, class 1's first, whatever order a set of their ids iterates in (16, 1);
    class 1 fell from 80 to 60, class 16 from 80 to 50."""
    root = tmp_path / 'results'
    unscored = {c: None for c in range(21)}
    write_run(root, [{**unscored, 16: 0.8, 1: 0.8}, {**unscored, 16: 0.5, 1: 0.6, 20: 0.3}])
    f = per_class_forgetting(open_store(root), VOC19).frame
    assert list(f.index) == ['1 aeroplane', '16 pottedplant']
    assert f['ft'].tolist() == [pytest.approx(20.0), pytest.approx(30.0)]


def test_latest_run_is_used_and_run_names_pick_others(tmp_path: Path) -> None:
    root = tmp_path / 'results'
    write_two_ft_runs(root, dict(run='a', finished='2026-01-01T00:00:00'),
                      dict(run='b', finished='2026-02-01T00:00:00'))
    store = open_store(root)
    table = leaderboard(store, VOC19)
    assert table.frame.at['ft', 'old'] == pytest.approx(20.0) and table.frame.at['ft', 'seeds'] == 1
    assert any('1 other complete run(s)' in n and ': a;' in n for n in table.notes)
    assert leaderboard(store, VOC19, runs=['a']).frame.at['ft', 'old'] == pytest.approx(60.0)
    with pytest.raises(UserError, match='no complete run matching'):
        leaderboard(store, VOC19, runs=['nope*'])


def test_the_latest_run_is_the_last_finished_whatever_the_time_zone_it_was_made_in(
        tmp_path: Path, monkeypatch) -> None:
    """Stores merged from machines in other time zones: a run finished at 16:30 in California
    (00:30 UTC the next day) finished after one at 00:10 UTC, though its date reads earlier."""
    root = tmp_path / 'results'
    write_two_ft_runs(root, dict(run='california', finished='2026-01-01T16:30:00-08:00'),
                      dict(run='london', finished='2026-01-02T00:10:00+00:00'))
    table = leaderboard(open_store(root), VOC19)
    assert table.frame.at['ft', 'old'] == pytest.approx(60.0)   # california's
    assert any('not used (older): london;' in n for n in table.notes)

    # and run.json records the time with its offset: here Tokyo's, 9 hours ahead of UTC
    monkeypatch.setenv('TZ', 'Asia/Tokyo')
    time.tzset()
    try:
        stamp = now_stamp()
    finally:
        monkeypatch.undo()
        time.tzset()
    assert stamp.endswith('+09:00')
    assert abs(datetime.fromisoformat(stamp).timestamp() - time.time()) < 60


def test_a_run_whose_finish_is_not_a_time_counts_as_the_oldest(tmp_path: Path) -> None:
    """A run.json whose 'finished' does not parse as a time is passed over for a seed's run
    that has one: 'b' (old 20) is used whatever its date, 'a' (old 60, 'finished' garbled)
    is not."""
    root = tmp_path / 'results'
    write_two_ft_runs(root, dict(run='a', finished='not a time'),
                      dict(run='b', finished='2000-01-01T00:00:00'))
    table = leaderboard(open_store(root), VOC19)
    assert table.frame.at['ft', 'old'] == pytest.approx(20.0)
    assert any('not used (older): a;' in n for n in table.notes)


def test_a_config_setting_a_methods_own_hyperparameter_compares_with_joint_on_the_config_without_it(
        tmp_path: Path) -> None:
    """Joint training refuses lwf's loss_kd: a config setting it can have no joint run of its
    own, and is compared with joint's on the config it shares (the runner's shared digest)."""
    root = tmp_path / 'results'
    write_run(root, [uniform(range(21), 0.9)], method='joint', shared_config_digest='digest-small')
    for run, config_name, shared in (('kd10', 'cfgs/kd10.py', 'digest-small'),
                                     ('lr', 'cfgs/lr.py', 'digest-lr')):   # another schedule
        write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}], method='lwf',
                  run=run, config_name=config_name, config_digest=f'digest-{run}',
                  shared_config_digest=shared)
    f = leaderboard(open_store(root), VOC19).frame
    assert f.at['lwf (cfgs/kd10.py)', 'gap_joint'] == pytest.approx(90 - 100 * 12.3 / 21)
    assert math.isnan(f.at['lwf (cfgs/lr.py)', 'gap_joint'])
    # a table of that config alone, whose runs joint's are not, still compares with joint
    chosen = leaderboard(open_store(root), VOC19, config='cfgs/kd10.py').frame
    assert list(chosen.index) == ['lwf']
    assert chosen.at['lwf', 'gap_joint'] == pytest.approx(90 - 100 * 12.3 / 21)


def test_a_row_of_runs_stored_before_and_after_the_shared_digest_finds_joint_whatever_its_order(
        tmp_path: Path) -> None:
    root = tmp_path / 'results'
    write_run(root, [uniform(range(21), 0.9)], method='joint', shared_config_digest='digest-small')
    for seed, shared in ((0, None), (1, 'digest-small')):   # seed 0's run.json lacks the field
        write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}], method='lwf',
                  run=f'kd10-seed{seed}', seed=seed, config_name='cfgs/kd10.py',
                  config_digest='digest-kd10', shared_config_digest=shared)
    f = leaderboard(open_store(root), VOC19).frame
    assert f.at['lwf (cfgs/kd10.py)', 'seeds'] == 2
    assert f.at['lwf (cfgs/kd10.py)', 'gap_joint'] == pytest.approx(90 - 100 * 12.3 / 21)


def test_the_shared_config_digest_leaves_out_the_methods_own_settings_only(tmp_path: Path) -> None:
    small = load_config('small')
    assert shared_config_digest(small) == config_digest(small)   # a config setting none

    def digests(model_settings: str) -> tuple[str, str]:
        config = tmp_path / 'c.py'
        config.write_text(f"_base_ = ['{CONFIGS_DIR / 'small.py'}']\nmodel = dict({model_settings})\n")
        cfg = load_config(str(config))
        return config_digest(cfg), shared_config_digest(cfg)
    own, shared = digests('loss_kd=10.0, temperature=2.0')   # settings of lwf's, of a method of one's own
    assert own != config_digest(small) and shared == config_digest(small)
    assert digests('classifier_dropout=0.2')[1] != config_digest(small)   # every method's setting


def test_the_store_reads_the_shared_settings_that_the_base_segmentor_takes() -> None:
    from cssbench.digests import SHARED_MODEL_SETTINGS
    from cssbench.models import IncrementalSegmentor
    from cssbench.runner import model_setting_parameters
    assert set(SHARED_MODEL_SETTINGS) == {*model_setting_parameters(IncrementalSegmentor), 'type'}


def test_what_differs_between_two_configs_is_said_setting_by_setting() -> None:
    from cssbench.digests import config_differences, sections_digest
    small = load_config('small').to_dict()
    assert config_differences(small, small) == ''

    def changed(**sections) -> dict:
        return {name: {**small[name], **sections.get(name, {})} for name in small}
    assert config_differences(small, changed(schedule=dict(epochs=3, lr=(0.05, 0.001)))) == (
        f'schedule.epochs was {small["schedule"]["epochs"]}, now 3; '
        f'schedule.lr was {json.dumps(list(small["schedule"]["lr"]))}, now [0.05, 0.001]')
    # what decides only how fast is no difference; a setting one config lacks is unset there
    assert config_differences(small, changed(data=dict(num_workers=7), speed=dict(amp=None))) == ''
    assert config_differences(small, changed(model=dict(loss_kd=10.0))) == (
        'model.loss_kd was unset, now 10.0')
    many = changed(schedule=dict(momentum=0.5, nesterov=False, weight_decay=0.0, poly_power=1.0))
    assert config_differences(small, many).endswith('; and 1 more')
    # a part's type first, and a long value cut (compared whole: they differ at the end)
    other = changed(model=dict(backbone=dict(type='cssbench.Other', depth=101, layers=[7] * 40)))
    longer = changed(model=dict(backbone=dict(type='cssbench.Other', depth=101,
                                              layers=[7] * 39 + [8])))
    said = config_differences(small, other)
    assert said.startswith("model.backbone.type was \"cssbench.SmallResNet\", now \"cssbench.Other\"; ")
    assert 'now [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,...; and 1 more' in said
    assert config_differences(other, longer).startswith('model.backbone.layers was [7, 7')
    # values Python finds equal but the digest does not (1.0 and 1) are named, not left out
    linear = changed(schedule=dict(poly_power=1.0))
    assert sections_digest(linear) != sections_digest(changed(schedule=dict(poly_power=1)))
    assert config_differences(linear, changed(schedule=dict(poly_power=1))) == (
        'schedule.poly_power was 1.0, now 1')


def test_how_fast_a_config_loads_and_scores_is_not_part_of_its_digest(tmp_path: Path) -> None:
    small = load_config('small')

    def with_data(settings: str):
        config = tmp_path / 'c.py'
        config.write_text(f"_base_ = ['{CONFIGS_DIR / 'small.py'}']\ndata = dict({settings})\n")
        return load_config(str(config))
    for settings in ('num_workers=7', 'eval_batch_size=3'):
        cfg = with_data(settings)
        assert cfg.data != small.data
        assert config_digest(cfg) == config_digest(small)
        assert shared_config_digest(cfg) == shared_config_digest(small)
    assert config_digest(with_data('batch_size=4')) != config_digest(small)


def test_runs_of_different_configs_are_separate_rows(tmp_path: Path) -> None:
    root = tmp_path / 'results'
    write_two_ft_runs(root, dict(run='x', config_digest='d1'), dict(run='y', config_digest='d2'))
    rows = select_runs(open_store(root), VOC19)
    assert [(r.label, [x.run for x in r.runs]) for r in rows] == [
        ('ft (small@d1)', ['x']), ('ft (small@d2)', ['y'])]
    fig = miou_by_step_figure(VOC19, rows)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ['ft (small@d1)', 'ft (small@d2)']


def test_configs_of_one_name_that_differ_in_epochs_alone_are_named_by_their_epochs(
        tmp_path: Path, capsys) -> None:
    root = tmp_path / 'results'
    common = dict(config_name='cfgs/base.py')
    base = dict(model=dict(type='cssbench.IncrementalSegmentor'), schedule=dict(lr=[0.01, 0.001]))
    of_epochs = lambda epochs, **schedule: dict(base, schedule=dict(base['schedule'], epochs=epochs,
                                                                    **schedule))
    write_two_ft_runs(root, dict(run='x', config=of_epochs(3), **common),
                      dict(run='y', config=of_epochs(1), **common))
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.5), 20: 0.3}], run='s')  # small
    rows = select_runs(open_store(root), VOC19)
    assert [(r.label, [x.run for x in r.runs]) for r in rows] == [   # in order of epochs
        ('ft (cfgs/base.py, 1 epoch)', ['y']), ('ft (cfgs/base.py, 3 epochs)', ['x']),
        ('ft (small)', ['s'])]
    assert main(['table', '--protocol', VOC19, '--results', str(root)]) == 0
    assert '| ft (cfgs/base.py, 3 epochs) |' in capsys.readouterr().out
    # another config of that name and of 3 epochs too: something else differs, the digests say
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.4), 20: 0.3}], run='z',
              config=of_epochs(3, lr=[0.02, 0.001]), **common)
    digests = {r.run: r.config_digest[:6] for r in open_store(root).runs}
    labels = [r.label for r in select_runs(open_store(root), VOC19)]
    assert sorted(labels) == sorted([*(f'ft (cfgs/base.py@{digests[run]})' for run in 'xyz'),
                                     'ft (small)'])
    # and so where they differ in their epochs and more (another lr), or where a run's
    # record does not say its epochs (stored without its config)
    assert sorted(r.label for r in select_runs(open_store(root), VOC19, runs=['y', 'z'])) == sorted([
        f'ft (cfgs/base.py@{digests["y"]})', f'ft (cfgs/base.py@{digests["z"]})'])
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.4), 20: 0.3}], run='u',
              config_digest='d4', **common)
    assert sorted(r.label for r in select_runs(open_store(root), VOC19, runs=['x', 'u'])) == sorted([
        'ft (cfgs/base.py@d4)', f'ft (cfgs/base.py@{digests["x"]})'])


def test_config_chooses_a_config_files_runs_by_its_bare_name_too(tmp_path: Path, capsys) -> None:
    root = tmp_path / 'results'
    for run, config_name in (('s', 'small'), ('a', 'cfgs/anchor.py'), ('b', '/elsewhere/anchor.py')):
        write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.5), 20: 0.3}], run=run,
                  config_name=config_name, config_digest=f'digest-{run}')
    store = open_store(root)

    def chosen(config: str) -> list[str]:
        return [row.label for row in select_runs(store, VOC19, config=config)]
    assert chosen('anchor') == chosen('anchor.py') == ['ft (/elsewhere/anchor.py)', 'ft (cfgs/anchor.py)']
    assert chosen('cfgs/anchor.py') == ['ft']
    assert chosen('small') == ['ft'] and chosen('anch') == chosen('anchor.txt') == []
    assert main(['table', '--protocol', VOC19, '--results', str(root), '--config', 'cfgs/nope.py']) == 2
    assert capsys.readouterr().err.endswith(
        f"no complete run matching --run/--config stored for protocol '{VOC19}'; the configs of its "
        f"runs: /elsewhere/anchor.py, cfgs/anchor.py, small\n")
    # --all and plot list them too; --run narrows them
    for command in (['table', '--all'], ['plot', '--all'], ['plot', '--protocol', VOC19]):
        assert main([*command, '--results', str(root), '--config', 'nope']) == 2
        assert capsys.readouterr().err.endswith(
            f"; the configs of its runs: /elsewhere/anchor.py, cfgs/anchor.py, small\n")
    assert main(['table', '--all', '--results', str(root), '--config', 'nope', '--run', 's']) == 2
    assert capsys.readouterr().err == (
        f'cssbench: error: {root}: no complete run matching --run/--config stored; nothing to '
        f'tabulate; the configs of its runs: small\n')
    assert not (root / 'tables').exists()


def test_runs_of_different_protocols_of_one_name_are_not_averaged(tmp_path: Path, capsys) -> None:
    """Stores merged from two machines, each with its own protocol file named ``mine`` (15-5,
    and 15-2-3): their runs are no seeds of one row; refused, and ``--run`` tables either."""
    root = tmp_path / 'results'
    base = load_protocol('voc-15-5-overlap')
    five = dataclasses.replace(base, name='mine', source=None)
    two_three = dataclasses.replace(five, steps=(base.steps[0], (16, 17), (18, 19, 20)))
    write_run(root, [uniform(range(16), 0.8), uniform(range(21), 0.5)], protocol=five, run='a-seed0')
    write_run(root, [uniform(range(16), 0.8), uniform(range(18), 0.6), uniform(range(21), 0.4)],
              protocol=two_three, run='b-seed1', seed=1)
    for kind in (leaderboard, per_step, per_class_forgetting):
        with pytest.raises(UserError, match=r"runs of 2 different protocols named 'mine' are stored "
                                            r"\(mine/ft/a-seed0, mine/ft/b-seed1\); --run picks"):
            kind(open_store(root), 'mine')
    table = per_step(open_store(root), 'mine', runs=['b-*'])
    assert table.frame['seeds'].tolist() == [1, 1, 1]
    assert table.frame['all'].tolist() == pytest.approx([80.0, 60.0, 40.0])
    refused = "runs of 2 different protocols named 'mine' are stored"
    assert main(['plot', '--all', '--results', str(root)]) == 2
    assert f'cssbench: no plots for mine: {refused}' in capsys.readouterr().err
    # --all writes the other protocols' tables and plots, naming the one it cannot
    write_run(root, [uniform(range(16), 0.8), uniform(range(21), 0.5)], protocol=base)
    assert main(['table', '--all', '--results', str(root)]) == 0
    assert f'no tables for mine: {refused}' in capsys.readouterr().out
    assert sorted(p.name for p in (root / 'tables').glob('*.md')) == sorted(
        f'{base.name}{kind}.md' for kind in ('', '-per-class', '-per-step'))
    assert main(['plot', '--all', '--results', str(root)]) == 0
    assert f'cssbench: no plots for mine: {refused}' in capsys.readouterr().err
    assert not list((root / 'tables').glob('mine*'))


def test_seeds_trained_on_other_data_are_not_averaged(tmp_path: Path) -> None:
    # seed 1 ran on another dataset (another fingerprint): a row of its own, and joint's gap
    # is taken on the same data only
    root = tmp_path / 'results'
    write_two_ft_runs(root, dict(), dict(run='small-seed1', seed=1, dataset_fingerprint='0123456789ab'))
    write_run(root, [uniform(range(21), 0.9)], method='joint')
    table = leaderboard(open_store(root), VOC19)
    assert list(table.frame.index) == ['ft (small, data 012345)', 'ft (small, data fp)',
                                       'joint (small, data fp)']
    assert table.frame['seeds'].tolist() == [1, 1, 1]
    assert table.frame.at['ft (small, data 012345)', 'old'] == pytest.approx(20.0)
    assert table.frame.at['ft (small, data fp)', 'gap_joint'] == pytest.approx(90 - 1230 / 21)
    assert math.isnan(table.frame.at['ft (small, data 012345)', 'gap_joint'])


def test_corrupt_and_partial_run_folders_are_reported_and_skipped(store_19_1: Path) -> None:
    base = store_19_1 / VOC19
    bad = base / 'mib' / 'garbled'
    bad.mkdir(parents=True)
    (bad / 'run.json').write_text('{"protocol": ')
    partial = write_run(store_19_1, [uniform(OLD19, 0.8)], method='sdr')
    record = json.loads((partial / 'run.json').read_text())
    (partial / 'run.json').write_text(json.dumps(dict(record, status='running')))
    (partial / 'steps').mkdir()
    (partial / 'steps' / 'step0.json').write_text('{}')
    short = write_run(store_19_1, [uniform(OLD19, 0.8)], method='ilt')   # 1 of 2 steps
    (base / 'plop' / 'no-metrics').mkdir(parents=True)
    (base / 'plop' / 'no-metrics' / 'run.json').write_text(json.dumps(dict(record, run='no-metrics')))

    store = open_store(store_19_1)
    reasons = {s.path: s.reason for s in store.skipped}
    assert 'not readable JSON' in reasons[f'{VOC19}/mib/garbled']
    assert reasons[f'{VOC19}/sdr/small-seed0'] == "unfinished (status 'running', 1 step(s) done)"
    assert reasons[f'{VOC19}/ilt/small-seed0'] == 'metrics.json holds 1 steps, the run trained 2'
    assert reasons[f'{VOC19}/plop/no-metrics'] == 'metrics.json is missing'
    assert short.name == 'small-seed0'
    md = render(leaderboard(store, VOC19), 'md')
    rows = [line.split(' | ')[0] for line in md.splitlines()
            if line.startswith('| ') and not line.startswith('| method')]
    assert rows == ['| ft', '| joint', '| lwf']
    assert f'skipped {VOC19}/mib/garbled: run.json is not readable JSON' in md


@pytest.mark.parametrize('edit, reason', [
    (lambda step: step['columns']['all'].update(mIoU='0.5'), "step 1: all mIoU '0.5' is not a fraction"),
    (lambda step: step['columns']['all'].update(mIoU=58.5), 'step 1: all mIoU 58.5 is not a fraction'),
    (lambda step: step['columns']['old'].pop('label'), 'step 1: old lacks its label'),
    (lambda step: step['iou'].update({'3': 'x'}), "step 1: IoU 'x' of class '3' is not a fraction"),
    (lambda step: step.pop('step'), "step 1 lacks a valid 'step'")])


def test_a_metrics_file_edited_into_other_than_ious_is_reported_and_skipped(
        store_19_1: Path, tmp_path: Path, edit, reason) -> None:
    """A metrics.json edited by hand (a number typed as a string or in percent, a key lost):
    its run is skipped with why, every table and plot made of the others, none fails."""
    metrics_file = store_19_1 / VOC19 / 'ft' / 'small-seed1' / 'metrics.json'
    metrics = json.loads(metrics_file.read_text())
    edit(metrics['steps'][1])
    metrics_file.write_text(json.dumps(metrics))
    store = open_store(store_19_1)
    assert reason in {s.path: s.reason for s in store.skipped}[f'{VOC19}/ft/small-seed1']
    table = leaderboard(store, VOC19)
    assert table.frame.at['ft', 'seeds'] == 1
    assert table.frame.at['ft', 'all'] == pytest.approx(100 * 12.3 / 21)
    for kind in (per_step, per_class_forgetting):
        assert f'skipped {VOC19}/ft/small-seed1' in render(kind(store, VOC19), 'md')
    assert main(['plot', '--protocol', VOC19, '--results', str(store_19_1),
                 '--out', str(tmp_path / 'plots')]) == 0


def test_a_run_folder_its_reader_cannot_list_is_reported_and_skipped(
        store_19_1: Path, monkeypatch) -> None:
    """A run folder of mode 000 (a colleague's, copied in): named under the table as skipped,
    not left out unsaid. Tests run as root here, which a chmod would not stop: refused by hand."""
    hidden = store_19_1 / VOC19 / 'ft' / 'small-seed1'
    real_iterdir, real_read_text, real_stat = Path.iterdir, Path.read_text, Path.stat

    def refused(path: Path) -> None:
        if path == hidden or path.parent == hidden:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def guarded_iterdir(self):
        refused(self)
        return real_iterdir(self)

    def guarded_read_text(self, *args, **kwargs):
        refused(self)
        return real_read_text(self, *args, **kwargs)

    def guarded_stat(self, *args, **kwargs):
        if self.parent == hidden:
            refused(self)
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, 'iterdir', guarded_iterdir)
    monkeypatch.setattr(Path, 'read_text', guarded_read_text)
    monkeypatch.setattr(Path, 'stat', guarded_stat)
    store = open_store(store_19_1)
    assert [r.run for r in store.runs if r.method == 'ft'] == ['small-seed0']
    reasons = {s.path: s.reason for s in store.skipped}
    assert 'Permission denied' in reasons[f'{VOC19}/ft/small-seed1']
    assert f'skipped {VOC19}/ft/small-seed1: run.json is not readable' in render(
        leaderboard(store, VOC19), 'md')


def _refuse_listing(monkeypatch, folder: Path) -> None:
    """``folder`` cannot be listed, as if of mode 000 (tests run as root, where chmod would not
    stop them)."""
    real_iterdir = Path.iterdir

    def guarded_iterdir(self):
        if self == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, 'iterdir', guarded_iterdir)


def test_a_method_folder_its_reader_cannot_list_is_named_under_the_table(
        store_19_1: Path, monkeypatch) -> None:
    _refuse_listing(monkeypatch, store_19_1 / VOC19 / 'lwf')
    store = open_store(store_19_1)
    assert sorted({r.method for r in store.runs}) == ['ft', 'joint']
    assert (f'skipped {VOC19}/lwf: cannot be listed (Permission denied): its runs are not read'
            in render(leaderboard(store, VOC19), 'md'))


def test_a_protocol_folder_its_reader_cannot_list_is_named_by_table_and_plot(
        store_19_1: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    _refuse_listing(monkeypatch, store_19_1 / VOC19)
    why = f'{VOC19}: cannot be listed (Permission denied): its runs are not read'
    out = ['--results', str(store_19_1), '--out', str(tmp_path / 'tables')]
    assert main(['table', '--all', *out]) == 2
    assert f'no tables for {VOC19}: no complete run (skipped: {why})' in capsys.readouterr().out
    assert main(['table', '--protocol', VOC19, '--results', str(store_19_1)]) == 2
    assert f'(skipped: {why})' in capsys.readouterr().err
    assert main(['plot', '--all', *out]) == 2
    assert f'no complete run stored for {VOC19} (skipped: {why})' in capsys.readouterr().err
    assert not (tmp_path / 'tables').exists()


def test_index_is_rebuilt_when_missing_or_stale(store_19_1: Path) -> None:
    open_store(store_19_1)
    index = json.loads((store_19_1 / INDEX_FILE).read_text())
    assert sorted(index['runs']) == [f'{VOC19}/{m}/small-seed{s}' for m, s in
                                     (('ft', 0), ('ft', 1), ('joint', 0), ('lwf', 0))]

    # A run rewritten after indexing: its stamp changed, so it is read again.
    run_dir = store_19_1 / VOC19 / 'lwf' / 'small-seed0'
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    metrics['steps'][-1]['columns']['old']['mIoU'] = 0.123
    (run_dir / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    assert leaderboard(open_store(store_19_1), VOC19).frame.at['lwf', 'old'] == pytest.approx(12.3)
    # rewritten to the same size: its modification time tells
    metrics['steps'][-1]['columns']['old']['mIoU'] = 0.456
    before = (run_dir / 'metrics.json').stat()
    (run_dir / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    assert (run_dir / 'metrics.json').stat().st_size == before.st_size
    os.utime(run_dir / 'metrics.json', ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert leaderboard(open_store(store_19_1), VOC19).frame.at['lwf', 'old'] == pytest.approx(45.6)
    # put back as rsync -a does, with the same size and modification time: its inode tells
    metrics['steps'][-1]['columns']['old']['mIoU'] = 0.789
    kept = (run_dir / 'metrics.json').stat()
    (run_dir / 'copy.json').write_text(json.dumps(metrics, indent=2))
    os.utime(run_dir / 'copy.json', ns=(kept.st_atime_ns, kept.st_mtime_ns))
    os.replace(run_dir / 'copy.json', run_dir / 'metrics.json')
    assert (run_dir / 'metrics.json').stat().st_size == kept.st_size
    assert leaderboard(open_store(store_19_1), VOC19).frame.at['lwf', 'old'] == pytest.approx(78.9)

    # A run folder removed: gone from the index too; index deleted: rebuilt the same.
    shutil.rmtree(store_19_1 / VOC19 / 'ft' / 'small-seed1')
    open_store(store_19_1)
    assert f'{VOC19}/ft/small-seed1' not in json.loads((store_19_1 / INDEX_FILE).read_text())['runs']
    before = (store_19_1 / INDEX_FILE).read_text()
    (store_19_1 / INDEX_FILE).unlink()
    open_store(store_19_1)
    assert (store_19_1 / INDEX_FILE).read_text() == before

    # The index is what is read while the stamps hold: an entry edited in the index shows.
    index = json.loads(before)
    index['runs'][f'{VOC19}/lwf/small-seed0']['run']['steps'][-1]['columns']['old']['mIoU'] = 0.5
    (store_19_1 / INDEX_FILE).write_text(json.dumps(index))
    assert leaderboard(open_store(store_19_1), VOC19).frame.at['lwf', 'old'] == pytest.approx(50.0)


def refuse_replacing_the_index(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[Path]:
    """Refuse (EPERM) to rename a temporary over ``root``'s index, as a sticky folder does where
    another user owns the index; the temporaries refused are listed in the list returned."""
    refused: list[Path] = []
    real_replace = os.replace

    def guarded_replace(source, target, *args, **kwargs):
        if Path(target) == root / INDEX_FILE:
            refused.append(Path(source))
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(source))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, 'replace', guarded_replace)
    return refused


@pytest.mark.parametrize('refuse_writes, reason', [(mount_read_only, errno.EROFS),
                                                    (refuse_replacing_the_index, errno.EPERM)])


def test_a_store_the_user_cannot_write_is_tabulated_and_plotted(
        store_19_1: Path, tmp_path: Path, capsys, monkeypatch, refuse_writes, reason) -> None:
    """A store shared read-only, or on a read-only mount, is read: its stale index brought up to
    date in memory alone, with a line saying so, and left as it was, no temporary beside it."""
    table = ['table', '--protocol', VOC19, '--results', str(store_19_1)]
    assert main(table) == 0
    capsys.readouterr()
    # stale since: a run rewritten (chmod -R a-w alone makes every stamp stale: the ctime)
    run_dir = store_19_1 / VOC19 / 'lwf' / 'small-seed0'
    metrics = json.loads((run_dir / 'metrics.json').read_text())
    metrics['steps'][-1]['columns']['old']['mIoU'] = 0.123
    (run_dir / 'metrics.json').write_text(json.dumps(metrics))
    index = (store_19_1 / INDEX_FILE).read_bytes()
    store_files = sorted(os.listdir(store_19_1))
    note = (f'cssbench: note: {store_19_1 / INDEX_FILE}: not updated ({os.strerror(reason)}); '
            f'the runs changed since it was written are read from their folders each time\n')

    out = tmp_path / 'elsewhere'
    with monkeypatch.context() as read_only:
        refused = refuse_writes(read_only, store_19_1)
        assert main(table) == 0
        read_only_table = capsys.readouterr()
        assert read_only_table.err == note and refused
        for command in ('table', 'plot'):
            assert main([command, '--all', '--results', str(store_19_1), '--out', str(out)]) == 0
            assert capsys.readouterr().err == note
    assert (store_19_1 / INDEX_FILE).read_bytes() == index
    assert sorted(os.listdir(store_19_1)) == store_files   # no temporary left
    assert '| lwf | 1 | 12.3 |' in read_only_table.out   # the run as rewritten, not as indexed
    assert (out / f'{VOC19}.md').is_file() and (out / f'{VOC19}-miou.png').is_file()

    # writable again: the same table, and the index brought up to date
    assert main(table) == 0
    assert capsys.readouterr() == (read_only_table.out, '')
    assert (store_19_1 / INDEX_FILE).read_bytes() != index


@pytest.mark.parametrize('command', [['table', '--all'], ['plot', '--protocol', VOC19]])
def test_tables_into_a_store_the_user_cannot_write_are_refused_naming_out(
        store_19_1: Path, capsys, monkeypatch, command) -> None:
    """``table --all`` and ``plot`` write into ``<results>/tables``: on a read-only store they
    are refused in a line naming the option and ``--out``, as ``run`` names ``--results``."""
    assert main(['table', '--protocol', VOC19, '--results', str(store_19_1)]) == 0
    capsys.readouterr()
    mount_read_only(monkeypatch, store_19_1)
    assert main([*command, '--results', str(store_19_1)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == (f'cssbench: error: --results {store_19_1}: cannot write in {store_19_1} '
                   f'({os.strerror(errno.EROFS)}); --out DIR writes the tables and plots elsewhere')
    assert not (store_19_1 / 'tables').exists()


def test_published_numbers_beside_our_rows(tmp_path: Path) -> None:
    root = tmp_path / 'results'
    p = load_protocol('voc-15-1-overlap')
    ious = []
    for t in range(6):
        iou = uniform(p.classes_seen(t), 0.5)
        iou[0] = 0.9
        ious.append(iou)
    write_run(root, ious, protocol='voc-15-1-overlap', method='sdr')
    table = leaderboard(open_store(root), 'voc-15-1-overlap')
    f = table.frame
    old = (0.9 + 15 * 0.5) / 16 * 100        # 0-15, background included
    all_ = (0.9 + 20 * 0.5) / 21 * 100
    # paper_tables.csv: SDR 15-1 0-15 = 47.3 and all = 48.7, variant not stated
    assert f.at['sdr', 'paper_old'] == 47.3 and f.at['sdr', 'diff_old'] == pytest.approx(old - 47.3)
    assert f.at['sdr', 'paper_all'] == 48.7 and f.at['sdr', 'diff_all'] == pytest.approx(all_ - 48.7)
    assert math.isnan(f.at['sdr', 'paper_new'])
    # neither number says overlapped or disjoint: both are starred in the cells, and the CSV
    # says so in a column of its own
    md = render(table, 'md')
    assert '| paper 0-15 | diff 0-15 | paper all | diff all |' in md
    assert f'| 47.3\\* | {old - 47.3:+.1f} | 48.7\\* | {all_ - 48.7:+.1f} |' in md
    assert f'47.3* & {old - 47.3:+.1f} & 48.7* & {all_ - 48.7:+.1f}' in render(table, 'latex')
    csv = pd.read_csv(io.StringIO(render(table, 'csv')))
    assert list(csv.columns[:3]) == ['row', 'method', 'setup']
    assert csv.loc[0, 'paper_all'] == 48.7 and not csv.loc[0, 'paper_all_variant_stated']
    # the overlapped 1-15 number is for other classes: ours over 1-15 is given beside it
    assert any('over classes 1-15: 44.7 (SDR (CVPR 2021)' in n and 'ours over the same classes 50.0 (+5.3)' in n
               for n in table.notes)
    # the file's caveat on a number goes with it
    assert any(n.startswith('published sdr all: 48.7* (') and 'verify against the paper' in n for n in table.notes)
    assert '\n- \\* the source does not state' in md


def test_ours_beside_a_number_published_over_other_classes_is_mean_plus_minus_std_over_seeds(
        tmp_path: Path) -> None:
    """Two sdr seeds on VOC 15-1, every class at 0.5 and 0.3 (background 0.9): over SDR's
    published 1-15 (44.7), ours is 40.0 ± 14.1 (std of 50 and 30), 4.7 below; the note is
    markdown text, not LaTeX."""
    root = tmp_path / 'results'
    p = load_protocol('voc-15-1-overlap')
    for seed, value in enumerate((0.5, 0.3)):
        ious = [{**uniform(p.classes_seen(t), value), 0: 0.9} for t in range(6)]
        write_run(root, ious, protocol=p, method='sdr', run=f'small-seed{seed}', seed=seed)
    notes = leaderboard(open_store(root), p.name).notes
    assert any('over classes 1-15: 44.7 (SDR (CVPR 2021)' in n
               and n.endswith('ours over the same classes 40.0 ± 14.1 (-4.7)') for n in notes)


def _steps_at(protocol: Protocol, value: float, background: float | None = None) -> list[dict]:
    ious = []
    for t in range(protocol.num_steps):
        ious.append(uniform(protocol.classes_seen(t), value))
        ious[-1][0] = value if background is None else background
    return ious


def test_the_notes_name_each_runs_regime_and_warn_where_a_row_mixes_regimes(tmp_path: Path) -> None:
    root = tmp_path / 'results'
    one_gpu = dict(device='cuda', amp='bfloat16', channels_last=True, world_size=1,
                   batch_per_process=24, sync_bn=False)
    four_gpus = dict(one_gpu, world_size=4, batch_per_process=6, sync_bn=True)
    write_two_ft_runs(root, dict(speed=one_gpu), dict(run='small-seed1', seed=1, speed=four_gpus))
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.7), 20: 0.2}], method='lwf')
    notes = leaderboard(open_store(root), VOC19).notes
    assert ('ft (small): small-seed0 (seed 0, 2026-01-01T00:00:00, 01234567, cuda bfloat16), '
            'small-seed1 (seed 1, 2026-01-01T00:00:00, 01234567, cuda bfloat16, 4 processes of '
            'batch 6, SyncBN)') in notes
    assert ('  ft averages runs trained in 2 regimes (cuda bfloat16; cuda bfloat16, 4 processes '
            'of batch 6, SyncBN): they can differ by more than their seeds') in notes
    # a run whose record predates the regime's; one regime in a row: no warning
    assert 'lwf (small): small-seed0 (seed 0, 2026-01-01T00:00:00, 01234567, regime unknown)' in notes
    assert not any(n.startswith('  lwf averages') for n in notes)


def test_the_notes_warn_where_a_row_averages_runs_of_other_method_settings(tmp_path: Path) -> None:
    # One config, two revisions of lwf's code: its default distillation weight changed between.
    root = tmp_path / 'results'
    write_two_ft_runs(root, dict(method='lwf', method_settings=dict(loss_kd=100.0, kd_alpha=1.0)),
                      dict(method='lwf', run='small-seed1', seed=1,
                           method_settings=dict(loss_kd=10.0, kd_alpha=1.0)))
    write_two_ft_runs(root, dict(method_settings={}), dict(run='small-seed1', seed=1))
    notes = leaderboard(open_store(root), VOC19).notes
    assert ('  lwf averages runs trained with other settings of the method (loss_kd 100.0 or 10.0), '
            'under one config: a default in its code changed between them') in notes
    # ft's second run predates the record: nothing to compare
    assert not any(n.startswith('  ft averages') for n in notes)


def test_the_notes_mark_a_run_whose_code_had_changes_not_committed(tmp_path: Path) -> None:
    root = tmp_path / 'results'
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.7), 20: 0.2}],
              git_revision='0123456789abcdef+dirty')
    notes = leaderboard(open_store(root), VOC19).notes
    assert 'ft (small): small-seed0 (seed 0, 2026-01-01T00:00:00, 01234567+dirty, regime unknown)' in notes


@pytest.mark.parametrize('speed', [None, dict(device='cuda', amp='bfloat16', world_size=None),
                                   dict(device='cuda', amp=None, world_size=1),
                                   dict(device='cuda', amp='bfloat16', world_size='2'), [1, 2],
                                   dict(device='cuda', amp='bfloat16', world_size=2, sync_bn=True),
                                   dict(device='cuda', amp='bfloat16', world_size=2,
                                        batch_per_process=12, sync_bn='no')])


def test_a_run_of_unknown_or_odd_regime_is_tabled_and_mixes_with_no_warning(tmp_path, speed) -> None:
    # one seed with a readable regime, one with none or an odd one (a record edited by hand)
    root = tmp_path / 'results'
    cpu = dict(device='cpu', amp='float32', world_size=1)
    write_two_ft_runs(root, dict(speed=cpu), dict(run='small-seed1', seed=1, speed=speed))
    notes = leaderboard(open_store(root), VOC19).notes
    assert ('ft (small): small-seed0 (seed 0, 2026-01-01T00:00:00, 01234567, cpu float32), '
            'small-seed1 (seed 1, 2026-01-01T00:00:00, 01234567, regime unknown)') in notes
    assert not any('averages runs trained in' in n for n in notes)


def test_published_numbers_match_only_the_papers_class_order(tmp_path: Path) -> None:
    # a drawn class order has the 15-1 step sizes, but other classes in each step
    root = tmp_path / 'results'
    drawn = load_protocol('voc-15-1-overlap-random').with_class_order(0)
    write_run(root, _steps_at(drawn, 0.5), protocol=drawn, method='sdr')
    table = leaderboard(open_store(root), drawn.name)
    assert math.isnan(table.frame.at['sdr', 'paper_all'])
    assert not any('published' in n and 'over classes' in n for n in table.notes)
    assert table.notes[0] == ('the classes come in a drawn order (class_order: random; the '
                              'reference learns them in id order)')
    assert table.notes[1].startswith("no published numbers shown: the papers' settings learn the "
                                     "classes in id order")


def test_published_numbers_match_only_the_papers_central_crop(tmp_path: Path) -> None:
    # VOC 15-1 in the papers' order, scored on whole images: the papers' numbers are of crops
    root = tmp_path / 'results'
    whole = dataclasses.replace(load_protocol('voc-15-1-overlap'), name='voc-15-1-whole',
                                eval_crop='whole')
    write_run(root, _steps_at(whole, 0.5), protocol=whole, method='sdr')
    table = leaderboard(open_store(root), whole.name)
    assert math.isnan(table.frame.at['sdr', 'paper_all'])
    assert not any('published' in n and 'over classes' in n for n in table.notes)
    assert table.notes[:2] == [
        'evaluation scores whole images at their own resolution (eval_crop: whole; the reference '
        'scores the central crop)',
        "no published numbers shown: the papers score each image's central crop, and this "
        'protocol whole images']


def test_tables_name_the_protocols_conventions_that_are_not_the_references(tmp_path: Path) -> None:
    root = tmp_path / 'results'
    plop = load_protocol('voc-15-1-overlap-plop')
    write_run(root, _steps_at(plop, 0.5), protocol=plop)
    write_run(root, _steps_at(load_protocol('voc-15-1-overlap'), 0.5), protocol='voc-15-1-overlap')
    expected = ['training ignores the 255 boundary band (train_ignore: ignore; the reference '
                'trains it as background)',
                'evaluation scores classes not yet learned as background (eval_unseen: '
                'background; the reference ignores them)']
    store = open_store(root)
    for table in (per_step(store, plop.name), per_class_forgetting(store, plop.name)):
        assert table.notes[:2] == expected
    assert not any(n.startswith(('training ', 'evaluation ')) for n in
                   leaderboard(store, 'voc-15-1-overlap').notes)


def test_ade_papers_0_100_is_our_1_100(tmp_path: Path) -> None:
    # ADE20K never scores class 0: SDR's "0-100" averages the classes our "1-100" does
    root = tmp_path / 'results'
    write_run(root, _steps_at(load_protocol('ade-100-50'), 0.4, background=0.9),
              protocol='ade-100-50', method='sdr')
    table = leaderboard(open_store(root), 'ade-100-50')
    assert table.frame.at['sdr', 'paper_old'] == 40.52
    assert table.frame.at['sdr', 'diff_old'] == pytest.approx(40.0 - 40.52)
    assert '| paper 1-100 | diff 1-100 |' in render(table, 'md')


def test_a_method_without_published_numbers_is_told_which_methods_have_them(tmp_path: Path) -> None:
    root = tmp_path / 'results'
    write_run(root, _steps_at(load_protocol('voc-15-1-disjoint'), 0.5), protocol='voc-15-1-disjoint')
    notes = leaderboard(open_store(root), 'voc-15-1-disjoint').notes
    assert 'published numbers for this setting are for sdr only (data/paper_tables.csv)' in notes


def test_row_names_are_escaped_in_markdown_and_latex(tmp_path: Path) -> None:
    root = tmp_path / 'results'
    write_two_ft_runs(root, dict(run='x', config_digest='d1'), dict(run='y', config_digest='d2'))
    for path in (root / VOC19 / 'ft').glob('*/run.json'):
        record = json.loads(path.read_text())
        path.write_text(json.dumps(dict(record, config_name='cfgs/r50|bs_8^{~}$.py')))
    table = leaderboard(open_store(root), VOC19)
    row = next(line for line in render(table, 'md').splitlines() if line.startswith('| ft'))
    assert row.startswith('| ft (cfgs/r50\\|bs_8^{~}$.py@d1) | 1 | ')
    latex = render(table, 'latex')
    assert 'ft (cfgs/r50|bs\\_8\\textasciicircum{}\\{\\textasciitilde{}\\}\\$.py@d1) & 1 & ' in latex


def test_no_published_numbers_for_the_synthetic_dataset(tmp_path: Path) -> None:
    root = tmp_path / 'results'
    write_run(root, [uniform(range(20), 0.8), {**uniform(range(20), 0.6), 20: 0.3}],
              protocol='synth-19-1-overlap', method='sdr')
    table = leaderboard(open_store(root), 'synth-19-1-overlap')
    assert "no published numbers for this setting in data/paper_tables.csv (dataset 'synth')" in table.notes
    assert 'paper' not in render(table, 'md').splitlines()[2]


def test_miou_figure_has_a_line_per_method_in_each_panel(store_19_1: Path) -> None:
    rows = select_runs(open_store(store_19_1), VOC19)
    fig = miou_by_step_figure(VOC19, rows)
    assert [ax.get_title() for ax in fig.axes] == ['all classes', 'old classes (0-19)',
                                                 'new classes (added so far: 20 by the end)']
    for ax in fig.axes:
        assert len(ax.get_lines()) == 3            # ft, lwf, and joint's dashed level
        assert sorted(line.get_label() for line in ax.get_lines()) == ['ft', 'joint', 'lwf']
    ft = next(line for line in fig.axes[1].get_lines() if line.get_label() == 'ft')
    np.testing.assert_allclose(ft.get_ydata(), [75.0, 50.0])   # old: mean over the two seeds
    assert len(fig.axes[1].collections) == 1                  # ft's ± std band (two seeds)


def test_class_heat_map_is_class_by_step(store_19_1: Path) -> None:
    run = next(r for r in open_store(store_19_1).runs if r.method == 'ft' and r.seed == 0)
    fig = class_iou_figure(run)
    grid = fig.axes[0].images[0].get_array()
    assert grid.shape == (21, 2)
    assert grid[3, 0] == pytest.approx(80.0) and grid[20, 1] == pytest.approx(30.0)
    assert grid.mask[20, 0] and not grid.mask[20, 1]     # class 20 unseen at step 0
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ['0', '1']
    joint = next(r for r in open_store(store_19_1).runs if r.joint)
    ticks = class_iou_figure(joint).axes[0].get_xticklabels()
    assert [t.get_text() for t in ticks] == ['all classes']   # one step, not the protocol's 0


def test_the_cli_keeps_true_copies_of_the_values_it_does_not_import() -> None:
    # copies, so that --help imports neither pandas, numpy nor mmengine
    import cssbench.cli
    import cssbench.config
    import cssbench.synth
    import cssbench.tables
    assert cssbench.cli.FORMATS == cssbench.tables.FORMATS
    assert cssbench.cli.SYNTH_DEFAULTS == cssbench.synth.SYNTH_DEFAULTS
    assert cssbench.cli.CPU_CONFIG == cssbench.config.CPU_CONFIG


def test_cli_table_all_and_plot_write_valid_files(store_19_1: Path, capsys) -> None:
    results = str(store_19_1)
    assert main(['table', '--protocol', VOC19, '--results', results, '--format', 'latex']) == 0
    assert '\\begin{tabular}' in capsys.readouterr().out
    assert main(['table', '--all', '--results', results]) == 0
    tables = store_19_1 / 'tables'
    assert sorted(p.name for p in tables.iterdir()) == sorted(
        [f'{VOC19}{kind}.{ext}' for kind in ('', '-per-step', '-per-class') for ext in ('md', 'csv', 'tex')]
        + ['.cssbench-written.json'])
    assert main(['plot', '--protocol', VOC19, '--results', results]) == 0
    pngs = sorted(p.name for p in tables.glob('*.png'))
    assert pngs == [f'{VOC19}-ft-small-seed0-iou.png', f'{VOC19}-joint-small-seed0-iou.png',
                    f'{VOC19}-lwf-small-seed0-iou.png', f'{VOC19}-miou.png']
    for name in pngs:
        with Image.open(tables / name) as im:
            im.verify()
            assert im.format == 'PNG' and im.size[0] > 300
    assert not [f for f in os.listdir(tables) if f.endswith('.tmp')]


def test_tables_and_plots_of_runs_gone_are_removed_and_nothing_else(store_19_1: Path, capsys) -> None:
    """The tables folder shows what the store holds: a heat map or table that the last command
    did not write again (its run deleted, or not chosen) is removed, saying so; a file it did
    not write is kept."""
    results, tables = str(store_19_1), store_19_1 / 'tables'
    tables.mkdir()
    mine = tables / f'{VOC19}-ft-mine-iou.png'   # the user's, named like ours
    mine.write_text('kept')
    for command in ('table', 'plot'):
        assert main([command, '--all', '--results', results]) == 0
    lwf_map = tables / f'{VOC19}-lwf-small-seed0-iou.png'
    assert lwf_map.is_file() and (tables / f'{VOC19}-per-class.md').is_file()
    capsys.readouterr()

    shutil.rmtree(store_19_1 / VOC19 / 'lwf')
    assert main(['plot', '--protocol', VOC19, '--results', results]) == 0
    out = capsys.readouterr().out
    assert f'removed {lwf_map}: an earlier `cssbench plot` wrote it, this one did not\n' in out
    assert not lwf_map.exists() and (tables / f'{VOC19}-ft-small-seed0-iou.png').is_file()

    # only joint left: no per-class table, saying why; the per-class files removed
    shutil.rmtree(store_19_1 / VOC19 / 'ft')
    assert main(['table', '--all', '--results', results]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"no per-class table: protocol '{VOC19}': only joint runs stored; "
                      f"forgetting needs steps")
    assert sorted(out[1:4]) == [f'removed {tables / f"{VOC19}-per-class.{ext}"}: an earlier '
                                f'`cssbench table` wrote it, this one did not'
                                for ext in ('csv', 'md', 'tex')]
    assert out[4:] == [f'wrote 6 files to {tables}/']
    assert not list(tables.glob('*-per-class.*')) and (tables / f'{VOC19}.md').is_file()
    assert mine.read_text() == 'kept'


def test_cli_table_errors(tmp_path: Path, capsys, monkeypatch) -> None:
    assert main(['table', '--protocol', VOC19, '--results', str(tmp_path / 'none')]) == 2
    assert capsys.readouterr().err.endswith(
        f"no complete run stored for protocol '{VOC19}'; `cssbench run --protocol {VOC19} "
        f"--results {tmp_path / 'none'}` makes one\n")
    # the advice is a command to paste: a config chosen, a folder quoted for the shell
    spaced = tmp_path / 'my results'
    assert main(['table', '--protocol', VOC19, '--results', str(spaced), '--config', 'deeplabv3-r101']) == 2
    assert capsys.readouterr().err.endswith(
        f"`cssbench run --protocol {VOC19} --config deeplabv3-r101 --results '{spaced}'` makes one\n")
    monkeypatch.chdir(tmp_path)   # the default results folder: the advice needs no --results
    assert main(['table', '--protocol', VOC19]) == 2
    assert capsys.readouterr().err.endswith(f"`cssbench run --protocol {VOC19}` makes one\n")
    assert main(['table', '--results', str(tmp_path)]) == 2
    assert 'give --protocol' in capsys.readouterr().err
    # only a run still training: named, with why it is not tabulated
    run_dir = write_run(tmp_path / 'some', [uniform(OLD19, 0.5)])
    record = json.loads((run_dir / 'run.json').read_text())
    (run_dir / 'run.json').write_text(json.dumps(dict(record, status='running')))
    assert main(['table', '--protocol', VOC19, '--results', str(tmp_path / 'some')]) == 2
    assert capsys.readouterr().err.endswith(
        f"`cssbench run --protocol {VOC19} --results {tmp_path / 'some'}` makes one (skipped: "
        f"{VOC19}/ft/small-seed0: "
        f"unfinished (status 'running', 0 step(s) done))\n")


def test_cli_table_errors_name_what_is_wrong(store_19_1: Path, tmp_path: Path, capsys) -> None:
    results = str(store_19_1)
    assert main(['table', '--protocol', 'voc-19-1-overlpa', '--results', results]) == 2
    assert capsys.readouterr().err.endswith(
        f"protocol 'voc-19-1-overlpa'; stored protocols: {VOC19}\n")
    assert main(['table', '--protocol', VOC19, '--results', results, '--out', str(tmp_path)]) == 2
    assert f'--out {tmp_path}: a folder; give the table a file name' in capsys.readouterr().err
    a_file = tmp_path / 'table.md'
    a_file.write_text('kept')
    for command in ('table', 'plot'):
        assert main([command, '--all', '--results', results, '--out', str(a_file)]) == 2
        assert f'{a_file}: a file, where a folder' in capsys.readouterr().err
    inside_a_file = a_file / 'table.md'   # refused as --out's folder is, naming the file in the way
    assert main(['table', '--protocol', VOC19, '--results', results, '--out', str(inside_a_file)]) == 2
    assert f'--out {inside_a_file}: {a_file} is not a folder' in capsys.readouterr().err
    assert a_file.read_text() == 'kept' and sorted(os.listdir(tmp_path)) == ['results', 'table.md']


@pytest.mark.parametrize('command, options, says', [
    ('table', ['--protocol', VOC19], "table --all writes every protocol's tables, in every format: "
                                     "drop --protocol, or --all"),
    ('table', ['--format', 'csv', '--per-step'], "table --all writes every protocol's tables, in "
                                                 "every format: drop --format and --per-step, or --all"),
    ('table', ['--per-class'], "table --all writes every protocol's tables, in every format: "
                               "drop --per-class, or --all"),
    ('plot', ['--protocol', VOC19], 'plot --all plots every protocol: drop --protocol, or --all'),
])


def test_all_refuses_the_options_it_would_ignore(store_19_1: Path, capsys, command, options,
                                                 says) -> None:
    """--all writes every protocol in every format: a --protocol, --format or kind given with
    it would be ignored (a second protocol's tables written, a csv asked for and not made)."""
    out = store_19_1.parent / 'tables'
    assert main([command, '--all', *options, '--results', str(store_19_1), '--out', str(out)]) == 2
    assert capsys.readouterr().err == f'cssbench: error: {says}\n'
    assert not out.exists()


def test_a_stored_runs_digest_is_its_configs_for_a_dict_keyed_by_numbers(tmp_path: Path) -> None:
    from cssbench.digests import stored_digests
    config = tmp_path / 'c.py'
    config.write_text(f"_base_ = ['{CONFIGS_DIR / 'small.py'}']\n"
                      "class_weight = {2: 1.0, 10: 2.0, -1: 0.5}\nmarks = {True: 1, 'x': 2}\n")
    cfg = load_config(str(config))
    record = json.loads(json.dumps(dict(config=cfg.to_dict()), indent=1))   # as run.json holds it
    assert stored_digests(record) == (config_digest(cfg), shared_config_digest(cfg))
    small = load_config('small')   # a config whose keys are all names: its digest as before
    sections = {k: v for k, v in small.to_dict().items() if k != 'speed'}
    sections['data'] = {k: v for k, v in sections['data'].items()
                        if k not in ('num_workers', 'eval_batch_size')}
    assert config_digest(small) == hashlib.sha256(
        json.dumps(sections, sort_keys=True).encode()).hexdigest()[:16]


def test_a_table_chosen_by_run_takes_the_gap_to_the_joint_row_it_shows(tmp_path: Path) -> None:
    """--run choosing joint's seed-0 run shows that run: every gap is to that row's all (and
    joint's own gap is 0), not to the mean over every joint seed stored; a choice without a
    joint run still compares with the protocol's."""
    root = tmp_path / 'results'
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}])
    write_run(root, [uniform(range(21), 0.9)], method='joint', run='j-seed0')
    write_run(root, [uniform(range(21), 0.7)], method='joint', run='j-seed1', seed=1)
    ft_all = 100 * 12.3 / 21
    store = open_store(root)
    chosen = leaderboard(store, VOC19, runs=['small-seed0', 'j-seed0']).frame
    assert chosen.at['joint', 'all'] == pytest.approx(90.0)
    assert chosen.at['joint', 'gap_joint'] == 0
    assert chosen.at['ft', 'gap_joint'] == pytest.approx(90 - ft_all)
    ft_only = leaderboard(store, VOC19, runs=['small-seed0'])
    assert list(ft_only.frame.index) == ['ft']
    assert ft_only.frame.at['ft', 'gap_joint'] == pytest.approx(80 - ft_all)
    # which the notes say, as they do not where the joint row shown gives it
    unshown = ('gap to joint for ft: from joint runs of the protocol that this table does not '
               'show (same config and data)')
    assert unshown in render(ft_only, 'md')
    assert 'does not show' not in render(leaderboard(store, VOC19, runs=['small-seed0', 'j-seed0']), 'md')


def test_a_run_name_that_chooses_no_run_is_refused_with_the_names_stored(store_19_1: Path,
                                                                          capsys) -> None:
    """--run naming no stored run lists the run names there are, as --config lists the configs,
    where it advised storing a run with `cssbench run`, whose run would not bear that name."""
    results = str(store_19_1)
    for command in (['table', '--protocol', VOC19], ['plot', '--protocol', VOC19], ['table', '--all'],
                    ['plot', '--all']):
        assert main([*command, '--results', results, '--run', 'smal-seed0']) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and 'cssbench run' not in err
        assert err.endswith('; the names of its runs: small-seed0, small-seed1\n')
    # --run and --config: the configs of the runs --run chose, where it chose some
    assert main(['table', '--protocol', VOC19, '--results', results, '--run', 'small-seed1',
                 '--config', 'nope']) == 2
    assert capsys.readouterr().err.endswith('; the configs of its runs: small\n')
    assert main(['table', '--protocol', VOC19, '--results', results, '--run', 'nope',
                 '--config', 'small']) == 2
    assert capsys.readouterr().err.endswith('; the names of its runs: small-seed0, small-seed1\n')
    assert not (store_19_1 / 'tables').exists()


def test_rows_without_published_numbers_beside_rows_with_them_are_named(tmp_path: Path) -> None:
    """Where sdr has published numbers and ft none, a note says that ft's '-' in the paper
    columns is for want of a published number, as the note does where no row has one."""
    root = tmp_path / 'results'
    p = load_protocol('voc-15-1-overlap')
    for method in ('ft', 'sdr', 'lwf'):
        write_run(root, _steps_at(p, 0.5), protocol=p, method=method)
    table = leaderboard(open_store(root), p.name)
    assert math.isnan(table.frame.at['ft', 'paper_all']) and table.frame.at['sdr', 'paper_all'] == 48.7
    assert ('no published numbers for ft, lwf in this setting (data/paper_tables.csv has them '
            'for sdr only)') in table.notes
    assert '- no published numbers for ft, lwf in this setting' in render(table, 'md')


def test_rows_without_a_joint_run_to_compare_with_are_named(tmp_path: Path) -> None:
    """A row's gap to joint left '-' is explained in the notes: no joint run stored, or none of
    the row's config and data."""
    root = tmp_path / 'results'
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}])
    notes = leaderboard(open_store(root), VOC19).notes
    assert 'no gap to joint: no joint run of this protocol is stored' in notes
    write_run(root, [uniform(range(21), 0.9)], method='joint', shared_config_digest='digest-small')
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}], method='lwf',
              run='lr', config_name='cfgs/lr.py', config_digest='digest-lr',
              shared_config_digest='digest-lr')
    table = leaderboard(open_store(root), VOC19)
    assert math.isnan(table.frame.at['lwf (cfgs/lr.py)', 'gap_joint'])
    assert not math.isnan(table.frame.at['ft (small)', 'gap_joint'])
    assert ('no gap to joint for lwf (cfgs/lr.py): no joint run of its config (but for the '
            "method's own settings) on the same data") in table.notes


def test_joint_levels_of_several_setups_are_told_apart_in_the_mIoU_figure(tmp_path: Path) -> None:
    """Two configs, each with its joint run: their black levels differ in their dashes, as
    their legend entries must; one joint row alone is dashed."""
    root = tmp_path / 'results'
    for digest, level in (('d1', 0.9), ('d2', 0.6)):
        write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.5), 20: 0.3}], run=f'ft-{digest}',
                  config_digest=digest)
        write_run(root, [uniform(range(21), level)], method='joint', run=f'joint-{digest}',
                  config_digest=digest)
    fig = miou_by_step_figure(VOC19, select_runs(open_store(root), VOC19))
    joints = [line for line in fig.axes[0].get_lines() if line.get_label().startswith('joint')]
    assert [line.get_label() for line in joints] == ['joint (small@d1)', 'joint (small@d2)']
    assert all(line.get_color() == 'black' for line in joints)
    assert joints[0].get_linestyle() != joints[1].get_linestyle()
    legend = fig.axes[-1].get_legend()
    handles = {text.get_text(): handle for text, handle in zip(legend.get_texts(), legend.legend_handles)}
    assert handles['joint (small@d1)'].get_linestyle() != handles['joint (small@d2)'].get_linestyle()
    one = miou_by_step_figure(VOC19, select_runs(open_store(root), VOC19, runs=['*-d1']))
    (joint,) = [line for line in one.axes[0].get_lines() if line.get_label() == 'joint']
    assert joint.get_color() == 'black' and joint.get_linestyle() == '--'


def test_plot_of_a_protocol_without_runs_says_what_is_stored_as_table_does(store_19_1: Path,
                                                                          tmp_path: Path, capsys) -> None:
    for results, says in ((store_19_1, f"no complete run stored for protocol 'voc-19-1-overlpa'; "
                                        f"stored protocols: {VOC19}\n"),
                          (tmp_path / 'none', f"no complete run stored for protocol 'voc-19-1-overlpa'; "
                                              f"stored protocols: none\n")):
        for command in ('table', 'plot'):
            assert main([command, '--protocol', 'voc-19-1-overlpa', '--results', str(results)]) == 2
            assert capsys.readouterr().err == f'cssbench: error: {results}: {says}'
    assert main(['plot', '--protocol', 'voc-15-1-overlap', '--results', str(store_19_1)]) == 2
    assert capsys.readouterr().err.endswith(
        f"`cssbench run --protocol voc-15-1-overlap --results {store_19_1}` makes one\n")
    assert not (store_19_1 / 'tables').exists()


def test_a_protocol_file_naming_runs_of_another_protocol_is_refused_by_table_and_plot(
        tmp_path: Path, capsys) -> None:
    # the same name, other modes: the stored runs are of the overlapped one
    files = {}
    for mode in ('overlap', 'disjoint'):
        files[mode] = tmp_path / f'mine-{mode}.yaml'
        files[mode].write_text(f'name: mine-19-1\ndataset: voc\nmode: {mode}\nsteps: ["0-19", 20]\n')
    root = tmp_path / 'results'
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}],
              protocol=load_protocol(str(files['overlap'])))
    assert main(['table', '--protocol', str(files['overlap']), '--results', str(root)]) == 0
    assert '| ft | 1 |' in capsys.readouterr().out
    for command in ('table', 'plot'):
        assert main([command, '--protocol', str(files['disjoint']), '--results', str(root)]) == 2
        printed = capsys.readouterr()
        assert printed.out == ''
        assert printed.err == (f"cssbench: error: {files['disjoint']}: another protocol named "
                               f"'mine-19-1' has runs stored ({root / 'mine-19-1' / 'ft' / 'small-seed0'}); "
                               f"their tables are not of this one\n")
    assert not (root / 'tables').exists()
    drawn = tmp_path / 'drawn.yaml'   # its runs' orders, drawn by their seeds, are its own
    drawn.write_text('name: drawn-19-1\ndataset: voc\nmode: overlap\nclass_order: random\n'
                     'steps: ["0-19", 20]\n')
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}],
              protocol=load_protocol(str(drawn)).with_class_order(3), seed=3, run='small-seed3')
    assert main(['table', '--protocol', str(drawn), '--results', str(root)]) == 0


def test_plots_of_names_too_long_for_a_file_name_are_written_under_shortened_names(
        tmp_path: Path, capsys) -> None:
    """A protocol's and a run's names may be 255 characters each (plain names); joined into
    a plot's file name they were refused by the file system ('File name too long', the plot
    command failing half-way). The longest names are cut (the method's kept), and a digest
    of the whole marks the name."""
    from cssbench.io import MAX_FILE_NAME, fitting_file_name
    from cssbench.protocols import parse_protocol
    root = tmp_path / 'results'
    protocol = parse_protocol(dict(name='p' * 250, dataset='voc', mode='overlap',
                                   steps=[list(range(20)), 20]))
    steps = [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}]
    write_run(root, steps, protocol=protocol, run='a' * 250)
    write_run(root, steps, protocol=protocol, method='lwf', run='short')
    assert main(['plot', '--protocol', protocol.name, '--results', str(root)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ''
    names = [Path(line.removeprefix('wrote ')).name for line in captured.out.splitlines()]
    ft = 'p' * 110 + '-ft-' + 'a' * 110 + '~' + hashlib.sha256(
        f'{protocol.name}-ft-{"a" * 250}-iou.png'.encode()).hexdigest()[:8] + '-iou.png'
    assert names == ['p' * 223 + '~' + hashlib.sha256(f'{protocol.name}-miou.png'.encode())
                     .hexdigest()[:8] + '-miou.png', ft, f'{"p" * 214}-lwf-short~'
                     + hashlib.sha256(f'{protocol.name}-lwf-short-iou.png'.encode())
                     .hexdigest()[:8] + '-iou.png']
    assert [len(name) for name in names] == [MAX_FILE_NAME] * 3 and MAX_FILE_NAME == 241
    assert sorted(os.listdir(root / 'tables')) == sorted(['.cssbench-written.json', *names])
    # a rerun writes the same names, removing none
    assert main(['plot', '--protocol', protocol.name, '--results', str(root)]) == 0
    assert 'removed' not in capsys.readouterr().out
    assert sorted(os.listdir(root / 'tables')) == sorted(['.cssbench-written.json', *names])
    # table --all's files likewise ('<protocol>-per-class.tex' and the others)
    assert main(['table', '--all', '--results', str(root)]) == 0
    capsys.readouterr()
    tables = sorted(set(os.listdir(root / 'tables')) - {'.cssbench-written.json', *names})
    assert len(tables) == 9 and all(len(name) <= MAX_FILE_NAME for name in tables)
    assert fitting_file_name([protocol.name], '-per-class.tex') in tables
    # names alike where they are cut are told apart by their digests; short ones are kept
    assert (fitting_file_name(['p' * 250, 'ft', 'a' * 250], '-iou.png')
            != fitting_file_name(['p' * 250, 'ft', 'a' * 249 + 'b'], '-iou.png'))
    assert fitting_file_name([VOC19, 'ft', 'r'], '-iou.png') == f'{VOC19}-ft-r-iou.png'


def test_the_std_of_a_point_without_neighbours_shows_as_an_error_bar(store_19_1: Path,
                                                                     tmp_path: Path) -> None:
    """A band of ± one std between steps has no width at a point with no neighbour: 19-1's new
    classes (scored after step 1 alone), every point of a one-step protocol. The table said
    '40.0 ± 14.1' where the plot showed a bare point; such a point has an error bar."""
    from matplotlib.container import ErrorbarContainer
    from cssbench.protocols import parse_protocol

    def error_bars(ax) -> list:
        return [[tuple(map(tuple, segment)) for segment in container.lines[2][0].get_segments()]
                for container in ax.containers if isinstance(container, ErrorbarContainer)]

    fig = miou_by_step_figure(VOC19, select_runs(open_store(store_19_1), VOC19))
    all_, old, new = fig.axes[:3]
    std = math.sqrt(200)   # new: 30 and 50
    [[((x0, low), (x1, high))]] = error_bars(new)
    assert (x0, x1) == (1, 1) and (low, high) == (pytest.approx(40 - std), pytest.approx(40 + std))
    assert new.containers[0].lines[2][0].get_colors()[0].tolist() == list(
        matplotlib_rgba(next(line for line in new.get_lines() if line.get_label() == 'ft').get_color()))
    assert error_bars(all_) == error_bars(old) == []   # two steps: a band
    # new's one point (step 1) sat on its panel's right edge: the panels share their steps' range
    assert new.get_xlim() == all_.get_xlim() == old.get_xlim()
    assert new.get_xlim()[0] < 0 and new.get_xlim()[1] > 1
    assert [text.get_text() for text in fig.axes[-1].get_legend().get_texts()] == ['ft', 'joint', 'lwf']

    one = parse_protocol(dict(name='voc-one', dataset='voc', mode='overlap', steps=[list(range(21))]))
    root = tmp_path / 'one'
    for seed, value in ((0, 0.7), (1, 0.6)):
        write_run(root, [uniform(range(21), value)], protocol=one, run=f'r{seed}', seed=seed)
    fig = miou_by_step_figure(one.name, select_runs(open_store(root), one.name))
    std = math.sqrt(50)   # 70 and 60
    for ax in fig.axes[:2]:
        [[((x, low), (_, high))]] = error_bars(ax)
        assert x == 0 and (low, high) == (pytest.approx(65 - std), pytest.approx(65 + std))
    assert error_bars(fig.axes[2]) == []   # no new classes
    # said so, not '(added so far: - by the end)'
    assert [ax.get_title() for ax in fig.axes[:3]] == ['all classes', 'old classes (0-20)',
                                                     'new classes (none: one step)']


def matplotlib_rgba(color) -> tuple:
    from matplotlib.colors import to_rgba
    return to_rgba(color)


def test_many_rows_of_long_names_are_told_apart_and_leave_the_panels_their_width(
        tmp_path: Path) -> None:
    """Twelve rows named with a long config: the colour cycle's ten colours came round again
    (sdr drawn as ft was, same colour, same marker), and the legend beside the panels
    narrowed them until their titles ran into each other. Rows past the tenth take other
    markers; the legend widens the figure instead, its long names wrapped."""
    root = tmp_path / 'results'
    long_config = 'configs/a-rather-long-config-name-for-ablation.py'
    for i, method in enumerate(['ft', 'lwf', 'ilt', 'mib', 'plop', 'sdr']):
        for j, config in enumerate(['small', long_config]):
            value = 0.3 + 0.05 * i + 0.02 * j
            write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, value), 20: value / 2}],
                      method=method, config_name=config, config_digest=f'd{j}', run=f'r{j}')
    write_run(root, [uniform(range(21), 0.9)], method='joint')
    fig = miou_by_step_figure(VOC19, select_runs(open_store(root), VOC19))
    lines = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith('joint')]
    assert len(lines) == 12
    styles = [(line.get_color(), line.get_marker()) for line in lines]
    assert len(set(styles)) == 12 and [m for _, m in styles] == ['o'] * 10 + ['s'] * 2
    assert styles[10][0] == styles[0][0]   # the cycle's first colour, now with squares
    # the values are the rows' still: sdr (long config) old after step 1 = 100 * (0.3 + 0.27)
    sdr = next(line for line in fig.axes[1].get_lines()
               if line.get_label() == f'sdr ({long_config})')
    np.testing.assert_allclose(sdr.get_ydata(), [80.0, 57.0])
    legend = fig.axes[-1].get_legend()
    texts = [text.get_text() for text in legend.get_texts()]
    assert f'ft ({long_config})' not in texts and all(
        len(line) <= 40 for text in texts for line in text.splitlines())
    assert texts[0] == 'ft (configs/a-rather-long-config-name-\nfor-ablation.py)'
    fig.canvas.draw()
    titles = [ax.title.get_window_extent() for ax in fig.axes[:3]]
    assert titles[0].x1 < titles[1].x0 and titles[1].x1 < titles[2].x0   # none overlaps
    assert legend.get_window_extent().x1 <= fig.bbox.x1      # the legend fits in the figure
    assert all(ax.get_window_extent().width > 300 for ax in fig.axes[:3])


def test_a_heat_maps_title_of_long_names_is_wrapped_to_the_figure(tmp_path: Path) -> None:
    """A run's name may be 255 characters: the heat map's title, one line, ran past both
    edges of the figure, neither the protocol nor the run readable. It is wrapped to the
    figure's width, every character kept; a short one stays one line."""
    root = tmp_path / 'results'
    name = 'seed0-' + 'x' * 200
    write_run(root, [uniform(OLD19, 0.8), {**uniform(OLD19, 0.6), 20: 0.3}], run=name)
    write_run(root, [uniform(range(21), 0.9)], method='joint')
    runs = {r.method: r for r in open_store(root).runs}
    fig = class_iou_figure(runs['ft'])
    title = fig.get_suptitle()
    assert title.replace('\n', '') == f'{VOC19} / ft / {name}: IoU\N{NO-BREAK SPACE}(%)'
    assert len(title.splitlines()) > 1 and title.splitlines()[0] == f'{VOC19} / ft / seed0-'
    fig.canvas.draw()
    extent = fig._suptitle.get_window_extent()
    assert fig.bbox.x0 <= extent.x0 and extent.x1 <= fig.bbox.x1 and extent.y1 <= fig.bbox.y1
    joint = class_iou_figure(runs['joint']).get_suptitle()
    assert joint == f'{VOC19} / joint / small-seed0: IoU\N{NO-BREAK SPACE}(%)'


def test_a_heat_map_of_many_classes_in_a_drawn_order_names_each_row(tmp_path: Path) -> None:
    """Past 60 classes (ADE20K's 151) the rows went unlabelled and matplotlib numbered them,
    0, 20, 40, ...: read as class ids, wrong wherever the classes come in another order than
    their ids. Each row is named by its class's id and name, in the run's order."""
    from cssbench.datasets_info import DATASET_INFO
    from cssbench.protocols import parse_protocol
    order = [c for c in range(150, 0, -1)]   # 150 first, 1 last
    protocol = parse_protocol(dict(name='ade-mine', dataset='ade', mode='overlap',
                                   steps=[[0, *order[:100]], order[100:]]))
    root = tmp_path / 'results'
    write_run(root, [uniform(protocol.steps[0], 0.5),
                     {**{c: c / 200 for c in protocol.steps[0]}, **uniform(protocol.steps[1], 0.2)}],
              protocol=protocol)
    fig = class_iou_figure(open_store(root).runs[0])
    names = DATASET_INFO['ade'].classes
    rows = [0, *order]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [f'{c} {names[c]}' for c in rows]
    assert fig.axes[0].get_yticks().tolist() == list(range(151))
    grid = fig.axes[0].images[0].get_array()
    assert grid[1, 1] == pytest.approx(75.0) and grid[150, 1] == pytest.approx(20.0)   # 150, 1
    assert grid.mask[150, 0] and not fig.axes[0].texts   # no cell numbers past 60 classes


def test_plot_and_table_all_refuse_an_empty_out_and_expand_a_home_folder(
        store_19_1: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """``--out ""`` (an unset variable's "$DIR") wrote into <results>/tables as if no --out was
    given; ``--out=~/plots`` (no shell expands that ~) made a folder named '~' in the cwd."""
    results = str(store_19_1)
    for command in ('plot', 'table'):
        target = ['--protocol', VOC19] if command == 'plot' else ['--all']
        with pytest.raises(SystemExit) as stopped:
            main([command, *target, '--results', results, '--out', ''])
        assert stopped.value.code == 2
        assert capsys.readouterr().err.endswith('error: argument --out: an empty value\n')
    assert not (store_19_1 / 'tables').exists()
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    monkeypatch.chdir(tmp_path)
    assert main(['plot', '--protocol', VOC19, '--results', results, '--out=~/plots']) == 0
    wrote = capsys.readouterr().out.splitlines()
    assert wrote[0] == f'wrote {tmp_path / "home" / "plots" / f"{VOC19}-miou.png"}'
    assert (tmp_path / 'home' / 'plots' / f'{VOC19}-miou.png').is_file()
    assert not (tmp_path / '~').exists()


def test_table_out_and_results_take_a_home_folder(store_19_1: Path, tmp_path: Path, monkeypatch,
                                                  capsys) -> None:
    """``table --out=~/t.md`` (no shell expands that ~) wrote into a folder named '~' in the cwd,
    as ``plot --out`` did before; ``--results=~/...`` read no store there."""
    home = tmp_path / 'home'
    home.mkdir()
    shutil.copytree(store_19_1, home / 'store')
    monkeypatch.setenv('HOME', str(home))
    monkeypatch.chdir(tmp_path)
    assert main(['table', '--protocol', VOC19, '--results=~/store', '--out=~/t.md']) == 0
    assert capsys.readouterr().out == f'wrote {home / "t.md"}\n'
    assert f'### {VOC19}' in (home / 't.md').read_text()
    assert not (tmp_path / '~').exists()
