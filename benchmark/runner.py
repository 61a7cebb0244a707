"""Runs a method through every step of a protocol with mmengine's Runner.

Per step: build the step's datasets and the model (previous step's weights loaded, the
previous model attached as a frozen teacher), train with mmengine, evaluate on the val
images of the classes seen so far, save the step's weights and metrics, go on.

Nothing is lost to an interruption: a step whose weights and metrics exist is not trained
again, and an interrupted step resumes from its last epoch checkpoint. Every random draw
after an epoch boundary (data order, augmentation, dropout) depends only on the seed, the
step and the epoch, so a resumed run ends with the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import math
import platform
import re
import shutil
import subprocess
import time
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from mmengine.config import Config, ConfigDict
from mmengine.runner import set_random_seed

from . import __version__, step0
from .config import (CPU_CONFIG, NON_NEGATIVE, config_digest, is_number, is_whole_number,
                     load_config, shared_config_digest)
from .digests import SHARED_MODEL_SETTINGS, config_differences, stored_digests
from .distributed import (barrier, broadcast_buffers_from_main, decided_by_main, is_main_process,
                          world_size)
from .engine import per_process_batch, score_step, step_runner, trusting_own_epoch_checkpoints
from .errors import RunHeldElsewhere, UserError
from .hooks import CLOCK_FILE, autocasts_training, earlier_training_seconds, processes_training
from .io import atomic_path, atomic_write_json, atomic_write_text, read_json_or_none
from .methods import Method, get_method, registered_methods
from .metrics import range_label, summarize_step
from .models import LossWeight, read_state_dict
from .protocols import Protocol, check_stored_protocol_name, load_protocol
from .registry import MODELS
from .seeds import derive_seed
from .speed import (autocast_name, effective_speed, emulated_bf16_note, prepare_model,
                    training_device)
from .splits import DatasetIndex, index_dataset, protocol_splits, resolve_data_root, select
from .store import (DEFAULT_RESULTS, DIRTY_REVISION, PLAIN_NAME, RUN_LOCK, RUN_METRICS,
                    RUN_RECORD, CorruptRun, is_plain_name, now_stamp, open_store, read_json_object,
                    results_option, run_folder)
from .tables import format_step_table, steps_to_csv

REPO_ROOT = Path(__file__).resolve().parent.parent
THIS_FILE_IN_REPO = Path(__file__).resolve().relative_to(REPO_ROOT)   # benchmark/runner.py
WORK_MARKER = 'cssbench-work.json'  # names the run whose checkpoints a work dir holds


# What a run's code is: a change here (a method file being written, say) marks the revision.
CODE_PATHS = ('benchmark', 'baselines', 'protocols', 'pyproject.toml')


def git_revision() -> str:
    """The commit the code is at, with ``DIRTY_REVISION`` appended where the code differs from it
    (``CODE_PATHS``: changed, new or deleted files); 'unknown' where git does not track this
    file (installed from a wheel, into a site-packages that may lie in another repository)."""
    try:
        head = _git('rev-parse', 'HEAD')
        if not head or not _git('ls-files', '--error-unmatch', '--', str(THIS_FILE_IN_REPO)):
            return 'unknown'
        return head + (DIRTY_REVISION if _git('status', '--porcelain', '--', *CODE_PATHS) else '')
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


@functools.cache
def revision_of_this_process() -> str:
    """``git_revision`` when this process first asks (``cssbench run`` asks as it starts, its
    code imported): every run of a command runs that code, whatever is committed or edited in
    the checkout while it goes on, so each run records that revision."""
    return git_revision()


def _git(*args: str) -> str:
    out = subprocess.run(['git', *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    return out.stdout.strip() if out.returncode == 0 else ''


def environment() -> dict:
    import mmengine
    import mmseg
    import torchvision
    return dict(python=platform.python_version(), torch=torch.__version__,
                torchvision=torchvision.__version__, mmengine=mmengine.__version__,
                mmseg=mmseg.__version__, cssbench=__version__, platform=platform.platform(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
                gpus=torch.cuda.device_count(), torch_threads=torch.get_num_threads())


def seed_step(seed: int, t: int, deterministic: bool) -> int:
    """Seed the global generators for step ``t`` (the model's initialisation draws from them);
    returns the step's seed, which seeds its data order and augmentation too."""
    step_seed = derive_seed(seed, t, bits=31)   # below 2**31, as mmengine's own seeds
    set_random_seed(step_seed, deterministic=deterministic)
    return step_seed


def steps_of(protocol: Protocol, method: Method) -> Protocol:
    """The steps a method trains: the protocol's, or all its classes at once for ``joint``."""
    return protocol.joint() if method.joint else protocol


@dataclass
class RunPaths:
    results: Path       # metrics, tables, run.json: the product's memory (store.run_folder)
    work: Path          # checkpoints and mmengine logs

    @property
    def store_root(self) -> Path:
        return self.results.parents[2]   # <results>/<protocol>/<method>/<run>

    @property
    def protocol_name(self) -> str:
        return self.results.parents[1].name

    def step_work(self, step: int) -> Path:
        return self.work / f'step{step}'

    def step_weights(self, step: int) -> Path:
        return self.step_work(step) / 'model.pth'

    def step_metrics(self, step: int) -> Path:
        return self.results / 'steps' / f'step{step}.json'


def model_setting_parameters(model_cls) -> dict[str, inspect.Parameter]:
    """The keyword arguments a segmentor class takes (its constructor's, then its bases' for
    as long as each constructor passes ``**kwargs`` on), each with its parameter (default,
    annotation) in the most derived constructor that takes it."""
    found = {}
    for klass in model_cls.__mro__:
        if '__init__' not in vars(klass):
            continue
        params = inspect.signature(vars(klass)['__init__']).parameters.values()
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != 'self':
                found.setdefault(p.name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return found


# What a method's setting may be, by the name of its annotation's type: (said as, test).
_SETTING_KINDS = {
    'bool': ('True or False', lambda v: isinstance(v, bool)),
    'int': ('a whole number', is_whole_number),
    'float': ('a number', is_number),
    LossWeight.__name__: NON_NEGATIVE,
    'str': ('a string', lambda v: isinstance(v, str)),
    'None': ('None', lambda v: v is None),
}


def _setting_kinds(param: inspect.Parameter) -> list[str] | None:
    """The kinds a method's setting may be: its annotation's types (``float | None``,
    ``LossWeight``), or without one its default's (an int default taking any number); None
    where they are not all plain kinds (a tuple, a class, a type left generic): anything goes."""
    annotation = param.annotation
    if annotation is inspect.Parameter.empty:
        if isinstance(param.default, bool):
            return ['bool']
        if isinstance(param.default, (int, float)):
            return ['float']
        return ['str'] if isinstance(param.default, str) else None
    written = str(getattr(annotation, '__name__', annotation)).strip('\'"')   # 'float | None'
    names = [n.strip().rsplit('.', 1)[-1] for n in written.split('|')]   # models.LossWeight too
    return names if all(n in _SETTING_KINDS for n in names) else None


def setting_refusal(param: inspect.Parameter, value) -> str | None:
    """What is wrong with ``value`` for a method's setting (``_setting_kinds``), or None."""
    kinds = _setting_kinds(param)
    if kinds is None or any(_SETTING_KINDS[k][1](value) for k in kinds):
        return None
    return f'must be {" or ".join(_SETTING_KINDS[k][0] for k in kinds)}, got {value!r}'


def check_model_settings(cfg: Config, model_type: str) -> None:
    """Refuse a config whose ``model`` section sets what this method's segmentor does not
    take (e.g. SDR's ``loss_kd`` given to fine-tuning), or a value not of a setting's kind
    (``setting_refusal``), before anything is built."""
    for part in ('backbone', 'decode_head'):
        part_type = cfg.model[part].get('type') if isinstance(cfg.model[part], dict) else None
        if not isinstance(part_type, str) or MODELS.get(part_type) is None:
            raise UserError(f'{cfg.filename}: model.{part}.type: {part_type!r} is not a '
                            f'registered model (cssbench registers its own as cssbench.<Name>)')
        # in_channels: the backbone's, set by the segmentor
        _check_settings(cfg, f'model.{part}', cfg.model[part], MODELS.get(part_type), part_type,
                        ignored={'type', 'in_channels'})
    model_cls = MODELS.get(model_type)
    if model_cls is None:
        return
    method = next((m.name for m in registered_methods().values()
                   if m.model_type == model_type), model_type)
    # ``type`` is the method's own (build_model sets it); step_sizes, the protocol's
    _check_settings(cfg, 'model', cfg.model, model_cls, f'method {method!r}',
                    ignored={'type', 'step_sizes'})


def _check_settings(cfg: Config, where: str, settings: dict, cls, what: str,
                    ignored: set[str]) -> None:
    """Refuse a setting at ``where`` that ``cls``'s constructor does not take, or a value not
    of its kind; ``ignored``: keys set otherwise than by the config."""
    params = model_setting_parameters(cls)
    unknown = sorted(set(settings) - ignored - set(params))
    if unknown:
        known = ', '.join(sorted(set(params) - ignored))
        raise UserError(f'{cfg.filename}: {where}.{unknown[0]} is not a setting of {what} (its '
                        f'settings: {known})')
    for key in sorted(set(settings) & set(params) - ignored):
        refusal = setting_refusal(params[key], settings[key])
        if refusal:
            raise UserError(f'{cfg.filename}: {where}.{key} of {what} {refusal} (its default: '
                            f'{params[key].default!r})')


def check_model_builds(cfg: Config, model_type: str, protocol: Protocol) -> None:
    """Refuse a config whose model does not build (a value out of its range: a dropout of 2,
    an output stride of 12) or whose parts do not fit (a backbone's widths and strides of
    other lengths), before anything is written: built and run on one crop on the meta device,
    which allocates and computes nothing, without its pretrained weights (config.py checks
    their file). ``build_model`` checks the settings first (``check_model_settings``)."""
    trial = cfg.copy()
    if 'pretrained' in trial.model.backbone:
        trial.model.backbone.pretrained = None
    crop = cfg.data.crop_size
    try:
        with torch.device('meta'):
            build_model(trial, model_type, protocol, 0).eval()(torch.empty(1, 3, crop, crop))
    except UserError:
        raise
    except Exception as e:   # whatever a constructor or a layer raises about its arguments
        if 'meta' in str(e):   # what the meta device cannot run (.item()): not the config's
            return
        raise UserError(f'{cfg.filename}: the model does not build with these settings '
                        f'({type(e).__name__}: {e})') from None


def model_settings(cfg: Config, model_cls, protocol: Protocol) -> ConfigDict:
    """The model settings a run gives ``model_cls``: its defaults for the protocol's dataset
    (``dataset_defaults``), then the config's model section."""
    settings = ConfigDict(model_cls.dataset_defaults.get(protocol.dataset, {}))
    settings.update(cfg.model)
    return settings


def method_settings(cfg: Config, model_type: str, protocol: Protocol) -> dict:
    """Every setting of the method's own (those the base segmentor does not take, e.g. lwf's
    ``loss_kd``) with the value its run trains with: the config's, else the method's default
    for the protocol's dataset, else its constructor's. run.json records them, so that a run
    says which weights it trained with where neither its config nor its protocol names them."""
    model_cls = MODELS.get(model_type)
    given = model_settings(cfg, model_cls, protocol)
    own = {name: given.get(name, param.default)
           for name, param in model_setting_parameters(model_cls).items()
           if name not in SHARED_MODEL_SETTINGS}
    return json.loads(json.dumps(own, default=str))   # as run.json holds them: tuples as lists


def build_model(cfg: Config, model_type: str, protocol: Protocol, step: int):
    """The method's segmentor for ``step``: its per-dataset defaults, then the config's model."""
    check_model_settings(cfg, model_type)
    model_cls = MODELS.get(model_type)
    model_cfg = model_settings(cfg, model_cls, protocol)
    model_cfg.update(type=model_type, step_sizes=protocol.step_sizes(step))
    model_cfg.setdefault('overlapped', protocol.mode == 'overlap')
    try:
        return MODELS.build(model_cfg)
    except KeyError as e:  # the registry's message names the unknown type
        raise UserError(f'{cfg.filename}: {e.args[0].split(". Please")[0]}') from None


def load_previous_weights(model, state: dict, source: Path) -> None:
    """Load step t-1's weights into a step-t model: everything but the new classifier.

    A class-indexed buffer (``model.class_indexed_buffers``) has more rows in the step-t
    model; the previous rows are copied into its first rows.
    """
    own = model.state_dict()
    new_prefix = f'classifiers.{model.step}.'
    grown = [k for k in model.class_indexed_buffers if k in state and k in own
             and own[k].shape[1:] == state[k].shape[1:] and own[k].shape[0] >= state[k].shape[0]]
    misfit = [k for k, v in state.items()
              if k not in grown and (k not in own or own[k].shape != v.shape)]
    missing = [k for k in own if k not in state and not k.startswith(new_prefix)]
    if misfit or missing:
        raise UserError(f'{source}: checkpoint does not fit this model (e.g. '
                        f'{(misfit + missing)[0]!r}): from another protocol or config?')
    for k in grown:
        own[k][:state[k].shape[0]] = state[k]
    model.load_state_dict({k: (own[k] if k in grown else v) for k, v in state.items()}, strict=False)


def attach_previous_step(model, teacher, previous: dict, source: Path) -> None:
    """Make ``model`` step t's: step t-1's weights (``previous``) loaded but for the new
    classifier, step t-1's model (``teacher``, given those weights) attached frozen, the new
    classifier initialised by the method."""
    load_previous_weights(model, previous, source)
    teacher.load_state_dict(previous)
    model.set_teacher(teacher)
    model.init_new_classifier()


def save_weights(model, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


def _epoch_checkpoints(work_dir: Path) -> list[tuple[int, Path, bool]]:
    """A step's epoch checkpoints, oldest first: each one's epoch, file, and whether it is
    complete. mmengine writes a checkpoint in place, not atomically: a kill can leave one
    truncated. torch.save writes a zip archive, whose directory is at its end, so a truncated
    one is not a valid zip."""
    return sorted((int(m.group(1)), f, zipfile.is_zipfile(f)) for f in work_dir.glob('epoch_*.pth')
                  if (m := re.fullmatch(r'epoch_(\d+)\.pth', f.name)))


def _newest_complete_epoch(work_dir: Path) -> int | None:
    """The epoch a step resumes after: its newest complete checkpoint's; None if none."""
    complete = [epoch for epoch, _, whole in _epoch_checkpoints(work_dir) if whole]
    return complete[-1] if complete else None


@decided_by_main
def repair_last_checkpoint(work_dir: Path) -> int | None:
    """Point mmengine's ``last_checkpoint`` at the newest complete epoch checkpoint, and delete
    the incomplete ones. mmengine writes the pointer after the checkpoint, in place: a kill
    can leave it empty. Returns the epoch to resume after (None: no checkpoint, start anew).
    """
    pointer = work_dir / 'last_checkpoint'
    checkpoints = _epoch_checkpoints(work_dir)
    complete = [(epoch, f) for epoch, f, whole in checkpoints if whole]
    for _, f, whole in checkpoints:
        if not whole:
            f.unlink()
    if not complete:
        pointer.unlink(missing_ok=True)
        return None
    epoch, newest = complete[-1]
    atomic_write_text(pointer, str(newest))
    return epoch


@contextlib.contextmanager
def _exclusive(paths: RunPaths, new_folders: list[Path]):
    """Holds a lock on the run folder and one on its work dir (where that is not the run
    folder itself): a second process on the same run, or on another run given the same work
    dir, is refused (two new runs would both find the work dir unmarked). Under torchrun rank 0
    holds them for all the run's processes. Refused, it leaves none of ``new_folders`` behind
    but those of the process holding the lock; a folder it cannot lock, none."""
    locks = [(paths.results, 'another cssbench process is running this run')]
    if paths.work.resolve() != paths.results.resolve():
        locks.append((paths.work, 'another cssbench process is running a run in this work dir'))
    with contextlib.ExitStack() as held:
        for folder, refusal in locks:
            try:
                _lock_folder(folder, held, refusal)
            except RunHeldElsewhere:   # the folder is that process's (a run folder: with
                                       # the new ones above it)
                if is_main_process() and folder == paths.work:
                    _remove_new_folders([f for f in new_folders if f != folder], paths)
                raise
            except BaseException:
                if is_main_process():
                    _remove_new_folders(new_folders, paths)
                raise
        yield


@decided_by_main
def _lock_folder(folder: Path, held: contextlib.ExitStack, refusal: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lock = held.enter_context(open(folder / RUN_LOCK, 'w'))
    try:
        # A POSIX record lock: unlike flock, not inherited by forked loader workers, so it
        # dies with this process even if a worker outlives it for a moment. (Closing any
        # file of it would release it: the run folder's and the work dir's are two files.)
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):   # e.g. no locks on this file system
            raise
        raise RunHeldElsewhere(f'{folder}: {refusal}') from None


def _marks_this_run(marked_run: str | None, work: Path, identity: dict, record: dict | None) -> bool:
    """Whether the marker of ``work``, naming the run folder ``marked_run``, is this run's
    (``record``: the run.json its folder holds, None if none): it names this run's folder, or
    one that holds no run any more (moved here since) while this run's record names ``work``
    as the work dir it trained in. An older marker names no run: it is a stored run's unless
    its record names another work dir."""
    if marked_run == identity['run']:
        return True
    trained_in = record.get('work_dir') if record is not None else None
    if marked_run is None:
        return record is not None and trained_in in (None, str(work.resolve()))
    return trained_in == str(work.resolve()) and not (Path(marked_run) / RUN_RECORD).exists()


def _check_work_dir(paths: RunPaths, identity: dict, overwrite: bool, previous: dict | None) -> None:
    """Refuse a work dir whose marker names another run (a ``--work-dir`` given twice), or
    this run with another protocol, method, config or seed (an earlier start) unless
    ``overwrite``, which clears it next. The default work dir, inside the run folder, is the
    run's own; so is one that a moved run folder trained in (``_marks_this_run``).
    ``previous``: the stored record this run continues (None if none)."""
    marker = paths.work / WORK_MARKER
    if not marker.exists():
        return
    try:
        stored = read_json_object(marker)
    except CorruptRun:
        stored = {}
    if previous is not None and stored.get('config_digest') == previous.get('config_digest'):
        # Written with the record this run continues, whose config is this one's: its digest
        # may be by an older rule (digests.stored_digests).
        stored['config_digest'] = identity['config_digest']
    owned = (paths.work.resolve().parent == paths.results.resolve()   # a moved run folder too
             or _marks_this_run(stored.get('run'), paths.work, identity,
                                read_json_or_none(paths.results / RUN_RECORD,
                                                  lambda r: r if isinstance(r, dict) else None)))
    if owned and all(stored.get(k) == identity[k] for k in identity if k != 'run'):
        return
    if not owned:
        other = f' ({stored["run"]})' if 'run' in stored else ''
        raise UserError(f'{paths.work}: holds the checkpoints of another run{other}; '
                        f'choose another --work-dir')
    if not overwrite:
        diff = ', '.join(k for k in identity if k != 'run' and stored.get(k) != identity[k])
        raise UserError(f'{paths.work}: holds checkpoints of this run with another {diff}; '
                        f'--overwrite clears them, or choose another --work-dir')


def read_json(path: Path) -> dict:
    """A results file this run wrote; one damaged since is refused, naming it."""
    try:
        return read_json_object(path)
    except CorruptRun as e:
        raise UserError(f'{path}: cannot read it ({e}); restore it, or --overwrite the run') from None


def _absent(folders: list[Path]) -> list[Path]:
    return [folder for folder in folders if not folder.exists()]


def _remove_new_folders(folders: list[Path], paths: RunPaths) -> None:
    """Remove the folders a call created (absent at its start), deepest first, each only if
    it holds nothing but the call's own files there (the run folder's and the work dir's
    locks, the work dir's marker): another process's new run in the same new folder stays."""
    for own in (paths.results / RUN_LOCK, paths.work / RUN_LOCK, paths.work / WORK_MARKER):
        if own.parent in folders:
            with contextlib.suppress(OSError):   # e.g. a --work-dir under a file: never made
                own.unlink(missing_ok=True)
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        with contextlib.suppress(OSError):   # not empty (or never made)
            folder.rmdir()


def run_protocol(protocol_name: str, method_name: str = 'ft', *, config: str = CPU_CONFIG,
                 data_root: str | None = None, epochs: int | None = None,
                 results_root: str | Path = DEFAULT_RESULTS, work_dir: str | Path | None = None,
                 run_name: str | None = None, seed: int = 0, overwrite: bool = False,
                 resume: bool = False, deterministic: bool = False,
                 keep_epoch_checkpoints: bool = False, step0_cache: bool = True,
                 compile: bool = False, fp32: bool = False, keep_complete: bool = False,
                 progress: bool = True, log=print) -> list[dict]:
    """Train and evaluate every step; returns the per-step metrics (also written to disk).

    Re-running the same call continues a run that stopped; ``resume=True`` insists on it. A
    complete run is refused unless ``overwrite`` (trained again) or ``keep_complete`` (its
    stored metrics are returned). ``compile`` and ``fp32`` are the run flags of the speed
    settings (``speed.py``). Under torchrun (``distributed.start_from_env`` first) every
    process calls it; rank 0 writes.
    """
    protocol, method, run_name, results_dir = locate_run(protocol_name, method_name, results_root,
                                                         run_name, config, seed)
    cfg = load_config(config, epochs, dataset=protocol.dataset, compile=compile, fp32=fp32)
    if 'pretrained' in cfg.model.backbone and not cfg.model.backbone.pretrained:
        log(f'{cfg.filename}: model.backbone.pretrained is not set: the backbone starts from '
            f'random weights (the papers start from ImageNet weights)')
    amp_note = emulated_bf16_note(effective_speed(cfg))
    if amp_note:
        log(amp_note)
    paths = RunPaths(results_dir, Path(work_dir) if work_dir else results_dir / 'work')
    new_run_folders = _absent([*reversed(results_dir.parents), results_dir])
    new_work_folders = [f for f in _absent([*reversed(paths.work.parents), paths.work])
                        if f not in new_run_folders]
    with _exclusive(paths, new_run_folders + new_work_folders):
        try:
            started = _start_run(protocol, method, cfg, config, run_name, seed, deterministic,
                                 data_root, paths, overwrite, resume, keep_complete, progress)
        except BaseException:
            if is_main_process():
                # A run refused before it started leaves no folder behind; a stopped run
                # refused when continued, no new work dir (made for its lock).
                recorded = (results_dir / RUN_RECORD).exists()
                _remove_new_folders(new_work_folders + ([] if recorded else new_run_folders),
                                    paths)
            raise
        if started is None:
            log(f'{results_dir}: complete, kept (--overwrite trains it again)')
            return read_json(results_dir / RUN_METRICS)['steps']
        step0_key = (step0.cache_key(steps_of(protocol, method), method.step0_kind, cfg,
                                     MODELS.get(method.model_type).settings_unused_at_step0,
                                     seed, deterministic, started['run']['dataset_fingerprint'],
                                     started['run']['speed'])
                     if step0_cache and method.step0_kind else None)
        try:
            step_results = [run_step(cfg, method, protocol, t, started['splits'][t], paths, seed,
                                     deterministic, keep_epoch_checkpoints, log,
                                     step0_key=step0_key if t == 0 else None)
                            for t in range(len(started['splits']))]
        except BaseException as e:
            if is_main_process():
                _record_stopped(results_dir, started['run'], e)
            raise
        if not is_main_process():
            return step_results  # rank 0 writes the run's files
        write_run_tables(results_dir, step_results)
        # the steps' own times: those of a continued run's earlier sessions included
        started['run'].update(status='complete',
                             wall_time_s=round(sum(r['wall_time_s'] for r in step_results), 1),
                             finished=now_stamp())
        atomic_write_json(results_dir / RUN_RECORD, started['run'])
    index_note = open_store(results_root).index_note()  # brings the results index up to date
    if index_note:   # the run is stored; the next reader that can write the index updates it
        log(index_note)
    return step_results


def _record_stopped(results_dir: Path, run: dict, error: BaseException) -> None:
    """Mark the run stopped in its run.json, with what stopped it (the tables name it); a
    run killed outright stays 'running'. What cannot be written leaves the error as it is."""
    stopped_by = type(error).__name__ + (f': {error}' if str(error) else '')
    with contextlib.suppress(OSError):
        atomic_write_json(results_dir / RUN_RECORD, dict(
            run, status='stopped', stopped_by=stopped_by.splitlines()[0][:300],
            stopped=now_stamp()))


def locate_run(protocol_name: str, method_name: str, results_root: str | Path,
               run_name: str | None, config: str, seed: int) -> tuple[Protocol, Method, str, Path]:
    """A run's protocol (its class order drawn for ``seed``), method, name (by default
    ``<config>-seed<seed>``) and results folder ``<results>/<protocol>/<method>/<name>``."""
    protocol = load_protocol(protocol_name).with_class_order(seed)
    method = get_method(method_name)
    if run_name is None:
        run_name = f'{Path(config).stem.replace("_", "-")}-seed{seed}'
        if not is_plain_name(run_name):
            raise UserError(f'the config {config} names runs {run_name!r} by default, not '
                            f'{PLAIN_NAME}; give --run-name')
    elif not is_plain_name(run_name):
        raise UserError(f'run name {run_name!r} is not {PLAIN_NAME}: it names a folder of the '
                        f'results store')
    return protocol, method, run_name, run_folder(results_root, protocol.name, method.name, run_name)


def run_is_stored(protocol_name: str, method_name: str, results_root: str | Path,
                  run_name: str | None, config: str, seed: int) -> bool:
    """Whether the run that ``run_protocol`` would continue was started (or finished)."""
    *_, folder = locate_run(protocol_name, method_name, results_root, run_name, config, seed)
    return (folder / RUN_RECORD).exists()


@decided_by_main
def _start_run(protocol: Protocol, method: Method, cfg: Config, config: str, run_name: str,
               seed: int, deterministic: bool, data_root: str | None, paths: RunPaths,
               overwrite: bool, resume: bool, keep_complete: bool, progress: bool) -> dict | None:
    """Check what the run folder holds, index the data, write run.json; returns its record
    (``run``) and the per-step splits with the samples of each (``splits``), or None for a
    complete run to keep."""
    checked = _check_run(protocol, method, cfg, paths, seed, deterministic, data_root, overwrite,
                         resume, keep_complete, check_data=True, progress=progress)
    if checked is None:
        return None
    previous, identity, index = checked.previous, checked.identity, checked.index
    if overwrite:
        # Only what this run wrote: a --work-dir given by the user may hold other things.
        steps = [p for p in paths.work.glob('step*') if re.fullmatch(r'step\d+', p.name)]
        work_items = [*steps, paths.work / WORK_MARKER] if paths.work.is_dir() else []
        for child in [*work_items, *paths.results.iterdir()]:
            if child.name == RUN_LOCK or not child.exists():
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    if read_json_or_none(paths.work / WORK_MARKER) != identity:   # absent, or a moved run's
        atomic_write_json(paths.work / WORK_MARKER, identity)
    # config: the file's, as its digest hashes it (its model.type the base segmentor, which
    # build_model replaces by the method's class, model_type)
    run = dict(protocol=protocol.to_dict(), method=method.name, model_type=method.model_type,
               joint=method.joint, run=run_name, seed=seed, deterministic=deterministic,
               config_name=config, config=cfg.to_dict(), config_digest=identity['config_digest'],
               method_settings=method_settings(cfg, method.model_type, protocol),
               shared_config_digest=shared_config_digest(cfg), data_root=str(index.root),
               dataset_fingerprint=index.fingerprint, work_dir=str(paths.work.resolve()),
               git_revision=revision_of_this_process(), environment=environment(),
               speed=checked.speed, status='running', started=now_stamp())
    earlier_speeds = []
    if previous is not None:   # continued: it started then; this session's code and machine above
        run.update(started=previous.get('started', run['started']),
                   continued=[*previous.get('continued', []), run['started']])
        earlier_speeds = previous.get('speed_history') or [previous.get('speed')]
    run['speed_history'] = [*earlier_speeds, run['speed']]   # every session's (store.run_regime)
    atomic_write_json(paths.results / RUN_RECORD, run)
    return dict(run=run, splits=checked.splits)


@dataclass
class _CheckedRun:
    """What a run's checks found: the stored record it continues (None: none), its identity
    (what its work dir's marker names), its speed record, and its data's index and per-step
    splits (None where the data was left out)."""
    previous: dict | None
    identity: dict
    speed: dict
    index: DatasetIndex | None
    splits: list[dict] | None


def _check_run(protocol: Protocol, method: Method, cfg: Config, paths: RunPaths, seed: int,
               deterministic: bool, data_root: str | None, overwrite: bool, resume: bool,
               keep_complete: bool, check_data: bool, progress: bool) -> _CheckedRun | None:
    """Every check of a run's inputs, none of which writes: they come before --overwrite
    deletes anything, so a bad input loses nothing. None for a complete run to keep (its
    data is not read)."""
    check_stored_protocol_name(paths.store_root, protocol)
    digest = config_digest(cfg)
    previous = _check_stored_run(paths, cfg, digest, seed, deterministic, overwrite, resume,
                                 keep_complete)
    if previous is not None and previous.get('status') == 'complete':
        return None
    continued = previous is not None
    index, splits = (_checked_data(protocol, method, cfg, data_root, progress)
                     if check_data or continued else (None, None))
    if continued:
        _check_same_data(paths, previous, index)
    identity = dict(run=str(paths.results.resolve()), protocol=protocol.to_dict(),
                    method=method.name, config_digest=digest, seed=seed)
    _check_work_dir(paths, identity, overwrite, previous)
    num_steps = steps_of(protocol, method).num_steps
    if continued:
        _check_trained_work_dir(paths, previous, identity)
    if not overwrite:   # --overwrite clears the finished steps
        _check_finished_step_weights(paths, num_steps)
    speed = speed_record(cfg)   # refuses a batch that the processes cannot share equally
    if continued:
        _check_unfinished_step_processes(paths, num_steps, cfg.schedule.epochs, speed['world_size'])
    return _CheckedRun(previous, identity, speed, index, splits)


def _check_stored_run(paths: RunPaths, cfg: Config, digest: str, seed: int, deterministic: bool,
                      overwrite: bool, resume: bool, keep_complete: bool) -> dict | None:
    """Refuse a run folder that holds a run this one does not continue (another config than
    ``cfg``, of ``digest``; another seed, as a --run-name given without --seeds names every
    seed's run alike; ``--deterministic`` the other way, a complete run unless kept), or
    none with ``resume``; returns the stored record (None if none, or with ``overwrite``)."""
    run_file = paths.results / RUN_RECORD
    previous = read_json(run_file) if run_file.exists() and not overwrite else None
    if previous is not None:
        if stored_digests(previous)[0] != digest:
            # named: two config files of one stem name their runs alike
            stored = previous.get('config_name')
            differing = (f': {config_differences(previous["config"], cfg.to_dict())}'
                         if isinstance(previous.get('config'), dict) else '')
            which = f' ({stored}, as it was then{differing})' if stored else ''
            raise UserError(f'{paths.results}: a run with another config{which} is stored '
                            f'there; give --run-name to keep both, or --overwrite to replace it')
        if previous.get('seed', seed) != seed:
            raise UserError(f'{paths.results}: a run of seed {previous["seed"]} is stored there, '
                            f'not of seed {seed}; give another --run-name to keep both, or '
                            f'--overwrite to replace it')
        if previous.get('deterministic', False) != deterministic:
            flag = 'with' if previous.get('deterministic') else 'without'
            raise UserError(f'{paths.results}: this run was started {flag} --deterministic; '
                            f'continue it the same way, or --overwrite it')
        if previous.get('status') == 'complete':
            read_json(paths.results / RUN_METRICS)   # what `table` would show
            if not keep_complete:
                raise UserError(f'{paths.results}: this run is complete; `cssbench table '
                                f'--protocol {paths.protocol_name}{results_option(paths.store_root)}` '
                                f'shows it, --overwrite reruns it')
    elif resume and not run_file.exists():
        raise UserError(f'{paths.results}: no run to resume')
    return previous


def _check_trained_work_dir(paths: RunPaths, previous: dict, identity: dict) -> None:
    """Refuse to continue a run in another work dir than the one it trained in while that one
    still holds its checkpoints (its marker marks this run, ``_marks_this_run``): this
    session would miss them, and train a step stopped mid-way again from its start.
    Checkpoints moved elsewhere leave none there; a run folder copied with its default work
    dir leaves one whose marker names the original, which still holds its run."""
    trained_in = previous.get('work_dir')   # older records name none
    if not isinstance(trained_in, str) or Path(trained_in) == paths.work.resolve():
        return
    marked_run = read_json_or_none(Path(trained_in) / WORK_MARKER, lambda marker: marker['run'])
    if marked_run is not None and _marks_this_run(marked_run, Path(trained_in), identity, previous):
        raise UserError(f'{paths.results}: its checkpoints are in {trained_in}, the work dir it '
                        f'trained in: give --work-dir {trained_in}, or move that folder to '
                        f'{paths.work} first (or --overwrite)')


def _check_finished_step_weights(paths: RunPaths, num_steps: int) -> None:
    """Refuse a run whose finished step's weights are not in its work dir (another work dir,
    or weights deleted): a step's weights are written before its metrics."""
    for t in range(num_steps):
        if paths.step_metrics(t).exists() and not paths.step_weights(t).exists():
            raise UserError(f'{paths.step_metrics(t)}: step {t} is done, but its weights are not '
                            f'in {paths.work}: give the --work-dir it was trained in (or '
                            f'--overwrite)')


def _check_same_data(paths: RunPaths, previous: dict, index: DatasetIndex) -> None:
    """Refuse to continue a run on data other than it started on: its steps would mix two. A
    run started before the fingerprint counted the files' bytes holds the label sets' alone."""
    started_on = previous.get('dataset_fingerprint')
    if started_on in (None, index.fingerprint, index.label_set_fingerprint):
        return
    if _same_folder(previous.get('data_root'), index.root):
        raise UserError(f'{paths.results}: the data in {index.root} changed since this run started '
                        f'on it (fingerprint {started_on}, now {index.fingerprint}: an image or '
                        f'mask, a list, or the mask folder read); continue it on the data it '
                        f'started on, or --overwrite it')
    raise UserError(f'{paths.results}: this run was started on other data '
                    f'({previous.get("data_root")}, fingerprint {started_on}) than {index.root} '
                    f'(fingerprint {index.fingerprint}); continue it with its own data '
                    f'(--data-root), or --overwrite it')


def _same_folder(recorded: str | None, root: Path) -> bool:
    """Whether a run's recorded data_root (relative in older records: then unknown) is ``root``."""
    return recorded is not None and Path(recorded).is_absolute() and Path(recorded) == root


def _check_unfinished_step_processes(paths: RunPaths, num_steps: int, epochs: int,
                                     processes: int) -> None:
    """Refuse to continue a step stopped mid-way with another number of processes (torchrun)
    than trained it: its epoch checkpoint's schedule counts the iterations of an epoch
    shared by that many. A step stopped after its last epoch (``epochs``), in evaluation,
    trains no more: any number of processes evaluates it alike."""
    for t in range(num_steps):
        work = paths.step_work(t)
        if paths.step_metrics(t).exists() or _newest_complete_epoch(work) in (None, epochs):
            continue
        trained_by = processes_training(work)
        if trained_by not in (None, processes):
            by, rerun = ((f'{trained_by} processes', f'under torchrun --nproc_per_node={trained_by}')
                         if trained_by > 1 else ('one process', 'without torchrun'))
            raise UserError(f'{paths.results}: step {t} stopped mid-way, trained by {by}, and '
                            f'its epoch checkpoints continue only so: rerun {rerun}, or delete '
                            f'{work} to train the step again from its start, or --overwrite the '
                            f'run')


def _checked_data(protocol: Protocol, method: Method, cfg: Config, data_root: str | None,
                  progress: bool) -> tuple[DatasetIndex, list[dict]]:
    """Refuse a run whose data does not index, or with a step of fewer training images than a
    batch, or of no evaluation image; returns its index and the per-step splits, with the
    samples of each."""
    root = resolve_data_root(protocol.dataset, data_root, progress=progress)
    index = index_dataset(protocol.dataset, root, progress=progress)
    splits = protocol_splits(steps_of(protocol, method), index)
    for t, split in enumerate(splits):
        split['train_samples'] = select(index.samples['train'], split['train'])
        split['val_samples'] = select(index.samples['val'], split['val'])
        images = len(split['train_samples'])
        if images == 0:
            raise UserError(f'{root}: step {t} of {protocol.name} has no training images: the '
                            f'train list has none that the step keeps for its classes '
                            f'({range_label(split["classes"])})')
        if images < cfg.data.batch_size:   # whole batches only: no update
            raise UserError(f'{root}: step {t} of {protocol.name} has {images} training images, '
                            f'fewer than a batch ({cfg.data.batch_size}): it would train '
                            f'nothing; use a config with a smaller data.batch_size')
    for t, split in enumerate(splits):
        if not split['val_samples']:   # scored on none, the step's evaluation would fail
            seen = sorted({c for s in splits[:t + 1] for c in s['classes']} - {0})
            raise UserError(f'{root}: step {t} of {protocol.name} has no evaluation images: the '
                            f'val list has none holding a class learned by then '
                            f'({range_label(seen)})')
    return index, splits


@decided_by_main
def check_run_inputs(protocol_name: str, method_name: str, *, config: str, data_root: str | None,
                     epochs: int | None, results_root: str | Path, run_name: str | None,
                     seed: int, deterministic: bool, overwrite: bool, check_data: bool = True,
                     progress: bool = True) -> bool:
    """What ``run_protocol`` checks of its inputs before it writes anything, alone, for a run
    of a command of several (which keeps a complete run): such a command checks every run's
    before the first trains. ``check_data=False`` leaves out the data, checked already for
    the same protocol and seed, unless the run is continued (it must be on the data it
    started on). Returns whether the data was checked: a complete run, kept,
    needs none."""
    protocol, method, _, results_dir = locate_run(protocol_name, method_name, results_root,
                                                  run_name, config, seed)
    cfg = load_config(config, epochs, dataset=protocol.dataset)
    checked = _check_run(protocol, method, cfg, RunPaths(results_dir, results_dir / 'work'), seed,
                         deterministic, data_root, overwrite, resume=False, keep_complete=True,
                         check_data=check_data, progress=progress)
    return checked is not None and check_data


def speed_record(cfg: Config) -> dict:
    """How this run trains, for its record: the speed settings in effect on this machine,
    the number of processes (torchrun), the batch each takes, and whether BN statistics
    are synchronised across them."""
    speed, processes, device = effective_speed(cfg), world_size(), training_device()
    return dict(device=device, **asdict(replace(speed, amp=autocast_name(speed.amp))),
                world_size=processes,
                batch_per_process=per_process_batch(cfg.data.batch_size, processes),
                sync_bn=processes > 1 and device == 'cuda')


def run_step(cfg: Config, method: Method, protocol: Protocol, t: int, split: dict,
             paths: RunPaths, seed: int, deterministic: bool, keep_epoch_checkpoints: bool,
             log, step0_key: str | None = None) -> dict:
    """Step t's metrics: stored ones if the step finished before, else train and evaluate.

    With ``step0_key``, step 0 comes from the step-0 cache when an identical step 0 (same
    first step, data, config, seed) was trained before by a method of the same
    ``step0_kind``, in any protocol whose step 0 trains alike; it is evaluated again only if it
    was never scored as this protocol scores.
    """
    tag = f'[{protocol.name}/{method.name}/{paths.results.name}]'   # the run's name: its seed, config
    stored = _stored_step_result(paths, t)
    if stored is not None:
        log(f'{tag} step {t}: done before, reusing its weights and metrics')
        return stored
    steps_protocol = steps_of(protocol, method)
    last = steps_protocol.num_steps - 1
    log(f'{tag} step {t}/{last}: classes {range_label(split["classes"])}, '
        f'{len(split["train"])} train images, {len(split["val"])} val images')
    step_start = time.time() - earlier_training_seconds(paths.step_work(t))   # earlier sessions'
    weights = paths.step_weights(t)
    cached = step0.reuse(step0_key, steps_protocol, weights) if step0_key else None
    if cached is None:
        iou = train_and_evaluate_step(cfg, method, steps_protocol, t, split, paths, seed,
                                      deterministic, tag, log)
        # The key names this session's processes and autocast dtype: not those that trained
        # a step 0 that this session resumed (after its last epoch, only to evaluate it; or
        # mid-way, under another dtype: a run continues with other speed settings).
        if (step0_key and is_main_process()
                and processes_training(paths.step_work(t)) == world_size()
                and autocasts_training(paths.step_work(t)) == [speed_record(cfg)['amp']]):
            step0.store(step0_key, steps_protocol, weights, paths.results,
                        round(time.time() - step_start, 1), iou, log)
    else:
        iou = _cached_step0_ious(cached, step0_key, cfg, method, steps_protocol, split, paths,
                                 seed, deterministic, tag, log)
    # Joint training's single step is reported in the protocol's columns (old/new/all).
    summary_step = protocol.num_steps - 1 if method.joint else t
    result = dict(step=t, classes=split['classes'], num_train=len(split['train']),
                  num_val=len(split['val']),
                  iou={str(c): (None if math.isnan(v) else v) for c, v in iou.items()},
                  columns=summarize_step(protocol, summary_step, iou),
                  wall_time_s=round(time.time() - step_start, 1),
                  step0_cache=step0_key if cached is not None else None)
    if is_main_process():
        atomic_write_json(paths.step_metrics(t), result)
        _clear_step_work(paths.step_work(t), keep_epoch_checkpoints)
    barrier()  # the other processes load this step's weights, written by rank 0, next
    if t < last:  # the run ends with its table (cmd_run prints it), the last step's row last
        log(format_step_table(protocol.name, method.name, paths.results.name, [result]))
    return result


def _cached_step0_ious(cached: dict, key: str, cfg: Config, method: Method, protocol: Protocol,
                       split: dict, paths: RunPaths, seed: int, deterministic: bool, tag: str,
                       log) -> dict[int, float]:
    """The IoUs of the cached step 0 (``step0.reuse``'s record) under ``protocol``'s
    evaluation: stored ones, or scored now (and stored) if it was never scored so."""
    trained = (f'; trained in {cached["trained_in_s"]:.0f} s by {cached["run"]}'
               if cached['run'] else '')
    log(f'{tag} step 0: reusing the cached step-0 model {key} (same first step, data, '
        f'config as step 0 reads it, and seed{trained})')
    if cached['iou'] is not None:
        return {int(c): (math.nan if v is None else v) for c, v in cached['iou'].items()}
    settings = ', '.join(f'{k}: {v}' for k, v in protocol.evaluation.items())
    log(f'{tag} step 0: evaluating it: it was not yet scored as this protocol scores '
        f'({settings})')
    iou = evaluate_saved_step(cfg, method, protocol, 0, split, paths, seed, deterministic, tag)
    if is_main_process():
        step0.store_iou(key, protocol, cached['model'], paths.results, iou, log)
    return iou


def _clear_step_work(work: Path, keep_epoch_checkpoints: bool) -> None:
    """What a finished step's work dir no longer needs: its epoch checkpoints (resume needs
    them no more; the weights stay) unless kept, and its clock."""
    if not keep_epoch_checkpoints:
        for f in work.glob('epoch_*.pth'):
            f.unlink()
        (work / 'last_checkpoint').unlink(missing_ok=True)
    (work / CLOCK_FILE).unlink(missing_ok=True)


@decided_by_main
def _stored_step_result(paths: RunPaths, t: int) -> dict | None:
    """Step t's metrics if the step finished before (its weights ``_check_run`` found)."""
    return read_json(paths.step_metrics(t)) if paths.step_metrics(t).exists() else None


def train_and_evaluate_step(cfg: Config, method: Method, protocol: Protocol, t: int, split: dict,
                            paths: RunPaths, seed: int, deterministic: bool,
                            tag: str, log) -> dict[int, float]:
    """Train step ``t`` and evaluate it; returns the IoU per seen class id (NaN: not in the GT)."""
    step_seed = seed_step(seed, t, deterministic)
    model = build_model(cfg, method.model_type, protocol, t)
    if t > 0:
        attach_previous_step(model, build_model(cfg, method.model_type, protocol, t - 1),
                             _read_step_weights(paths, t - 1), paths.step_weights(t - 1))
    prepare_model(model, effective_speed(cfg), training_device())
    work = paths.step_work(t)
    work.mkdir(parents=True, exist_ok=True)
    resumed_after = repair_last_checkpoint(work)   # rank 0's reading, for every process
    resuming = resumed_after is not None
    trained = resuming and resumed_after >= cfg.schedule.epochs   # stopped in its evaluation
    if resuming:
        where = ('trained, to be evaluated' if trained else
                 f'continuing after epoch {resumed_after}/{cfg.schedule.epochs}')
        log(f'{tag} step {t}: {where}, from its epoch checkpoint in {work}')
    with step_runner(cfg, model, protocol, t, split, work, step_seed, deterministic, tag,
                     resume=resuming) as runner:
        if not trained:   # (a trained step has nothing left to train)
            model.before_step_training(runner.train_loop.dataloader)
        with trusting_own_epoch_checkpoints() if resuming else contextlib.nullcontext():
            runner.train()
        model.after_step_training(runner.train_dataloader)
        broadcast_buffers_from_main(model)
        iou = score_step(runner, protocol, t)
    if is_main_process():
        save_weights(model, paths.step_weights(t))
    return iou


def evaluate_saved_step(cfg: Config, method: Method, protocol: Protocol, t: int, split: dict,
                        paths: RunPaths, seed: int, deterministic: bool,
                        tag: str) -> dict[int, float]:
    """Score step ``t``'s saved weights as ``protocol`` scores, training nothing (a cached
    step 0 trained under a protocol that scores otherwise); returns as
    ``train_and_evaluate_step``."""
    step_seed = seed_step(seed, t, deterministic)
    model = build_model(cfg, method.model_type, protocol, t)
    model.load_state_dict(_read_step_weights(paths, t))
    prepare_model(model, effective_speed(cfg), training_device())
    paths.step_work(t).mkdir(parents=True, exist_ok=True)
    with step_runner(cfg, model, protocol, t, split, paths.step_work(t), step_seed, deterministic,
                     tag, resume=False) as runner:
        return score_step(runner, protocol, t)


def _read_step_weights(paths: RunPaths, t: int) -> dict:
    # written whole (atomic_path): unreadable means damaged since
    return read_state_dict(paths.step_weights(t), 'these weights', advice='; --overwrite the run')


def write_run_tables(results_dir: Path, step_results: list[dict]) -> None:
    atomic_write_json(results_dir / RUN_METRICS, dict(steps=step_results))
    atomic_write_text(results_dir / 'metrics.csv', steps_to_csv(step_results))
