"""Paper-style tables from the results store: mIoU in percent, mean ± std over seeds.

Three tables per protocol, each as markdown, CSV or LaTeX:

* the leaderboard: per method, old / new / all mIoU after the last step, the average
  incremental mIoU (the mean over steps of the all-classes mIoU), the mean forgetting of the
  old classes and the gap to joint training, beside the published numbers for the same
  method and setting (``data/paper_tables.csv``) and our difference to them;
* per step: old / new / all after every step, beside the classes each row's old and new average;
* per class: each old class's forgetting (its best IoU at an earlier step minus its IoU
  after the last step).

std is the sample standard deviation (n - 1) over the seeds a row aggregates; one run shows
the mean alone. In the leaderboard the best incremental method per score column is bold
(joint, the upper bound, and the published numbers are not ranked; nor is a method alone).
"""
from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .datasets_info import DATASET_INFO
from .errors import UserError
from .io import atomic_write_text, fitting_file_name
from .metrics import column_classes, mean_iou, range_label
from .protocols import available_protocols, setting_notes
from .published import incomparable, published_cells, published_methods
from .store import (DIRTY_REVISION, UNKNOWN_REGIME, RowRuns, Store, StoredRun, results_option,
                    select_runs)

COLUMNS = ('old', 'new', 'all')
FORMATS = ('md', 'csv', 'latex')
EXTENSIONS = dict(md='md', csv='csv', latex='tex')


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def percent(value) -> float:
    """A stored fraction in percent; None (not scored) is NaN."""
    return 100 * _nan(value)


# Per-step records (metrics.json's steps), as the runner prints and stores them.

def step_frame(step_results: list[dict]) -> pd.DataFrame:
    """One row per step: old / new / all mIoU, and the class ranges old and new cover."""
    rows = []
    for r in step_results:
        cols = r['columns']
        row = {'step': r['step'], 'old classes': cols['old']['label'],
               'new classes': cols['new']['label']}
        row.update({name: percent(cols[name]['mIoU']) for name in COLUMNS})
        rows.append(row)
    return pd.DataFrame(rows).set_index('step')


def format_step_table(protocol: str, method: str, run: str, step_results: list[dict]) -> str:
    frame = step_frame(step_results)
    return f'{protocol} / {method} / {run} (mIoU %)\n' + frame.to_string(float_format='{:.1f}'.format, na_rep='-')


def steps_to_csv(step_results: list[dict]) -> str:
    rows = []
    for r in step_results:
        row = {'step': r['step'], 'num_train': r['num_train'], 'num_val': r['num_val']}
        for name in COLUMNS:
            row[f'{name}_classes'] = r['columns'][name]['label']
            row[f'{name}_mIoU'] = percent(r['columns'][name]['mIoU'])
        row.update({f'IoU_{c}': percent(v) for c, v in r['iou'].items()})
        rows.append(row)
    return pd.DataFrame(rows).to_csv(index=False, float_format='%.2f')


# Continual-learning metrics of one run (fractions, as stored).

def forgetting_per_class(steps: list[dict]) -> dict[int, float]:
    """For each class learned before the last step: its best IoU at an earlier step minus its
    IoU after the last step (Chaudhry et al.'s forgetting; negative if the class improved).
    Classes not scored after the last step, or at no earlier step, are left out."""
    if len(steps) < 2:
        return {}
    forgetting = {}
    for c, final in steps[-1]['iou'].items():
        earlier = [s['iou'][c] for s in steps[:-1] if s['iou'].get(c) is not None]
        if final is not None and earlier:
            forgetting[int(c)] = max(earlier) - final
    return forgetting


def average_incremental_miou(steps: list[dict]) -> float:
    """The mean over steps of the all-classes mIoU after each step (PLOP's 'avg')."""
    return mean_iou([s['columns']['all']['mIoU'] for s in steps])


def run_summary(run: StoredRun) -> dict[str, float]:
    last = run.steps[-1]['columns']
    summary = {name: _nan(last[name]['mIoU']) for name in COLUMNS}
    summary['avg'] = average_incremental_miou(run.steps)
    summary['forgetting'] = mean_iou(forgetting_per_class(run.steps).values())
    return summary


def mean_std(values) -> tuple[float, float]:
    """Mean and sample std (n - 1) of the non-NaN values; std NaN below two values."""
    v = np.array([x for x in values if not math.isnan(x)], dtype=float)
    if not v.size:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def step_miou(row: RowRuns, t: int, column: str) -> tuple[float, float]:
    """A row's mIoU (%) of ``column`` (all, old, new) after its step ``t``: mean and std over
    its seeds."""
    return mean_std([percent(r.steps[t]['columns'][column]['mIoU']) for r in row.runs])


# Tables: a numeric frame (the CSV) and how to display it (markdown, LaTeX).

@dataclass(frozen=True)
class Column:
    header: str
    key: str                    # mean in frame[key], std in frame[key + '_std'] if present
    best: str | None = None     # 'max' or 'min': bold the best incremental method's mean
    signed: bool = False        # a difference: printed with its sign
    variant_stated: str | None = None   # frame column: False marks the value '*'
    text: bool = False          # frame[key] holds text, shown as it is (no mean, no std)


@dataclass
class Table:
    title: str
    frame: pd.DataFrame         # percent values; index: the row labels
    columns: list[Column]
    index_names: list[str]
    unranked: set = field(default_factory=set)   # row labels never bold (joint)
    notes: list[str] = field(default_factory=list)


def _agreed_classes(runs: list[StoredRun], step: int, column: str, otherwise: str) -> str:
    """The class range ``column`` averages after ``step``, where every one of ``runs``
    agrees on it (a fixed class order); else ``otherwise`` (random class orders)."""
    found = {r.steps[step]['columns'][column]['label'] for r in runs}
    return found.pop() if len(found) == 1 else otherwise


def column_labels(rows: list[RowRuns]) -> dict[str, str]:
    """Old/new headers of the columns after the last step: their class ranges when every run
    agrees on them, else 'old' / 'new'."""
    runs = [r for row in rows for r in row.runs]
    return dict(old=_agreed_classes(runs, -1, 'old', 'old'),
                new=_agreed_classes(runs, -1, 'new', 'new'), all='all')


def chosen_by(runs, config) -> str:
    """How an error names the runs it looked for: those ``--run``/``--config`` chose, if given."""
    return ' matching --run/--config' if runs or config else ''


def configs_of_runs(store: Store, protocols: Sequence[str], runs, config) -> str:
    """For an error where ``--run``/``--config`` chose no run: the configs of the complete runs
    of ``protocols`` that ``--run`` chose, the names ``--config`` can give; where ``--run`` chose
    none (or no --config was given), the names of the complete runs of ``protocols`` (older
    ones too), which ``--run`` can give; '' if neither option was given, or none is stored."""
    configs = sorted({r.config_name for protocol in protocols
                      for row in select_runs(store, protocol, runs) for r in row.runs}) if config else []
    if configs:
        return f'the configs of its runs: {", ".join(configs)}'
    names = sorted({r.run for r in store.runs if r.protocol_name in protocols}) if runs else []
    return f'the names of its runs: {", ".join(names)}' if names else ''


def runs_of_protocol(store: Store, protocol: str, runs, config) -> list[RowRuns]:
    """The rows of ``protocol``'s runs (chosen by ``--run``/``--config``); a UserError saying what
    is stored, or how to store one, where there is none."""
    rows = select_runs(store, protocol, runs, config)
    if rows:
        return rows
    chosen = chosen_by(runs, config)
    advice = configs_of_runs(store, [protocol], runs, config) or _how_to_store_one(store, protocol,
                                                                                   config)
    # e.g. a run still training, which rerunning its command finishes
    advice += store.skipped_note(protocol)
    raise UserError(f'{store.root}: no complete run{chosen} stored for protocol {protocol!r}; {advice}')


def _how_to_store_one(store: Store, protocol: str, config: str | None) -> str:
    if protocol not in available_protocols():
        return f'stored protocols: {", ".join(store.protocols()) or "none"}'
    config_option = f' --config {shlex.quote(config)}' if config else ''
    return f'`cssbench run --protocol {protocol}{config_option}{results_option(store.root)}` makes one'


def _notes(store: Store, protocol: str, rows: list[RowRuns],
           published: Sequence[str] = ()) -> list[str]:
    """A table's notes: the protocol's settings that are not the reference's, the
    ``published`` numbers' notes, the runs each row averages, the stored runs not read."""
    return [*setting_notes(rows[0].runs[0].protocol), *published,
            *_provenance_notes(store, protocol, rows)]


def short_revision(revision: str) -> str:
    """A run's git revision as the notes give it: 8 hex digits, and the mark of code that
    differed from that commit."""
    return revision[:8] + (DIRTY_REVISION if revision.endswith(DIRTY_REVISION) else '')


def method_settings_differences(runs: Sequence[StoredRun]) -> str:
    """The method's settings whose recorded values differ between ``runs`` (those that
    recorded them), in words: ``loss_kd 100.0 or 10.0``; '' where none differ."""
    recorded = [r.method_settings for r in runs if r.method_settings is not None]
    differing = []
    for name in sorted({k for settings in recorded for k in settings}):
        values = dict.fromkeys(json.dumps(s.get(name), sort_keys=True) for s in recorded)
        if len(values) > 1:
            differing.append(f'{name} {" or ".join(values)}')
    return '; '.join(differing)


def _provenance_notes(store: Store, protocol: str, rows: list[RowRuns]) -> list[str]:
    notes = []
    for row in rows:
        used = ', '.join(f'{r.run} (seed {r.seed}, {r.finished}, {short_revision(r.git_revision)}, '
                         f'{r.regime})' for r in row.runs)
        notes.append(f'{row.method} ({row.setup}): {used}')
        regimes = sorted({r.regime for r in row.runs} - {UNKNOWN_REGIME})
        if len(regimes) > 1:
            notes.append(f'  {row.label} averages runs trained in {len(regimes)} regimes '
                         f'({"; ".join(regimes)}): they can differ by more than their seeds')
        differing = method_settings_differences(row.runs)
        if differing:
            notes.append(f'  {row.label} averages runs trained with other settings of the method '
                         f'({differing}), under one config: a default in its code changed '
                         f'between them')
        if row.passed_over:
            notes.append(f'  {len(row.passed_over)} other complete run(s) of the same seeds not '
                         f'used (older): {", ".join(r.run for r in row.passed_over)}; '
                         f'--run NAME picks runs by name')
    notes += [f'skipped {s.path}: {s.reason}' for s in store.skipped_in(protocol)]
    return notes


def joint_key(row: RowRuns) -> tuple[str, str]:
    """What a row shares with the joint training it is compared with: the config but for the
    methods' own settings (a config setting lwf's ``loss_kd`` compares with joint training
    on the config without it, which joint refuses), and the data. The row's runs share
    their config; the digest is computed from the config each run.json holds
    (``digests.stored_digests``), and where no run of the row has one (a record holding
    neither its config nor that digest), its whole config's counts (the same where it sets
    no method's own setting)."""
    recorded = [r.shared_config_digest for r in row.runs if r.shared_config_digest]
    return (recorded[0] if recorded else row.runs[0].config_digest), row.runs[0].dataset_fingerprint


def joint_mious(rows: list[RowRuns]) -> dict[tuple[str, str], float]:
    """Each joint row's all-class mIoU (%, its mean over seeds) by ``joint_key``: what a row
    of the same config but for the method's own settings, on the same data, compares with
    (the first row of a key)."""
    return {joint_key(row): mean_std([100 * run_summary(r)['all'] for r in row.runs])[0]
            for row in reversed(rows) if row.joint}


def leaderboard(store: Store, protocol: str, runs: list[str] | None = None,
                config: str | None = None) -> Table:
    """Per method: old / new / all after the last step, avg, forgetting, gap to joint, and the
    published numbers of the same method and setting."""
    rows = runs_of_protocol(store, protocol, runs, config)
    labels = column_labels(rows)
    records = []
    for row in rows:
        summaries = [run_summary(r) for r in row.runs]
        record = {'row': row.label, 'method': row.method, 'setup': row.setup,
                  'seeds': len(row.runs)}
        for key in (*COLUMNS, 'avg', 'forgetting'):
            mean, std = mean_std([100 * s[key] for s in summaries])
            record[key], record[f'{key}_std'] = mean, std
        records.append(record)
    frame = pd.DataFrame(records).set_index('row')
    # a joint row the table shows is the level its rows compare with; a table chosen by --run
    # or --config without one still compares, with the protocol's joint runs
    shown = joint_mious(rows)
    try:   # refused where protocols of this name differ: then only with the joint row shown
        joint_all = (shown if runs is None and config is None
                     else {**joint_mious(select_runs(store, protocol)), **shown})
    except UserError:
        joint_all = shown
    frame['gap_joint'] = [joint_all.get(joint_key(row), math.nan) - frame.at[row.label, 'all']
                          for row in rows]
    gap_notes = _no_gap_notes([row.label for row in rows if joint_key(row) not in joint_all],
                              any(r.joint for r in store.runs if r.protocol_name == protocol))
    unshown = [row.label for row in rows if joint_key(row) in joint_all.keys() - shown.keys()]
    if unshown:
        gap_notes.append(f'gap to joint for {", ".join(unshown)}: from joint runs of the '
                         f'protocol that this table does not show (same config and data)')

    columns = [Column('seeds', 'seeds'),
               Column(labels['old'], 'old', 'max'), Column(labels['new'], 'new', 'max'),
               Column('all', 'all', 'max'), Column('avg', 'avg', 'max'),
               Column('forgetting', 'forgetting', 'min'), Column('gap to joint', 'gap_joint', 'min')]
    notes = _notes(store, protocol, rows,
                   published=[*_add_published(frame, columns, rows, labels), *gap_notes])
    return Table(title=f'{protocol}: mIoU (%) after the last step, mean ± std over seeds',
                 frame=frame, columns=columns, index_names=['method'],
                 unranked={r.label for r in rows if r.joint}, notes=notes)


def _no_gap_notes(labels: list[str], joint_stored: bool) -> list[str]:
    """Why the rows ``labels`` have no gap to joint: no joint run of the protocol at all
    (``joint_stored`` False), or none of their config and data."""
    if not labels:
        return []
    if not joint_stored:
        return ['no gap to joint: no joint run of this protocol is stored']
    return [f'no gap to joint for {", ".join(labels)}: no joint run of '
            f'{"its" if len(labels) == 1 else "their"} config (but for the method\'s own '
            f'settings) on the same data']


UNSTATED_VARIANT = '* the source does not state whether the setting is overlapped or disjoint'


def _add_published(frame: pd.DataFrame, columns: list[Column], rows: list[RowRuns],
                   labels: dict[str, str]) -> list[str]:
    """Put each row's published numbers (and our difference to them) in ``paper_*`` /
    ``diff_*`` columns, the first that averages our column's classes; returns the notes:
    each number's source, the numbers published over other classes (beside ours over those
    classes), or why nothing is shown."""
    protocol = rows[0].runs[0].protocol
    notes, unstated_variant = [], False
    for name in COLUMNS:
        frame[f'paper_{name}'] = math.nan
        frame[f'paper_{name}_variant_stated'] = None
        frame[f'diff_{name}'] = math.nan
    shown = set()
    for row in rows:
        for cell in published_cells(protocol, row.method):   # exact variant first
            ours_classes = _column_classes(row.runs[0], cell.column)
            unstated_variant |= not cell.exact_variant
            tag = f'{cell.value:.1f}{"" if cell.exact_variant else "*"} ({cell.source}' + \
                  (f'; {cell.caveat})' if cell.caveat else ')')
            if cell.classes in (None, ours_classes) and math.isnan(frame.at[row.label, f'paper_{cell.column}']):
                frame.at[row.label, f'paper_{cell.column}'] = cell.value
                frame.at[row.label, f'paper_{cell.column}_variant_stated'] = cell.exact_variant
                frame.at[row.label, f'diff_{cell.column}'] = frame.at[row.label, cell.column] - cell.value
                shown.add(cell.column)
                notes.append(f'published {row.method} {labels[cell.column]}: {tag}')
                continue
            classes = cell.classes or ours_classes
            mean, std = mean_std([100 * mean_iou([_nan(r.steps[-1]['iou'].get(str(c)))
                                                  for c in classes]) for r in row.runs])
            notes.append(f'also published {row.method} {cell.column} over classes '
                         f'{range_label(classes)}: {tag}; ours over the same classes '
                         f'{_pm(mean, std)} ({mean - cell.value:+.1f})')
    for name in COLUMNS:
        if name in shown:
            columns += [Column(f'paper {labels[name]}', f'paper_{name}',
                               variant_stated=f'paper_{name}_variant_stated'),
                        Column(f'diff {labels[name]}', f'diff_{name}', signed=True)]
    if notes:
        # the rows beside them whose paper columns are empty for want of a published number
        without = sorted({row.method for row in rows if not published_cells(protocol, row.method)})
        if without:
            notes.append(f'no published numbers for {", ".join(without)} in this setting '
                         f'(data/paper_tables.csv has them for '
                         f'{", ".join(published_methods(protocol))} only)')
        return notes + ([UNSTATED_VARIANT] if unstated_variant else [])
    reason = incomparable(protocol)
    if reason:
        return [f'no published numbers shown: {reason}']
    others = published_methods(protocol)
    if others:
        return [f'published numbers for this setting are for {", ".join(others)} only '
                f'(data/paper_tables.csv)']
    return [f'no published numbers for this setting in data/paper_tables.csv '
            f'(dataset {protocol["dataset"]!r})']


def _column_classes(run: StoredRun, column: str) -> tuple[int, ...]:
    """The class ids a column of ``run``'s last step averages (background where scored)."""
    steps = run.protocol['steps']
    return tuple(sorted(column_classes(steps, run.protocol['dataset'], len(steps) - 1)[column]))


CLASSES_DIFFER = 'differ by run'


def per_step(store: Store, protocol: str, runs: list[str] | None = None,
             config: str | None = None) -> Table:
    """Per method and step: old / new / all after that step (joint: its single step, shown
    as the last), and the classes the row's old and new average: new grows with the steps,
    so no header could name its classes for every row."""
    rows = runs_of_protocol(store, protocol, runs, config)
    records = []
    for row in rows:
        num_steps = len(row.runs[0].steps)
        last = len(row.runs[0].protocol['steps']) - 1
        for t in range(num_steps):
            record = {'row': row.label, 'step': last if row.joint else t,
                      'method': row.method, 'setup': row.setup, 'seeds': len(row.runs)}
            for name in ('old', 'new'):
                record[f'{name}_classes'] = _agreed_classes(row.runs, t, name, CLASSES_DIFFER)
            for name in COLUMNS:
                record[name], record[f'{name}_std'] = step_miou(row, t, name)
            records.append(record)
    frame = pd.DataFrame(records).set_index(['row', 'step'])
    columns = [Column('seeds', 'seeds'), Column('old classes', 'old_classes', text=True),
               Column('new classes', 'new_classes', text=True),
               *(Column(name, name) for name in COLUMNS)]
    return Table(title=f'{protocol}: mIoU (%) after each step, mean ± std over seeds', frame=frame,
                 columns=columns, index_names=['method', 'step'],
                 notes=_notes(store, protocol, rows))


def per_class_forgetting(store: Store, protocol: str, runs: list[str] | None = None,
                         config: str | None = None) -> Table:
    """Per old class and method: its forgetting (best earlier IoU minus final IoU)."""
    rows = [r for r in runs_of_protocol(store, protocol, runs, config) if not r.joint]
    if not rows:
        raise UserError(f'protocol {protocol!r}: only joint runs stored; forgetting needs steps')
    per_row = {row.label: [forgetting_per_class(r.steps) for r in row.runs]
               for row in rows}
    classes = sorted({c for runs_ in per_row.values() for f in runs_ for c in f})
    names = DATASET_INFO[rows[0].runs[0].protocol['dataset']].classes
    frame = pd.DataFrame(index=pd.Index([f'{c} {names[c]}' for c in classes], name='class'))
    columns = []
    for label, forgettings in per_row.items():
        stats = [mean_std([100 * f.get(c, math.nan) for f in forgettings]) for c in classes]
        frame[label] = [m for m, _ in stats]
        frame[f'{label}_std'] = [s for _, s in stats]
        columns.append(Column(label, label))
    return Table(title=f'{protocol}: forgetting per old class (IoU %, best earlier step minus '
                       f'last), mean ± std over seeds', frame=frame, columns=columns,
                 index_names=['class'], notes=_notes(store, protocol, rows))


# Rendering.

def _pm(mean: float, std: float, signed: bool = False, latex: bool = False) -> str:
    if math.isnan(mean):
        return '-'
    text = f'{mean:+.1f}' if signed else f'{mean:.1f}'
    if latex and text.startswith('-'):
        text = '$-$' + text[1:]   # a minus sign: LaTeX sets a bare '-' as a hyphen
    if not math.isnan(std):
        text += f' $\\pm$ {std:.1f}' if latex else f' ± {std:.1f}'
    return text


def _cells(table: Table, latex: bool) -> list[list[str]]:
    """The displayed text of every row, best values bold, row names escaped for the format."""
    frame = table.frame
    escape = _latex_escape if latex else _markdown_escape
    ranked = ~frame.index.get_level_values(0).isin(table.unranked)
    out = [[escape(str(v)) for v in (key if isinstance(key, tuple) else (key,))] for key in frame.index]
    for column in table.columns:
        if column.text:
            for cells, value in zip(out, frame[column.key]):
                cells.append(escape(str(value)))
            continue
        means = frame[column.key].astype(float)
        stds = frame[f'{column.key}_std'] if f'{column.key}_std' in frame else [math.nan] * len(frame)
        unstated = (frame[column.variant_stated].eq(False).tolist() if column.variant_stated
                    else [False] * len(frame))
        best = math.nan
        if column.best and ranked.sum() > 1:   # a lone method is not 'best'
            best = (means[ranked].max() if column.best == 'max' else means[ranked].min())
        for i, (mean, std) in enumerate(zip(means, stds)):
            if column.key == 'seeds':
                text = '-' if math.isnan(mean) else str(int(mean))
            else:
                text = _pm(mean, std, column.signed, latex)
            if unstated[i]:
                text += '*' if latex else '\\*'
            if ranked[i] and not math.isnan(best) and round(mean, 1) == round(best, 1):
                text = f'\\textbf{{{text}}}' if latex else f'**{text}**'
            out[i].append(text)
    return out


def _markdown_escape(text: str) -> str:
    """Text a markdown table cell or list item shows as written (``_`` inside a word, as in
    file and run names, is not emphasis: left as it is, for the terminal's reader)."""
    for char in '\\|*`':
        text = text.replace(char, '\\' + char)
    return text


def to_markdown(table: Table) -> str:
    header = table.index_names + [_markdown_escape(c.header) for c in table.columns]
    lines = [f'### {table.title}', '', '| ' + ' | '.join(header) + ' |',
             '|' + '|'.join(['---'] * len(table.index_names)
                            + ['---' if c.text else '---:' for c in table.columns]) + '|']
    lines += ['| ' + ' | '.join(row) + ' |' for row in _cells(table, latex=False)]
    if table.notes:
        lines += [''] + [f'- {_markdown_escape(n)}' if not n.startswith('  ')
                         else f'  - {_markdown_escape(n.strip())}' for n in table.notes]
    return '\n'.join(lines) + '\n'


LATEX_SPECIAL = {'\\': '\\textbackslash{}', '&': '\\&', '%': '\\%', '_': '\\_', '#': '\\#',
                 '$': '\\$', '{': '\\{', '}': '\\}', '~': '\\textasciitilde{}',
                 '^': '\\textasciicircum{}', '±': '$\\pm$'}


def _latex_escape(text: str) -> str:
    return ''.join(LATEX_SPECIAL.get(char, char) for char in text)


def to_latex(table: Table) -> str:
    """A booktabs tabular, ready to paste (needs ``\\usepackage{booktabs}``)."""
    header = table.index_names + [c.header for c in table.columns]
    spec = 'l' * len(table.index_names) + ''.join('l' if c.text else 'r' for c in table.columns)
    lines = [f'% {_latex_escape(table.title)}']
    lines += [f'% {_latex_escape(n)}' for n in table.notes]
    lines += [f'\\begin{{tabular}}{{{spec}}}', '\\toprule',
              ' & '.join(_latex_escape(h) for h in header) + ' \\\\', '\\midrule']
    lines += [' & '.join(row) + ' \\\\' for row in _cells(table, latex=True)]
    lines += ['\\bottomrule', '\\end{tabular}']
    return '\n'.join(lines) + '\n'


def to_csv(table: Table) -> str:
    frame = table.frame.copy()
    # a frame with a 'method' column beside its row names (the leaderboard's, the per-step
    # table's): the names' column is the row's
    frame.index.names = ['row' if name in frame.columns else name for name in table.index_names]
    return frame.to_csv(float_format='%.2f')


def render(table: Table, fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f'unknown format {fmt!r} (known: {", ".join(FORMATS)})')
    return dict(md=to_markdown, csv=to_csv, latex=to_latex)[fmt](table)


TABLES = dict(leaderboard=leaderboard, per_step=per_step, per_class=per_class_forgetting)


def write_all_tables(store: Store, out_dir: str | Path, runs=None,
                     config=None) -> tuple[dict[str, list[Path]], list[str]]:
    """Every protocol's tables in every format under ``out_dir``: ``<protocol>.<ext>``,
    ``<protocol>-per-step.<ext>``, ``<protocol>-per-class.<ext>``. The files written, per
    protocol; and a line for each table not written, saying why."""
    out_dir = Path(out_dir)
    written, not_written = {}, []
    for protocol in store.protocols_with_skipped():
        try:
            chosen = select_runs(store, protocol, runs, config)
        except UserError as e:   # runs of two protocols of one name, merged: the others' still go
            not_written.append(f'no tables for {protocol}: {e}')
            continue
        if not chosen:
            not_written.append(f'no tables for {protocol}: no complete run{chosen_by(runs, config)}'
                               + store.skipped_note(protocol))
            continue
        for kind, build in TABLES.items():
            try:
                table = build(store, protocol, runs, config)
            except UserError as e:   # the per-class table, where only joint runs are chosen
                not_written.append(f'no {kind.replace("_", "-")} table: {e}')
                continue
            suffix = '' if kind == 'leaderboard' else '-' + kind.replace('_', '-')
            for fmt in FORMATS:
                path = out_dir / fitting_file_name([protocol], f'{suffix}.{EXTENSIONS[fmt]}')
                atomic_write_text(path, render(table, fmt))
                written.setdefault(protocol, []).append(path)
    return written, not_written
