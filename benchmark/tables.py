"""Paper-style tables from stored step metrics (mIoU in percent, one decimal)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from .errors import UserError

COLUMNS = ('old', 'new', 'all')


def _pct(value) -> float:
    return math.nan if value is None or (isinstance(value, float) and math.isnan(value)) else 100 * value


def step_frame(step_results: list[dict]) -> pd.DataFrame:
    """One row per step: old / new / all mIoU, and the class ranges old and new cover."""
    rows = []
    for r in step_results:
        cols = r['columns']
        row = {'step': r['step'], 'old classes': cols['old']['label'],
               'new classes': cols['new']['label']}
        row.update({name: _pct(cols[name]['mIoU']) for name in COLUMNS})
        rows.append(row)
    return pd.DataFrame(rows).set_index('step')


def format_step_table(protocol: str, method: str, step_results: list[dict]) -> str:
    frame = step_frame(step_results)
    return f'{protocol} / {method} (mIoU %)\n' + frame.to_string(float_format='{:.1f}'.format, na_rep='-')


def steps_to_csv(step_results: list[dict]) -> str:
    rows = []
    for r in step_results:
        row = {'step': r['step'], 'num_train': r['num_train'], 'num_val': r['num_val']}
        for name in COLUMNS:
            row[f'{name}_classes'] = r['columns'][name]['label']
            row[f'{name}_mIoU'] = _pct(r['columns'][name]['mIoU'])
        row.update({f'IoU_{c}': _pct(v) for c, v in r['iou'].items()})
        rows.append(row)
    return pd.DataFrame(rows).to_csv(index=False, float_format='%.2f')


def latest_complete_run(method_dir: Path) -> Path | None:
    """The most recently finished complete run of one method, or None."""
    runs = []
    for run_file in method_dir.glob('*/run.json'):
        try:
            record = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if record.get('status') == 'complete' and (run_file.parent / 'metrics.json').exists():
            runs.append((record.get('finished', ''), run_file.parent))
    return max(runs)[1] if runs else None


def comparison_frame(results_root: str | Path, protocol: str) -> pd.DataFrame:
    """Methods side by side: old / new / all after the last step, from their latest runs."""
    base = Path(results_root) / protocol
    if not base.is_dir():
        raise UserError(f'{base}: no results for protocol {protocol!r}; run `cssbench run` first')
    rows = []
    for method_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        run_dir = latest_complete_run(method_dir)
        if run_dir is None:
            continue
        last = json.loads((run_dir / 'metrics.json').read_text())['steps'][-1]
        row = {'method': method_dir.name, 'run': run_dir.name}
        for name in COLUMNS:
            col = last['columns'][name]
            row[col['label'] if name != 'all' else 'all'] = _pct(col['mIoU'])
        rows.append(row)
    if not rows:
        raise UserError(f'{base}: no complete run stored for protocol {protocol!r}')
    return pd.DataFrame(rows).set_index('method')


def format_comparison(results_root: str | Path, protocol: str) -> str:
    frame = comparison_frame(results_root, protocol)
    return (f'{protocol}: mIoU (%) after the last step\n'
            + frame.to_string(float_format='{:.1f}'.format, na_rep='-'))
