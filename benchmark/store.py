"""The results store: one folder per run, and the index the tables read.

``cssbench run`` writes each run to ``<results>/<protocol>/<method>/<run>/`` (``run.json``:
protocol, method and the class it built, seed, resolved config, code version, dataset fingerprint, dates, wall time;
``metrics.json``: per-step metrics and per-class IoU). ``<results>/index.json`` holds every
complete run's record and metrics, keyed by its folder and stamped with the size, times and
inode of those two files (``io.file_stamp``). Reading the store checks the stamps against the folders
and re-reads only what changed (a missing or stale index is rebuilt from the run folders); a
run folder that is corrupt or unfinished is reported and skipped, never fatal. The index is a
cache: a store this process cannot write (another user's, a read-only mount) is read all the
same, its index brought up to date in memory alone.

Runs are never merged: a table takes one run per (method, config, dataset, seed), the latest
finished unless the user names runs, and says which it took.
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
import shlex
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from .digests import epochs_and_the_rest, stored_digests
from .errors import UserError
from .io import atomic_write_json, file_stamp, read_json_or_none

INDEX_FILE = 'index.json'
INDEX_VERSION = 7   # 2: runs carry their training regime; 3: and whether they trained jointly,
                    # stamped with file_stamp; 4: and their shared config digest; 5: digests
                    # computed from the stored config (digests.stored_digests), and epochs;
                    # 6: metrics whose numbers are not IoUs (an edit by hand) refused;
                    # 7: and the method's settings
RUN_RECORD = 'run.json'      # a run folder's record: protocol, method, config, status, ...
RUN_METRICS = 'metrics.json'  # its per-step metrics
RUN_FILES = (RUN_RECORD, RUN_METRICS)
RUN_LOCK = '.lock'   # in a run folder and its work dir: held by the process running the run
DEFAULT_RESULTS = 'results'   # the commands' --results, relative to the cwd


def results_option(root: str | Path) -> str:
    """How a command names the results folder ``root`` in advice (a shell word): as
    ``--results`` unless the default."""
    return '' if Path(root) == Path(DEFAULT_RESULTS) else f' --results {shlex.quote(str(root))}'


PLAIN_NAME = 'a plain name (letters, digits, and . _ + - after the first; 255 at most)'


def is_plain_name(text: str) -> bool:
    """Whether ``text`` is ``PLAIN_NAME``, as a folder of the store (a protocol, a run) is: a
    longer name fails as the folder is made (File name too long), naming no option."""
    return re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9._+-]{0,254}', text) is not None


@dataclass(frozen=True)
class StoredRun:
    """One complete run, as the tables need it."""
    path: str               # the run folder, relative to the results root
    protocol: dict          # the protocol the run trained (its class order resolved)
    method: str
    joint: bool             # the method trains every class in one step (an upper bound)
    run: str
    seed: int
    config_name: str
    # the config's digests (digests.stored_digests): its whole, and but for the method's own
    # settings (None: a run stored with no config nor a shared digest)
    config_digest: str
    shared_config_digest: str | None
    epochs: int | None      # each step's, and the config's digest without them
    digest_but_epochs: str | None   # (digests.epochs_and_the_rest; None: not recorded)
    started: str
    finished: str
    wall_time_s: float | None
    git_revision: str       # the commit, DIRTY_REVISION appended where the code differed from it
    cssbench_version: str
    dataset_fingerprint: str
    regime: str             # how it trained, in words (``run_regime``)
    steps: list[dict]       # metrics.json's per-step records
    # the method's own settings as it trained with them (None: stored before run.json said)
    method_settings: dict | None = None

    @property
    def protocol_name(self) -> str:
        return self.protocol['name']


@dataclass(frozen=True)
class SkippedRun:
    path: str   # in the store: <protocol>/<method>/<run>, or a folder above that is unlisted ('.')
    reason: str

    @property
    def protocol(self) -> str:
        return self.path.split('/')[0]


@dataclass
class Store:
    root: Path
    runs: list[StoredRun] = field(default_factory=list)
    skipped: list[SkippedRun] = field(default_factory=list)
    index_not_written: str | None = None   # why the stale index stayed so on disk, if it did

    def index_note(self) -> str | None:
        """A line saying that the index could not be brought up to date, if so."""
        if self.index_not_written is None:
            return None
        return (f'{self.root / INDEX_FILE}: not updated ({self.index_not_written}); the runs '
                f'changed since it was written are read from their folders each time')

    def protocols(self) -> list[str]:
        return sorted({r.protocol_name for r in self.runs})

    def protocols_with_skipped(self) -> list[str]:
        """``protocols``, and those whose folders hold skipped runs alone (to name them)."""
        return sorted({*self.protocols(), *(s.protocol for s in self.skipped)} - {'.'})

    def skipped_in(self, protocol: str) -> list[SkippedRun]:
        """The run folders of ``protocol`` that could not be read as complete runs."""
        return [s for s in self.skipped if s.protocol == protocol]

    def skipped_note(self, protocol: str) -> str:
        """`` (skipped: <folder>: <why>; ...)`` for ``protocol``'s skipped runs; '' if none."""
        skipped = [f'{s.path}: {s.reason}' for s in self.skipped_in(protocol)]
        return f' (skipped: {"; ".join(skipped)})' if skipped else ''


class CorruptRun(Exception):
    """A run folder that cannot be read as a run; the message says why."""


def _stamp(run_dir: Path) -> list:
    """The run files' ``file_stamp``s (None for one that is absent)."""
    stamp = []
    for name in RUN_FILES:
        try:
            stamp.append([name, *file_stamp(run_dir / name)])
        except OSError:
            stamp.append([name, None])
    return stamp


def read_json_object(path: Path) -> dict:
    """A results file's JSON object; raises CorruptRun saying why it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptRun(f'{path.name} is missing') from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptRun(f'{path.name} is not readable JSON ({e})') from None
    if not isinstance(data, dict):
        raise CorruptRun(f'{path.name} does not hold a JSON object')
    return data


def _require(record: dict, name: str, kind, where: str):
    value = record.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CorruptRun(f'{where} lacks a valid {name!r}')
    return value


def _check_steps(steps, num_steps: int) -> list[dict]:
    if not isinstance(steps, list) or len(steps) != num_steps:
        got = len(steps) if isinstance(steps, list) else 'no'
        raise CorruptRun(f'metrics.json holds {got} steps, the run trained {num_steps}')
    for t, step in enumerate(steps):
        columns = step.get('columns') if isinstance(step, dict) else None
        if (not isinstance(columns, dict) or any(not isinstance(columns.get(c), dict)
                                                 for c in ('old', 'new', 'all'))
                or not isinstance(step.get('iou'), dict)):
            raise CorruptRun(f'metrics.json: step {t} lacks its columns or per-class IoU')
        if type(step.get('step')) is not int:
            raise CorruptRun(f"metrics.json: step {t} lacks a valid 'step'")
        for c in ('old', 'new', 'all'):
            if not isinstance(columns[c].get('label'), str):
                raise CorruptRun(f'metrics.json: step {t}: {c} lacks its label')
            if not _is_fraction(columns[c].get('mIoU')):
                raise CorruptRun(f'metrics.json: step {t}: {c} mIoU {columns[c].get("mIoU")!r} '
                                 f'is not a fraction in [0, 1] (or null)')
        for c, iou in step['iou'].items():
            if not c.isdigit() or not _is_fraction(iou):
                raise CorruptRun(f'metrics.json: step {t}: IoU {iou!r} of class {c!r} is not a '
                                 f'fraction in [0, 1] (or null)')
    return steps


def _is_fraction(value) -> bool:
    """An IoU as metrics.json stores it: a number in [0, 1], NaN, or None (not scored)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and (math.isnan(value) or 0 <= value <= 1))


UNKNOWN_REGIME = 'regime unknown'
DIRTY_REVISION = '+dirty'   # appended to a run's git revision: its code had changes not committed


def training_regime(speed) -> str:
    """run.json's ``speed`` record in words, the settings that can move the numbers: device
    and autocast dtype, then the processes, the batch of each and whether BN statistics were
    synchronised (torchrun); ``UNKNOWN_REGIME`` where the record has none, or not these."""
    if not isinstance(speed, dict):
        return UNKNOWN_REGIME
    device, amp, processes = speed.get('device'), speed.get('amp'), speed.get('world_size', 1)
    if not (isinstance(device, str) and isinstance(amp, str) and type(processes) is int):
        return UNKNOWN_REGIME
    if processes == 1:
        return f'{device} {amp}'
    batch, sync_bn = speed.get('batch_per_process'), speed.get('sync_bn')
    if type(batch) is not int or not isinstance(sync_bn, bool):
        return UNKNOWN_REGIME
    return (f'{device} {amp}, {processes} processes of batch {batch}, '
            + ('SyncBN' if sync_bn else 'BN per process'))


def run_regime(record: dict) -> str:
    """How a run trained, over the sessions that trained it (run.json's ``speed_history``;
    ``speed`` alone in runs recorded before it): each distinct regime, in order."""
    history = record.get('speed_history')
    sessions = history if isinstance(history, list) and history else [record.get('speed')]
    return ', then '.join(dict.fromkeys(training_regime(speed) for speed in sessions))


def read_run(root: Path, run_dir: Path) -> StoredRun:
    """The complete run stored in ``run_dir``; raises CorruptRun saying why it is not one."""
    record = read_json_object(run_dir / RUN_RECORD)
    status = record.get('status')
    if status != 'complete':
        done = len(list((run_dir / 'steps').glob('step*.json')))
        how = (f'stopped by {record["stopped_by"]}' if status == 'stopped' and record.get('stopped_by')
               else f'status {status!r}')
        raise CorruptRun(f'unfinished ({how}, {done} step(s) done)')
    protocol = _require(record, 'protocol', dict, RUN_RECORD)
    protocol_steps = _require(protocol, 'steps', list, "run.json's protocol")
    _require(protocol, 'name', str, "run.json's protocol")
    # a joint method trains every class in one step, reported in the protocol's columns; runs
    # stored before run.json said so are joint training's
    joint = record['joint'] if isinstance(record.get('joint'), bool) else record.get('method') == 'joint'
    num_steps = 1 if joint else len(protocol_steps)
    steps = _check_steps(read_json_object(run_dir / RUN_METRICS).get('steps'), num_steps)
    env = record.get('environment') if isinstance(record.get('environment'), dict) else {}
    digest, shared_digest = stored_digests(record)
    epochs, digest_but_epochs = epochs_and_the_rest(record)
    if not isinstance(digest, str):
        raise CorruptRun("run.json lacks a valid 'config' and 'config_digest'")
    return StoredRun(
        path=run_dir.relative_to(root).as_posix(), protocol=protocol,
        method=_require(record, 'method', str, RUN_RECORD), joint=joint,
        run=_require(record, 'run', str, RUN_RECORD),
        seed=_require(record, 'seed', int, RUN_RECORD),
        config_name=_require(record, 'config_name', str, RUN_RECORD),
        config_digest=digest, shared_config_digest=shared_digest,
        epochs=epochs, digest_but_epochs=digest_but_epochs,
        started=str(record.get('started', '')), finished=_require(record, 'finished', str, RUN_RECORD),
        wall_time_s=record.get('wall_time_s'), git_revision=str(record.get('git_revision', 'unknown')),
        cssbench_version=str(env.get('cssbench', 'unknown')),
        dataset_fingerprint=str(record.get('dataset_fingerprint', '')),
        regime=run_regime(record), steps=steps,
        method_settings=(record['method_settings'] if isinstance(record.get('method_settings'), dict)
                         else None))


def now_stamp() -> str:
    """The time now as run.json records it (started, finished, stopped): local, with its UTC
    offset, so that runs made on machines in other time zones order by when they finished."""
    return datetime.now().astimezone().isoformat(timespec='seconds')


def finished_at(run: StoredRun) -> float:
    """When ``run`` finished, in seconds since the epoch: a time stored without its UTC offset
    (runs stored before they had one) read as the reader's local time; one that is not a
    time, as the oldest."""
    try:
        return datetime.fromisoformat(run.finished).timestamp()
    except ValueError:
        return float('-inf')


def run_folder(root: str | Path, protocol: str, method: str, run: str) -> Path:
    """Where a run is stored: ``<results>/<protocol>/<method>/<run>``."""
    return Path(root) / protocol / method / run


def run_folders(root: Path, protocol: str | None = None) -> list[Path]:
    """Every run folder under ``root`` (of ``protocol``, a plain name, if given) holding
    anything but a lock, or that cannot be listed (its reader names it skipped, and why)."""
    return scan_store(root, protocol)[0]


def scan_store(root: Path, protocol: str | None = None) -> tuple[list[Path], list[SkippedRun]]:
    """``run_folders``, and the protocol and method folders above them that cannot be listed
    (another user's, mode 000), each a ``SkippedRun``: the runs in them are not read."""
    unlisted: list[SkippedRun] = []

    def subfolders(folder: Path) -> list[Path]:
        try:
            return sorted(child for child in folder.iterdir() if child.is_dir())
        except FileNotFoundError:   # removed meanwhile
            return []
        except OSError as e:
            unlisted.append(SkippedRun(folder.relative_to(root).as_posix(),
                                       f'cannot be listed ({e.strerror or e}): its runs are not read'))
            return []

    if protocol is None:
        protocols = subfolders(root)
    else:
        protocols = [root / protocol] if (root / protocol).is_dir() else []
    runs = [run for folder in protocols for method in subfolders(folder)
            for run in subfolders(method) if _holds_a_run(run)]
    return runs, unlisted


def _holds_a_run(folder: Path) -> bool:
    try:
        return any(child.name != RUN_LOCK for child in folder.iterdir())
    except FileNotFoundError:   # removed meanwhile
        return False
    except OSError:   # unreadable (another user's, mode 000): a run its reader cannot see
        return True


def _read_index(root: Path) -> dict:
    """The index's runs; none if it is absent, damaged, or of another version."""
    runs = read_json_or_none(root / INDEX_FILE, lambda index: index['runs']
                             if index.get('version') == INDEX_VERSION else None)
    return runs if isinstance(runs, dict) else {}


def open_store(root: str | Path) -> Store:
    """Every run under ``root``: complete ones from the index where its stamps still hold,
    read anew otherwise; the index is rewritten when anything changed, where it can be
    (``Store.index_not_written`` says why not)."""
    root = Path(root)
    store = Store(root)
    if not root.is_dir():
        return store
    cached = _read_index(root)
    fresh: dict[str, dict] = {}
    folders, store.skipped = scan_store(root)
    for run_dir in folders:
        key = run_dir.relative_to(root).as_posix()
        stamp = _stamp(run_dir)
        entry = cached.get(key)
        if isinstance(entry, dict) and entry.get('stamp') == stamp:
            try:
                run = StoredRun(**entry['run'])
            except (TypeError, KeyError):
                run = None
            if run is not None:
                store.runs.append(run)
                fresh[key] = entry
                continue
        try:
            run = read_run(root, run_dir)
        except CorruptRun as e:
            store.skipped.append(SkippedRun(key, str(e)))
            continue
        store.runs.append(run)
        fresh[key] = dict(stamp=stamp, run=asdict(run))
    if fresh != cached:
        store.index_not_written = _write_index(root, fresh)
    return store


def _write_index(root: Path, runs: dict) -> str | None:
    """Write the index of ``runs``; None once written, else why it could not be. Not fatal: the
    index is a cache, and a reader of a store it cannot write (a colleague's, a read-only
    mount; ``chmod`` alone makes the stamps stale) tabulates it all the same."""
    try:
        atomic_write_json(root / INDEX_FILE, dict(version=INDEX_VERSION, runs=runs))
    except OSError as e:   # the write leaves no temporary behind (io.temporary_beside)
        return e.strerror or str(e)
    return None


def _matches(run: StoredRun, patterns: list[str] | None) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(run.run, p) for p in patterns)


@dataclass
class RowRuns:
    """The runs one table row aggregates: one per seed, and the ones it left out."""
    method: str
    setup: str              # the config's name (with its epochs or digest where two configs
                            # share a name: ``config_labels``) and, where runs trained on
                            # several datasets, the data's fingerprint
    runs: list[StoredRun]
    passed_over: list[StoredRun]
    label: str              # the row's name: the method, with its setup where rows differ in it

    @property
    def joint(self) -> bool:
        return self.runs[0].joint   # one method's runs


def _config_matches(config_name: str, config: str) -> bool:
    """``--config``: a run's config by the name it was run with, or a config file's by its
    bare name (``anchor`` or ``anchor.py`` for ``cfgs/anchor.py``)."""
    def bare(name: str) -> str:
        return Path(name).name.removesuffix('.py')
    return config_name == config or (Path(config).name == config and config_name.endswith('.py')
                                     and bare(config_name) == bare(config))


def config_labels(runs: list[StoredRun]) -> dict[tuple[str, str], str]:
    """How a table names each config of ``runs`` (by name and digest): its name, where no
    other config shares it; else with its epochs (``small, 3 epochs``), where the configs of
    that name differ in their epochs alone (runs of one config file given other --epochs);
    else with its digest (``small@2f0f28``)."""
    by_name: dict[str, dict[str, StoredRun]] = {}
    for r in runs:   # a config's runs share its epochs and the rest: the digest hashes them
        by_name.setdefault(r.config_name, {})[r.config_digest] = r
    labels = {}
    for name, configs in by_name.items():
        epochs = [r.epochs for r in configs.values()]
        by_epochs = (len({r.digest_but_epochs for r in configs.values()}) == 1
                     and None not in epochs and len(set(epochs)) == len(epochs))
        for digest, r in configs.items():
            if len(configs) == 1:
                labels[name, digest] = name
            elif by_epochs:
                labels[name, digest] = f'{name}, {r.epochs} epoch{"s" if r.epochs != 1 else ""}'
            else:
                labels[name, digest] = f'{name}@{digest[:6]}'
    return labels


def _row_order(group: tuple[tuple[str, str, str, str], list[StoredRun]]) -> tuple:
    """Rows by method, then config name, then epochs (a config's runs share them: its
    digest hashes them), then digest and data."""
    (method, config_name, digest, data), runs = group
    return method, config_name, runs[0].epochs or 0, digest, data


def _refuse_protocols_of_one_name(runs: list[StoredRun]) -> None:
    """Runs of different protocols that share a name (stores merged from machines where each
    wrote its own file of that name) are no seeds of one row: refused, naming one of each."""
    from .protocols import protocol_definition   # protocols reads the store
    first: dict[str, StoredRun] = {}
    for r in runs:
        first.setdefault(json.dumps(protocol_definition(r.protocol), sort_keys=True), r)
    if len(first) > 1:
        a, b = list(first.values())[:2]
        raise UserError(f'runs of {len(first)} different protocols named {a.protocol_name!r} are '
                        f'stored ({a.path}, {b.path}); --run picks the runs of one')


def select_runs(store: Store, protocol: str, runs: list[str] | None = None,
                config: str | None = None) -> list[RowRuns]:
    """One row per (method, config, dataset): for each seed, the latest finished complete run
    (among those whose name matches one of ``runs``' glob patterns, if given). Runs of other
    data (another dataset fingerprint: other images or labels) are never averaged together."""
    candidates = [r for r in store.runs if r.protocol_name == protocol and _matches(r, runs)
                  and (config is None or _config_matches(r.config_name, config))]
    _refuse_protocols_of_one_name(candidates)
    configs = config_labels(candidates)
    several_datasets = len({r.dataset_fingerprint for r in candidates}) > 1

    def setup(config_name: str, digest: str, data: str) -> str:
        name = configs[config_name, digest]
        return f'{name}, data {data[:6]}' if several_datasets else name

    groups: dict[tuple[str, str, str, str], list[StoredRun]] = {}
    for r in candidates:
        groups.setdefault((r.method, r.config_name, r.config_digest, r.dataset_fingerprint), []).append(r)
    several_setups = len({key[1:] for key in groups}) > 1
    rows = []
    for (method, *setup_key), group in sorted(groups.items(), key=_row_order):
        setup_label = setup(*setup_key)
        latest: dict[int, StoredRun] = {}
        for r in sorted(group, key=lambda r: (finished_at(r), r.path)):
            latest[r.seed] = r
        chosen = [latest[s] for s in sorted(latest)]
        rows.append(RowRuns(method, setup_label, chosen, [r for r in group if r not in chosen],
                            f'{method} ({setup_label})' if several_setups else method))
    return rows
