"""Configs: a run's by name (``benchmark/configs/<name>.py``) or path, checked for every setting
a run reads before anything is written."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

from mmengine.config import Config

from .datasets_info import DATASET_INFO
from .digests import sections_digest, shared_sections_digest
from .errors import UserError
from .speed import resolve_speed

CONFIGS_DIR = Path(__file__).resolve().parent / 'configs'
CPU_CONFIG = 'small'             # run's default: the demo's and the tests' CPU model
PAPERS_CONFIG = 'deeplabv3-r101'  # the papers' model: bench's default on a GPU


def load_config(name_or_path: str, epochs: int | None = None, *, dataset: str | None = None,
                compile: bool = False, fp32: bool = False) -> Config:
    """A config by name or path; ``cfg.speed`` is its speed section completed with the
    defaults and the run flags (``--compile``, ``--fp32``: see ``speed.py``).

    ``schedule.epochs`` is resolved for ``dataset`` (a protocol's): ``epochs``, if given, else
    the schedule's ``epochs_by_dataset`` entry for it (e.g. ADE20K's 60), else ``epochs``. The
    resolved config holds no ``epochs_by_dataset``: it records what a run trains."""
    path = Path(name_or_path)
    named = not path.suffix and len(path.parts) == 1   # a shipped config's name: small
    if named:
        path = CONFIGS_DIR / f'{name_or_path.replace("-", "_")}.py'
    if not path.is_file():
        known = ', '.join(p.stem.replace('_', '-') for p in sorted(CONFIGS_DIR.glob('*.py')))
        if named:
            raise UserError(f'unknown config {name_or_path!r} (known: {known}, or a path to a '
                            f'.py file)')
        raise UserError(f'{path}: {"a folder" if path.is_dir() else "no such file"}; a config is '
                        f'a .py file, or one of: {known}')
    try:
        cfg = Config.fromfile(str(path))
    except Exception as e:  # a config is Python: whatever stops it loading is the file's
        raise UserError(f'{path}: cannot load this config ({type(e).__name__}: {e})') from None
    check_config_sections(cfg, path)
    by_dataset = cfg.schedule.pop('epochs_by_dataset', None) or {}
    if epochs is not None:
        if epochs < 1:
            raise UserError(f'--epochs must be at least 1, got {epochs}')
        cfg.schedule.epochs = epochs
    elif dataset in by_dataset:
        cfg.schedule.epochs = by_dataset[dataset]
    else:
        _check_config_value(path, 'schedule.epochs', cfg.schedule.epochs, 'schedule.epochs')
    cfg.speed = resolve_speed(cfg.get('speed'), cfg.filename, compile=compile, fp32=fp32)
    return cfg


def is_number(value) -> bool:
    """An int or a float, finite (a NaN weight would turn its term off unnoticed: NaN > 0
    is false), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole_number(least: int) -> tuple[str, Callable[[object], bool]]:
    return f'a whole number >= {least}', lambda v: is_whole_number(v) and v >= least


NON_NEGATIVE = ('a number >= 0', lambda v: is_number(v) and v >= 0)
# What each setting a run reads must be: (said as, test). schedule.lr holds two of them.
CONFIG_VALUES = {
    # batch 1 fails in training: the head's image-pooling batch norm sees one value a channel
    'data.crop_size': _whole_number(1),
    'data.batch_size': ('a whole number >= 2 (batch norm trains on 2 images a batch at least)',
                        lambda v: is_whole_number(v) and v >= 2),
    'data.eval_batch_size': _whole_number(1), 'data.num_workers': _whole_number(0),
    'schedule.epochs': _whole_number(1),
    'schedule.lr': ('a number > 0', lambda v: is_number(v) and v > 0),
    'schedule.momentum': ('a number in [0, 1)', lambda v: is_number(v) and 0 <= v < 1),
    'schedule.nesterov': ('True or False', lambda v: isinstance(v, bool)),
    'schedule.weight_decay': NON_NEGATIVE, 'schedule.poly_power': NON_NEGATIVE,
}


# A config's model.type: every method's class takes its settings (and build_model puts the
# method's own class in its place), so a config names no method of its own.
BASE_MODEL_TYPE = 'cssbench.IncrementalSegmentor'
# A config's sections; its other top-level names are the file's own helper values.
CONFIG_SECTIONS = ('model', 'data', 'schedule', 'speed')
# What a run reads from a config (the model section holds more, which the method checks):
# the model's parts, and the settings whose values CONFIG_VALUES rules.
CONFIG_SETTINGS = ('model.type', 'model.backbone', 'model.decode_head', *CONFIG_VALUES)
# Every setting the data and schedule sections may hold: another is a typo a run would ignore.
SECTION_SETTINGS = {section: (*(name.split('.')[1] for name in CONFIG_VALUES
                                 if name.startswith(f'{section}.')), *more)
                    for section, more in (('data', ()), ('schedule', ('epochs_by_dataset',)))}


def _sets(cfg: Config, name: str) -> bool:
    section, key = name.split('.')
    return isinstance(cfg.get(section), dict) and key in cfg[section]


def _config_values(cfg: Config) -> Iterator[tuple[str, str, object]]:
    """Every setting a run reads that ``CONFIG_VALUES`` rules: (its name, its rule's, value)."""
    for name in CONFIG_VALUES:
        section, key = name.split('.')
        if name == 'schedule.epochs':
            continue   # load_config checks the epochs it resolves for the dataset
        if name == 'schedule.lr':
            yield from ((f'{name}[{i}]', name, v) for i, v in enumerate(cfg.schedule.lr))
        else:
            yield name, name, cfg[section][key]
    for dataset, epochs in (cfg.schedule.get('epochs_by_dataset') or {}).items():
        yield f'schedule.epochs_by_dataset.{dataset}', 'schedule.epochs', epochs


def _check_config_value(path: Path, name: str, value, rule: str) -> None:
    said_as, holds = CONFIG_VALUES[rule]
    if not holds(value):
        raise UserError(f'{path}: {name} must be {said_as}, got {value!r}')


def check_config_sections(cfg: Config, path: Path) -> None:
    """Refuse a config that lacks a setting a run needs (naming every missing one), holds a
    top-level dict whose name misspells a section's (``misspelt_section``), sets one
    in its data or schedule section that no run reads (``SECTION_SETTINGS``: a typo; epochs
    for a dataset cssbench does not know), holds
    one a run cannot train with (``CONFIG_VALUES``; Nesterov without momentum), holds a value
    that run.json cannot (``_check_storable``), names a model type but the base segmentor's
    (a method's class, which --method chooses), or whose pretrained backbone checkpoint is
    not a file."""
    _check_storable(cfg.to_dict(), path)
    for name, value in cfg.items():
        section = misspelt_section(name) if isinstance(value, dict) else None
        if section:
            raise UserError(f'{path}: {name} is not a section of a config; did you mean '
                            f'{section}? (its sections: {", ".join(CONFIG_SECTIONS)})')
    missing = [name for name in CONFIG_SETTINGS if not _sets(cfg, name)]
    if missing:
        raise UserError(f'{path}: this config does not set {", ".join(missing)} (start from a '
                        f"full one: _base_ = ['<path>/small.py'])")
    if cfg.model.type != BASE_MODEL_TYPE:
        raise UserError(f'{path}: model.type must be {BASE_MODEL_TYPE!r}, got {cfg.model.type!r}: '
                        f'the method (run --method) chooses the class that trains')
    for section, known in SECTION_SETTINGS.items():
        unknown = sorted(set(cfg[section]) - set(known))
        if unknown:
            raise UserError(f'{path}: {", ".join(f"{section}.{key}" for key in unknown)} '
                            f'{"is not a setting" if len(unknown) == 1 else "are not settings"} '
                            f'of the {section} section (its settings: {", ".join(sorted(known))})')
    lr = cfg.schedule.lr
    if not (isinstance(lr, (list, tuple)) and len(lr) == 2):
        raise UserError(f'{path}: schedule.lr must be (step 0 lr, later steps lr), got {lr!r}')
    by_dataset = cfg.schedule.get('epochs_by_dataset') or {}
    if not isinstance(by_dataset, dict):
        raise UserError(f'{path}: schedule.epochs_by_dataset must map datasets to epochs, got '
                        f'{by_dataset!r}')
    unknown = [name for name in by_dataset if name not in DATASET_INFO]   # a typo no run reads
    if unknown:
        raise UserError(f'{path}: schedule.epochs_by_dataset: {", ".join(map(repr, unknown))} '
                        f'{"is not a dataset" if len(unknown) == 1 else "are not datasets"} '
                        f'(the datasets: {", ".join(sorted(DATASET_INFO))})')
    for name, rule, value in _config_values(cfg):
        _check_config_value(path, name, value, rule)
    if cfg.schedule.nesterov and cfg.schedule.momentum == 0:
        raise UserError(f'{path}: schedule.nesterov needs a momentum > 0 (SGD refuses Nesterov '
                        f'without momentum); set nesterov=False for plain SGD')
    pretrained = cfg.model.backbone.get('pretrained')
    if pretrained and not Path(pretrained).expanduser().is_file():
        raise UserError(f'{path}: model.backbone.pretrained: {pretrained} is not a file')


_PLAIN_VALUES = (str, int, float, bool, type(None))


def _check_storable(value, path: Path, name: str = '') -> None:
    """Refuse a config holding what run.json (JSON) cannot hold as it is, naming where: a
    set, an object, a dict keyed by other than strings and numbers. Found only when run.json
    is written, it stopped the run after --overwrite had deleted the stored one."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, _PLAIN_VALUES):
                raise UserError(f'{path}: {name or "the config"} has the key {key!r}, which '
                                f'run.json cannot hold: a dict\'s keys are strings or numbers')
            _check_storable(item, path, f'{name}.{key}' if name else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_storable(item, path, f'{name}[{i}]')
    elif isinstance(value, type):
        raise UserError(f'{path}: {name} is the class {value.__name__}, which run.json cannot '
                        f'hold: give its registered name as a string (e.g. \'cssbench.'
                        f'{value.__name__}\')')
    elif not isinstance(value, _PLAIN_VALUES):
        raise UserError(f'{path}: {name} is {value!r}, a {type(value).__name__}, which run.json '
                        f'cannot hold (a config holds numbers, strings, True, False, None, '
                        f'lists, tuples and dicts)')


def misspelt_section(name: str) -> str | None:
    """The section that ``name``, a config's top-level dict, misspells, if any: written in
    other case (``Speed``), or one letter off before its end: one changed, left out or added
    (``spead``, ``shedule``), or two neighbours swapped (``modle``). One off at the end reads
    as a name of its own (``mode``, ``modes``, ``schedules``), as a helper's may. A run would
    not read it, and the base's values would train unnoticed."""
    lower = name.lower()
    return next((section for section in CONFIG_SECTIONS
                 if name != section and (lower == section or _one_letter_inside(lower, section))),
                None)


def _one_letter_inside(a: str, b: str) -> bool:
    """Whether ``a`` is ``b`` with one letter changed, left out or added before its end, or
    two neighbours swapped."""
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        return (len(diff) == 1 and diff[0] < len(a) - 1) or (
            len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]])
    short, long = sorted((a, b), key=len)
    if len(long) - len(short) != 1:
        return False
    first = next((i for i, (x, y) in enumerate(zip(short, long)) if x != y), len(short))
    return first < len(short) and short[first:] == long[first + 1:]


def config_digest(cfg: Config) -> str:
    """What the config computes (``digests.sections_digest``): how fast is left out."""
    return sections_digest(cfg.to_dict())


def shared_config_digest(cfg: Config) -> str:
    """The config's digest without the method's own settings (``digests.shared_sections_digest``)."""
    return shared_sections_digest(cfg.to_dict())
