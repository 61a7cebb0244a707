"""The papers' published numbers (``data/paper_tables.csv``), matched to our protocols.

A row of that file gives a method's old / new / all mIoU in one setting (dataset, e.g.
``15-1``, variant ``overlapped``/``disjoint``/``unspecified``) and, where the paper says
so, which classes its old column averages (``old_range``, e.g. ``1-15`` or ``0-15``). A
protocol matches a row when its dataset and setting are the row's, its mode is the row's
variant or the row leaves the variant unstated (flagged as not exact), its classes come in
the papers' order (0..15, then 16, 17, ...) and it scores the images as the papers do (the
central crop): a protocol of another class order, drawn or written, or of whole-image
evaluation matches no row. Where the dataset never scores background (ADE20K), a paper's
``0-100`` covers the same scored classes as our ``1-100``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd

from .datasets_info import DATASET_INFO
from .protocols import parse_class_item, settings_of

PAPER_TABLES = Path(__file__).resolve().parent / 'data' / 'paper_tables.csv'
VARIANT_OF_MODE = {'overlap': 'overlapped', 'disjoint': 'disjoint'}
# Method names as papers print them -> cssbench's method names.
METHOD_ALIASES = {'fine-tuning': 'ft', 'finetuning': 'ft', 'offline': 'joint'}


@dataclass(frozen=True)
class PublishedCell:
    column: str                     # old | new | all
    classes: tuple[int, ...] | None  # the classes the paper's column averages, if it says
    value: float                    # mIoU in percent
    source: str
    exact_variant: bool             # False: the source does not state overlapped/disjoint
    caveat: str                     # the file's notes on the row ('' if none)


def setting_of(steps: list[list[int]]) -> str:
    """The papers' name of a protocol's class split: ``15-1`` for 0..15 then one class a step,
    ``100-50``, ``50-50`` (ADE's 0..50, 51..100, 101..150). Step 0's background is not counted."""
    sizes = [len(steps[0]) - 1] + [len(s) for s in steps[1:]]
    if len(sizes) > 1 and len(set(sizes[1:])) == 1:
        return f'{sizes[0]}-{sizes[1]}'
    return '-'.join(map(str, sizes))


def parse_range(text) -> tuple[int, ...] | None:
    """``old_range`` as class ids (``1-15``: 1..15, read as a protocol file's range); None if empty."""
    if not isinstance(text, str) or not text.strip():
        return None
    return tuple(parse_class_item(text.strip(), f'{PAPER_TABLES.name}: old_range'))


def method_key(name: str) -> str:
    key = name.strip().lower().replace(' ', '')
    return METHOD_ALIASES.get(key, key)


@lru_cache(maxsize=1)
def paper_table() -> pd.DataFrame:
    return pd.read_csv(PAPER_TABLES, dtype={'setting': str, 'old_range': str})


def in_papers_order(protocol: dict) -> bool:
    """The classes come step by step in id order, as in the papers' settings."""
    classes = [c for step in protocol['steps'] for c in step]
    return classes == list(range(len(classes)))


def incomparable(protocol: dict) -> str | None:
    """Why no published number can stand beside ``protocol``'s (a stored record), or None."""
    if not in_papers_order(protocol):
        return "the papers' settings learn the classes in id order, and this protocol's order is another"
    if settings_of(protocol).get('eval_crop') == 'whole':
        return "the papers score each image's central crop, and this protocol whole images"
    return None


def _setting_rows(protocol: dict) -> pd.DataFrame:
    """The file's rows for ``protocol``'s setting (any method); none where ``incomparable``."""
    table = paper_table()
    if incomparable(protocol):
        return table.iloc[:0]
    variant = VARIANT_OF_MODE[protocol['mode']]
    return table[(table['dataset'] == protocol['dataset'])
                 & (table['setting'] == setting_of(protocol['steps']))
                 & table['variant'].isin([variant, 'unspecified'])]


def published_methods(protocol: dict) -> list[str]:
    """The methods with published numbers in ``protocol``'s setting."""
    return sorted(set(_setting_rows(protocol)['method'].map(method_key)))


def published_cells(protocol: dict, method: str) -> list[PublishedCell]:
    """The published values for ``method`` in ``protocol``'s setting, exact variants first."""
    rows = _setting_rows(protocol)
    rows = rows[rows['method'].map(method_key).eq(method)]
    variant = VARIANT_OF_MODE[protocol['mode']]
    scored = DATASET_INFO[protocol['dataset']].scored
    cells = []
    for _, row in rows.iterrows():
        source = f"{row['source_paper']}, {row['source_location']}"
        caveat = row['notes'] if isinstance(row['notes'], str) else ''
        for column in ('old', 'new', 'all'):
            value = row[f'mIoU_{column}']
            if pd.notna(value):
                classes = parse_range(row['old_range']) if column == 'old' else None
                if classes is not None:
                    classes = scored(classes)
                cells.append(PublishedCell(column, classes, float(value), source,
                                           row['variant'] == variant, caveat))
    return sorted(cells, key=lambda c: not c.exact_variant)
