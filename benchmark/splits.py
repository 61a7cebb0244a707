"""Per-step image lists: which images each step trains and is evaluated on.

The rules are those of the reference code (fcdl94/MiB and LTTM/SDR ``dataset/utils.py:
filter_images``). With C the step's classes without background and O the earlier steps':

* overlapped: keep an image iff its mask holds a class of C;
* disjoint: keep it iff its mask holds a class of C and every value is in C ∪ O ∪ {0, 255}.

The evaluation set at step t is the val split filtered like the overlapped rule with every
class seen so far (the reference builds its test set with ``labels=labels_cum``), so it grows
with the steps and at the last step holds every val image holding any class (for VOC, the
whole list: all 1,449 images); an image of background and 255 alone is never scored.

Scanning every mask for its label set, and every image and mask for the sha256 of its
bytes, is done once per dataset folder and cached; the per-step lists are cached by a hash of
the protocol and the dataset's fingerprint (those digests).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from .datasets import (SPLITS, Sample, decoded_image_size, list_samples, read_mask,
                       root_not_found)
from .datasets_info import DATASET_INFO, IGNORE_INDEX
from .errors import DatasetError
from .io import atomic_write_json, cache_dir, file_sha256, file_stamp, read_json_or_none
from .protocols import Protocol

LabelSets = dict[str, tuple[int, ...]]


class SampleScan(NamedTuple):
    """What a scan learns of one sample: its mask's set of values, and the sha256 of its
    image's and its mask's bytes."""
    labels: tuple[int, ...]
    image_sha256: str
    mask_sha256: str


SplitScan = dict[str, SampleScan]   # by sample id, in list order
# Part of a scan's cache key: a scan made by an earlier version is made again. 2: each image
# decoded whole (1 read its header only, and passed a file cut short).
SCAN_VERSION = 2


def keep_for_step(labels: set[int] | tuple[int, ...], current: set[int], old: set[int],
                  mode: str) -> bool:
    """The reference's filter for one image's label set (``current`` may include 0)."""
    current_fg = set(current) - {0}
    labels = set(labels)
    if not labels & current_fg:
        return False
    if mode == 'overlap':
        return True
    return labels <= current_fg | set(old) | {0, IGNORE_INDEX}


def scan_split(samples: list[Sample], num_classes: int, desc: str = 'scan',
               progress: bool = True) -> SplitScan:
    """Each mask's set of values and each image's and mask's sha256, one sample at a time.

    Fails early, naming the file, on a mask value that is neither a class id nor 255, an
    image that does not decode whole, and an image whose size differs from its mask's.
    """
    valid = np.zeros(256, dtype=bool)
    valid[:num_classes] = True
    valid[IGNORE_INDEX] = True
    scans: SplitScan = {}
    # disable=None: no bar where stderr is not a terminal (a log file would get its \r frames)
    for sample in tqdm(samples, desc=desc, disable=None if progress else True, unit='image',
                       leave=False):
        mask = read_mask(sample.mask)
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
        bad = present[~valid[present]]
        if bad.size:
            raise DatasetError(f'{sample.mask}: mask holds value(s) {bad.tolist()} that are neither '
                               f'a class id (0..{num_classes - 1}) nor {IGNORE_INDEX}')
        width, height = decoded_image_size(sample.image)
        if (height, width) != mask.shape:
            raise DatasetError(f'{sample.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs '
                               f'from image size {width}x{height} ({sample.image})')
        scans[sample.id] = SampleScan(tuple(int(v) for v in present), file_sha256(sample.image),
                                      file_sha256(sample.mask))
    return scans


def _file_stamp(path: Path) -> str:
    return '|'.join(map(str, (path, *file_stamp(path))))


def _listing_key(layout: str, root: Path, split: str, samples: list[Sample]) -> str:
    """Identifies a split's listing: its images' and masks' ``_file_stamp`` (a file changed
    since the last scan changes it)."""
    h = hashlib.sha256(f'{SCAN_VERSION}|{layout}|{root.resolve()}|{split}'.encode())
    for s in samples:
        h.update(f'{s.id}|{_file_stamp(s.image)}|{_file_stamp(s.mask)}\n'.encode())
    return h.hexdigest()[:16]


def _parse_scan(stored: dict) -> SplitScan:
    return {i: SampleScan(tuple(record['labels']), record['image_sha256'], record['mask_sha256'])
            for i, record in stored.items()}


def _parse_steps(stored: dict) -> list[dict]:
    steps = stored['steps']
    if not all(isinstance(s, dict) and {'step', 'classes', 'train', 'val'} <= s.keys() for s in steps):
        raise TypeError('not per-step splits')
    return list(steps)


@dataclass
class DatasetIndex:
    """A dataset folder's samples and their scans per split, and its fingerprint."""
    dataset: str
    root: Path   # absolute, symbolic links resolved: a run's record names it, read from anywhere
    samples: dict[str, list[Sample]]
    scans: dict[str, SplitScan]

    @property
    def label_sets(self) -> dict[str, LabelSets]:
        return {split: {i: scan.labels for i, scan in scans.items()}
                for split, scans in self.scans.items()}

    @cached_property
    def fingerprint(self) -> str:
        """The data's identity: each split's sample ids in list order, each with the sha256 of
        its image's and its mask's bytes (the label sets follow from the masks). Paths and
        times are left out: a copy of the folder elsewhere has the same fingerprint."""
        h = hashlib.sha256(self.dataset.encode())
        for split in SPLITS:
            contents = [[i, scan.image_sha256, scan.mask_sha256]
                        for i, scan in self.scans[split].items()]
            h.update(json.dumps(contents).encode())
        return h.hexdigest()[:16]

    @property
    def label_set_fingerprint(self) -> str:
        """The fingerprint of cssbench before it counted the files' bytes: of the label sets
        alone, which runs started then hold (a run continued on this data may be one)."""
        h = hashlib.sha256(self.dataset.encode())
        for split in SPLITS:
            h.update(json.dumps(list(self.label_sets[split].items())).encode())
        return h.hexdigest()[:16]


def index_dataset(dataset: str, root: str | Path, progress: bool = True) -> DatasetIndex:
    """Each split's samples and scans; a split's scan is read from the cache while none of
    its files changed (``_file_stamp``) since it was made."""
    info = DATASET_INFO[dataset]
    root = Path(root).expanduser()
    samples, scans = list_samples(info, root), {}   # every list checked before a scan is cached
    for split in SPLITS:
        key = _listing_key(info.layout, root, split, samples[split])
        cache_file = cache_dir('scans') / f'{dataset}-{split}-{key}.json'
        scans[split] = read_json_or_none(cache_file, _parse_scan)   # damaged: made again
        if scans[split] is None:
            scans[split] = scan_split(samples[split], info.num_classes,
                                      desc=f'scan {split} images and masks', progress=progress)
            atomic_write_json(cache_file, {i: scan._asdict() for i, scan in scans[split].items()})
    return DatasetIndex(dataset, root.resolve(), samples, scans)


def compute_splits(protocol: Protocol, label_sets: dict[str, LabelSets]) -> list[dict]:
    """Per step: its classes, the kept training ids and the evaluation ids, in list order."""
    steps = []
    for t, classes in enumerate(protocol.steps):
        old = set(protocol.classes_old(t))
        seen = set(protocol.classes_seen(t))
        train = [i for i, ls in label_sets['train'].items()
                 if keep_for_step(ls, set(classes), old, protocol.mode)]
        val = [i for i, ls in label_sets['val'].items()
               if keep_for_step(ls, seen, set(), 'overlap')]
        steps.append(dict(step=t, classes=list(classes), train=train, val=val))
    return steps


def protocol_splits(protocol: Protocol, index: DatasetIndex) -> list[dict]:
    """``compute_splits``, cached by protocol and dataset fingerprints."""
    if protocol.dataset != index.dataset:
        raise DatasetError(f'protocol {protocol.name!r} is for dataset {protocol.dataset!r}, '
                           f'the index is of {index.dataset!r}')
    cache_file = cache_dir('splits') / f'{protocol.fingerprint}-{index.fingerprint}.json'
    steps = read_json_or_none(cache_file, _parse_steps)
    if steps is not None and len(steps) == protocol.num_steps:
        return steps
    steps = compute_splits(protocol, index.label_sets)
    atomic_write_json(cache_file, dict(protocol=protocol.to_dict(), dataset=index.dataset,
                                       dataset_fingerprint=index.fingerprint, steps=steps))
    return steps


def select(samples: list[Sample], ids: list[str]) -> list[Sample]:
    by_id = {s.id: s for s in samples}
    return [by_id[i] for i in ids]


def resolve_data_root(dataset: str, data_root: str | None, progress: bool = True) -> Path:
    """The dataset folder: ``data_root`` if given; for ``synth``, the generated default; else
    the folder ``$CSSBENCH_<DATASET>_ROOT`` names (``$CSSBENCH_VOC_ROOT``, ``$CSSBENCH_ADE_ROOT``)."""
    if data_root is not None:
        return Path(data_root).expanduser()
    if dataset == 'synth':
        from .synth import ensure_default_synth
        return ensure_default_synth(progress=progress)
    variable = f'CSSBENCH_{dataset.upper()}_ROOT'
    if not os.environ.get(variable):
        raise DatasetError(f'protocol needs dataset {dataset!r}: pass --data-root or set {variable}')
    root = Path(os.environ[variable]).expanduser()
    if not root.is_dir():   # said here, where the variable is known to be its source
        raise DatasetError(f'{root}: {root_not_found(root)} (named by ${variable})')
    return root
