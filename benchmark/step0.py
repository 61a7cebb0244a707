"""The step-0 cache: a step-0 model trained once, reused by every run that would train it alike.

An entry is a folder of the cache (``<cache>/step0/<key>``) named by the key of everything the
model depends on: ``model.pth``, ``model.json`` (its digest, the run that trained it, in how
long), and an ``iou-<evaluation>.json`` for each evaluation it was scored by, holding the
digest of the weights it scored: IoUs are only ever paired with those. The model stored first
stays; a cache that cannot be written stops no run.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection, Iterable
from pathlib import Path

import torch
from mmengine.config import Config

from . import __version__
from .digests import json_digest, sections_digest
from .distributed import decided_by_main
from .io import (atomic_copy, atomic_write_json, cache_root, copy_if_absent, file_sha256,
                 read_json_or_none)
from .protocols import Protocol
from .speed import NO_AUTOCAST


def cache_key(steps: Protocol, kind: str, cfg: Config, unused_settings: Collection[str],
              seed: int, deterministic: bool, dataset_fingerprint: str, speed: dict) -> str:
    """Everything a step-0 model depends on. Methods of the same ``step0_kind`` share it, and
    so do protocols whose step 0 trains alike (``Protocol.first_step_training``): their later
    steps and how they score are not part of it, nor what of the config step 0 never reads
    (``_as_step0_reads_it``). ``steps``: the steps the method trains; ``unused_settings``: the
    method's ``settings_unused_at_step0``; ``speed``: the run's speed record
    (``runner.speed_record``). The code that trains and scores it counts by its bytes
    (``training_code_digest``), so a fix to it is never served the model trained before."""
    key = dict(kind=kind, step0=steps.first_step_training(),
               config=sections_digest(_as_step0_reads_it(cfg, unused_settings)),
               seed=seed, deterministic=deterministic, data=dataset_fingerprint,
               cssbench=__version__, code=training_code_digest())
    if speed['amp'] != NO_AUTOCAST:   # one trained under autocast (bf16, float16): not fp32's
        key['amp'] = speed['amp']
    if speed['world_size'] > 1:   # nor one trained in shares of the batch (torchrun)
        key['processes'] = dict(world_size=speed['world_size'], sync_bn=speed['sync_bn'])
    return json_digest(key, length=20)


def _as_step0_reads_it(cfg: Config, unused_settings: Collection[str]) -> dict:
    """The config's sections without what step 0 never reads: the later steps' learning rate
    and the method's ``unused_settings`` (a config setting LwF's ``loss_kd`` shares
    fine-tuning's step 0). A config setting none of them is the same config. The backbone's
    pretrained checkpoint counts by its bytes, not its path: one replaced in place is another
    step 0, one moved or copied elsewhere the same."""
    sections = cfg.to_dict()
    sections['schedule']['lr'] = sections['schedule']['lr'][:1]
    sections['model'] = {k: v for k, v in sections['model'].items() if k not in unused_settings}
    backbone = sections['model'].get('backbone')
    if isinstance(backbone, dict) and backbone.get('pretrained'):
        backbone['pretrained'] = 'sha256:' + file_sha256(Path(backbone['pretrained']).expanduser())
    return sections


# cssbench's modules that report on stored results or read the command line: the rest (and
# every method) trains or scores a step-0 model.
REPORTING_MODULES = frozenset({'__main__', 'cli', 'bench', 'profiling', 'tables', 'plots',
                               'published'})


@functools.cache
def training_code_digest(harness: Path = Path(__file__).parent,
                         methods: Path | None = None) -> str:
    """The digest of the Python files of cssbench (``harness``) but ``REPORTING_MODULES``, and
    of the methods' package (``methods``: ``baselines``, which a method of one's own joins)."""
    if methods is None:
        from . import baselines
        methods = Path(baselines.__file__).parent
    return _sources_digest({'cssbench': [p for p in harness.glob('*.py')
                                        if p.stem not in REPORTING_MODULES],
                           'baselines': methods.glob('*.py')})


def _sources_digest(packages: dict[str, Iterable[Path]]) -> str:
    """The sha256 of source files, each by its package and name and its bytes (16 hex digits):
    the same wherever the packages are installed."""
    digest = hashlib.sha256()
    files = sorted((f'{package}/{path.name}', path) for package, paths in packages.items()
                   for path in paths)
    for name, path in files:
        data = path.read_bytes()
        digest.update(f'{name}\0{len(data)}\0'.encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def _entry(key: str) -> Path:
    return cache_root() / 'step0' / key   # created by its first write


def _weights(entry: Path) -> Path:
    return entry / 'model.pth'


def _record(entry: Path) -> Path:
    return entry / 'model.json'


def _iou_file(entry: Path, protocol: Protocol) -> Path:
    return entry / f'iou-{"-".join(protocol.evaluation.values())}.json'   # iou-ignore-center.json


def _read_record(path: Path, digest: str) -> dict | None:
    """A cache record (JSON) about the weights of ``digest``; None if absent, unreadable, or
    about other weights."""
    return read_json_or_none(path, lambda record: record if record['model'] == digest else None)


def _loads(weights: Path) -> bool:
    """Whether ``weights`` exist and load, every number finite: a cached model cut short or
    damaged does not, nor one gone NaN (cached before a step gone NaN was stopped)."""
    if not weights.is_file():
        return False
    try:
        state = torch.load(weights, map_location='cpu', weights_only=True)
    except (OSError, MemoryError):
        raise   # the machine's trouble, not the file's
    except Exception:  # whatever else stops it loading is the file's
        return False
    return (isinstance(state, dict) and len(state) > 0
            and all(torch.isfinite(t).all() for t in state.values()
                    if isinstance(t, torch.Tensor) and t.is_floating_point()))


@decided_by_main
def reuse(key: str, protocol: Protocol, weights: Path) -> dict | None:
    """Copy the cached model to ``weights`` (the run's step-0 weights); returns its record
    (``model``: the digest of the weights copied, ``trained_in_s``, ``run``: None if unknown)
    with its IoUs under ``protocol``'s evaluation (``iou``: None if those weights were never
    scored so), or None if no model that loads is cached."""
    entry = _entry(key)
    model = _weights(entry)
    try:
        if not _loads(model):   # absent or damaged: train it
            return None
        atomic_copy(model, weights)
        digest = file_sha256(weights)  # the weights copied, whatever came since
    except OSError:   # the entry went away meanwhile
        return None
    record = _read_record(_record(entry), digest) or dict(trained_in_s=None, run=None)
    scores = _read_record(_iou_file(entry, protocol), digest)
    return dict(record, model=digest, iou=scores.get('iou') if scores else None)


def store(key: str, protocol: Protocol, weights: Path, run: Path, wall_time_s: float,
          iou: dict[int, float], log) -> None:
    """Cache the step-0 ``weights`` that ``run`` trained, with the IoUs they scored under
    ``protocol``'s evaluation, unless a model that loads is cached already: that one stays,
    with the IoUs stored for it (these too, if it holds the same weights)."""
    entry = _entry(key)
    try:
        digest = file_sha256(weights)
        model = _weights(entry)
        if model.exists() and not _loads(model):
            model.unlink(missing_ok=True)   # damaged
        if not copy_if_absent(weights, model):   # one cached before, or meanwhile
            store_iou(key, protocol, digest, run, iou, log)
            return
        atomic_write_json(_record(entry), dict(model=digest, trained_in_s=wall_time_s,
                                               run=str(run.resolve())))
        _write_iou(entry, protocol, digest, run, iou)
    except OSError as e:
        log(f'step-0 cache: {entry}: not stored ({e}); the run goes on')


def store_iou(key: str, protocol: Protocol, digest: str, run: Path, iou: dict[int, float],
              log) -> None:
    """Cache the IoUs that ``run``'s step-0 weights (of ``digest``) scored under
    ``protocol``'s evaluation, if those are the cached weights."""
    entry = _entry(key)
    model = _weights(entry)
    try:
        if model.exists() and file_sha256(model) == digest:
            _write_iou(entry, protocol, digest, run, iou)
    except OSError as e:
        log(f'step-0 cache: {entry}: IoUs not stored ({e}); the run goes on')


def _write_iou(entry: Path, protocol: Protocol, digest: str, run: Path,
               iou: dict[int, float]) -> None:
    atomic_write_json(_iou_file(entry, protocol),
                      dict(model=digest, iou={str(c): v for c, v in iou.items()},
                           run=str(run.resolve())))
