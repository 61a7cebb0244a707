"""Figures from the results store, written as PNG beside the tables.

* ``<protocol>-miou.png``: mIoU of all / old / new classes against the step, one line per
  row of the tables (a method and setup: the mean over its seeds, a band of ± one std, an
  error bar at a point with no neighbour);
  joint, trained in one step, is a dashed black horizontal line at its value (each joint row
  dashed otherwise where several setups have one).
* ``<protocol>-<method>-<run>-iou.png``: for each row, one run's per-class IoU, class x step,
  as a heat map (blank where a class is not yet learned or not in the evaluation set).
"""
from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.textpath import TextToPath  # noqa: E402

from .datasets_info import DATASET_INFO  # noqa: E402
from .io import atomic_write_bytes, fitting_file_name  # noqa: E402
from .store import RowRuns, StoredRun  # noqa: E402
from .tables import column_labels, step_miou  # noqa: E402


JOINT_LINESTYLES = ['--', ':', '-.', (0, (5, 2, 1, 2, 1, 2)), (0, (1, 4))]
MARKERS = ['o', 's', '^', 'D', 'v', 'P']   # rows 1-10, 11-20, ... of the incremental methods
LEGEND_WRAP = 40               # characters a legend line holds
LEGEND_LINES_PER_COLUMN = 14   # beside panels 4 inches high


def miou_by_step_figure(protocol: str, rows: list[RowRuns]) -> Figure:
    """Three panels (all, old, new), one line per row (method, and its setup where rows differ)."""
    labels = column_labels(rows)
    num_steps = max(len(row.runs[0].protocol['steps']) for row in rows)
    # each joint row's level in black, dashed; several (one per setup) each dashed otherwise
    dashes = dict(zip((row.label for row in rows if row.joint), JOINT_LINESTYLES * len(rows)))
    # the others in the colour cycle's ten colours, then again with other markers
    incremental = [row.label for row in rows if not row.joint]
    styles = {label: dict(color=f'C{i % 10}', marker=MARKERS[i // 10 % len(MARKERS)])
              for i, label in enumerate(incremental)}
    # the legend, right of the panels, widens the figure rather than narrowing them (their
    # titles ran into each other); long names are wrapped, many in several columns
    legend_labels = [textwrap.fill(row.label, LEGEND_WRAP) for row in rows]
    legend_lines = sum(label.count('\n') + 1 for label in legend_labels)
    legend_columns = math.ceil(legend_lines / LEGEND_LINES_PER_COLUMN)
    widest = max(len(line) for label in legend_labels for line in label.splitlines())
    legend_width = legend_columns * (0.7 + 0.085 * widest)   # inches, at 10 pt
    # the panels' steps at the same places (new's, from step 1, sat on its frame's edges)
    fig, axes = plt.subplots(1, 3, figsize=(12 + legend_width, 4), sharex=True, sharey=True,
                             layout='constrained')
    for ax, column in zip(axes, ('all', 'old', 'new')):
        for row in rows:
            if row.joint:
                mean, _ = step_miou(row, 0, column)
                ax.axhline(mean, color='black', linestyle=dashes[row.label], linewidth=1,
                           label=row.label)
                continue
            stats = [step_miou(row, t, column) for t in range(len(row.runs[0].steps))]
            mean, std = np.array(stats).T
            steps = np.arange(len(mean))
            (line,) = ax.plot(steps, mean, markersize=3, label=row.label, **styles[row.label])
            if len(row.runs) > 1:
                ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15,
                                linewidth=0)
                # a point with no neighbour (a one-step protocol, 19-1's new classes) has a band
                # of no width: its ± std as an error bar
                finite = np.isfinite(mean) & np.isfinite(std)
                alone = finite & ~np.r_[False, finite[:-1]] & ~np.r_[finite[1:], False]
                if alone.any():
                    ax.errorbar(steps[alone], mean[alone], yerr=std[alone], fmt='none',
                                ecolor=line.get_color(), elinewidth=1.5, capsize=0)
        title = f'{column} classes'
        if labels[column] == '-':   # a protocol of one step: no class is ever new
            title += ' (none: one step)'
        elif labels[column] != column:   # the runs agree on its classes: named
            title += (f' ({labels[column]})' if column == 'old'   # new grows with the steps:
                      else f' (added so far: {labels[column]} by the end)')   # the last's range
        ax.set(title=title, xlabel='step', xticks=range(num_steps), ylim=(0, 100))
    axes[0].set_ylabel('mIoU (%)')
    handles, names = axes[-1].get_legend_handles_labels()
    wrapped = dict(zip((row.label for row in rows), legend_labels))
    axes[-1].legend(handles, [wrapped[name] for name in names], loc='center left',
                    bbox_to_anchor=(1.0, 0.5), frameon=False, ncols=legend_columns)
    fig.suptitle(f'{protocol}: mIoU after each step (mean ± std over seeds)')
    return fig


def class_iou_figure(run: StoredRun) -> Figure:
    """Per-class IoU (rows: classes in the run's learning order; columns: steps)."""
    protocol = run.protocol
    classes = [c for step in protocol['steps'] for c in step]
    names = DATASET_INFO[protocol['dataset']].classes
    grid = np.full((len(classes), len(run.steps)), np.nan)
    for t, step in enumerate(run.steps):
        for i, c in enumerate(classes):
            value = step['iou'].get(str(c))
            if value is not None:
                grid[i, t] = 100 * value
    height = max(3.0, 0.22 * len(classes) + 1.2)
    width = 1.0 * len(run.steps) + 3.5
    fig, ax = plt.subplots(figsize=(width, height), layout='constrained')
    image = ax.imshow(np.ma.masked_invalid(grid), aspect='auto', cmap='viridis', vmin=0, vmax=100,
                      interpolation='nearest')
    # joint's one step trains every class: not the protocol's step 0, whose classes are fewer
    ax.set_xticks(range(len(run.steps)),
                  ['all classes'] if run.joint else [str(s['step']) for s in run.steps])
    # every row named (0.22 inch each: room for the 7 pt labels): matplotlib's own ticks would
    # number the rows, which are classes only in id order
    ax.set_yticks(range(len(classes)), [f'{c} {names[c]}' for c in classes], fontsize=7)
    if len(classes) <= 60:
        for (i, t), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(t, i, f'{value:.0f}', ha='center', va='center', fontsize=6,
                        color='white' if value < 50 else 'black')
    ax.set(xlabel='step', ylabel='class')
    # over the figure, wrapped to its width (names may be 255 characters; a line past it is cut off)
    fig.suptitle(wrapped_to(f'{protocol["name"]} / {run.method} / {run.run}: IoU\N{NO-BREAK SPACE}(%)',
                            width - 0.2, plt.rcParams['figure.titlesize']))
    fig.colorbar(image, ax=ax, label='IoU (%)')
    return fig


def wrapped_to(text: str, inches: float, size) -> str:
    """``text`` in lines (broken at spaces and hyphens, else anywhere) each at most ``inches``
    wide in the font of ``size``, as few as that allows."""
    font, text_to_path = FontProperties(size=size), TextToPath()

    def fits(line: str) -> bool:
        return text_to_path.get_text_width_height_descent(line, font, ismath=False)[0] <= 72 * inches
    for chars in range(len(text), 0, -1):
        lines = textwrap.wrap(text, chars)
        if all(map(fits, lines)):
            return '\n'.join(lines)
    return text


def save_png(fig: Figure, path: Path) -> Path:
    """Render to PNG in memory, then write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def write_protocol_plots(protocol: str, rows: list[RowRuns], out_dir: str | Path) -> list[Path]:
    """The mIoU-by-step figure, and a heat map of one run (its lowest seed) per row."""
    out_dir = Path(out_dir)
    written = [save_png(miou_by_step_figure(protocol, rows),
                        out_dir / fitting_file_name([protocol], '-miou.png'))]
    for row in rows:
        run = row.runs[0]
        path = out_dir / fitting_file_name([protocol, row.method, run.run], '-iou.png')
        written.append(save_png(class_iou_figure(run), path))
    return written

