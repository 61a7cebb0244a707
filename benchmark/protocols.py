"""Continual-segmentation protocols: which classes each step adds, loaded from YAML.

A protocol file names its dataset, its image-filtering mode and its steps::

    name: voc-15-1-overlap
    dataset: voc
    mode: overlap          # overlap | disjoint
    steps: ["0-15", 16, 17, 18, 19, 20]

A step is a list of class ids and "a-b" ranges (inclusive), or a single such item. Step 0
holds the background class 0, as in the reference code's ``tasks.py``; the steps together
cover every class id of the dataset exactly once.

``class_order: random`` (random class orders, as PLOP studies them; drawn here, not PLOP's
fixed lists) keeps the steps' sizes but draws which
classes each step holds: a permutation of the non-background classes, seeded by
``class_order_seed`` if the file sets one, else by the run's seed (so ``--seeds 0,1,2`` runs
three orders, which the tables aggregate).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

from .datasets_info import DATASET_INFO
from .digests import json_digest
from .errors import UserError
from .store import (PLAIN_NAME, RUN_RECORD, CorruptRun, is_plain_name, read_json_object,
                    run_folders)

try:
    from . import shipped_protocols
    PROTOCOLS_DIR = Path(shipped_protocols.__file__).resolve().parent
except ImportError:   # an editable install made before protocols/ was a package: the checkout's
    PROTOCOLS_DIR = Path(__file__).resolve().parent.parent / 'protocols'
MODES = ('overlap', 'disjoint')
CLASS_ORDERS = ('fixed', 'random')  # in a file; a run's protocol with a drawn order says 'drawn'
TRAIN_IGNORE_CHOICES = ('ignore', 'background')
EVAL_UNSEEN_CHOICES = ('ignore', 'background')
EVAL_CROP_CHOICES = ('center', 'whole')
# The optional fields of a protocol file, as one that leaves them out has them: the reference's.
FILE_DEFAULTS = dict(train_ignore='background', eval_unseen='ignore', eval_crop='center',
                     class_order='fixed')
# What their other values mean, as the tables' notes say it.
SETTING_NOTES = {
    ('train_ignore', 'ignore'): 'training ignores the 255 boundary band (train_ignore: ignore; '
                                'the reference trains it as background)',
    ('eval_unseen', 'background'): 'evaluation scores classes not yet learned as background '
                                   '(eval_unseen: background; the reference ignores them)',
    ('eval_crop', 'whole'): 'evaluation scores whole images at their own resolution (eval_crop: '
                            'whole; the reference scores the central crop)',
    ('class_order', 'drawn'): 'the classes come in a drawn order (class_order: random; the '
                              'reference learns them in id order)',
}


def settings_of(record: dict) -> dict[str, str]:
    """The optional settings of a protocol's record (``Protocol.to_dict``, as run.json keeps
    it) that are not the defaults."""
    return {k: record[k] for k, default in FILE_DEFAULTS.items() if record.get(k, default) != default}


def setting_notes(record: dict) -> list[str]:
    """What each of a protocol record's settings that are not the reference's means."""
    return [SETTING_NOTES[k, v] for k, v in settings_of(record).items() if (k, v) in SETTING_NOTES]


class ProtocolError(UserError):
    """A protocol file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Protocol:
    name: str
    dataset: str
    mode: str
    steps: tuple[tuple[int, ...], ...]
    # What the ignore value 255 (VOC's boundary band) becomes in training targets. The
    # reference code (fcdl94/MiB and LTTM/SDR dataset/voc.py, `inverted_order[255] =
    # masking_value`, 0 in training) trains it as background: that is the default. PLOP
    # keeps it ignored: 'ignore'. Evaluation always ignores it.
    train_ignore: str = FILE_DEFAULTS['train_ignore']
    # What a class not yet learned is in evaluation targets: ignored (255), as in the
    # reference (SDR/MiB dataset/voc.py, masking value 255 at test), or background (0), as
    # in PLOP's dataset/voc.py (masking value 0 in both). The last step sees every class.
    eval_unseen: str = FILE_DEFAULTS['eval_unseen']
    # Which pixels of a val image are scored: 'center', the reference's default (``crop_val``
    # true): the shorter side resized to the config's crop size, then the central square; or
    # 'whole': the whole image at its own resolution (the reference run with its store_false
    # flag ``--crop_val``, and most segmentation codebases).
    eval_crop: str = FILE_DEFAULTS['eval_crop']
    # The file's ``class_order``: fixed | random; 'drawn' once a random order is resolved.
    ordering: str = FILE_DEFAULTS['class_order']
    ordering_seed: int | None = None
    description: str = ''
    source: Path | None = field(default=None, compare=False)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def classes_seen(self, step: int) -> tuple[int, ...]:
        """Every class learned up to and including ``step`` (background included)."""
        return tuple(c for s in self.steps[:step + 1] for c in s)

    @property
    def class_order(self) -> tuple[int, ...]:
        """Class ids in output-channel order: step 0's classes first, then step 1's, ..."""
        return self.classes_seen(self.num_steps - 1)

    def classes_old(self, step: int) -> tuple[int, ...]:
        return self.classes_seen(step - 1) if step > 0 else ()

    def step_sizes(self, step: int) -> list[int]:
        """Number of classes each step's classifier has, for a model at ``step``."""
        return [len(s) for s in self.steps[:step + 1]]

    def first_step_training(self) -> dict:
        """What step 0 trains on: its classes in their order, the dataset, the filtering mode
        and the training targets' ignore rule. Step 0's images and targets depend on nothing
        else (to it, the later steps' classes are all background, or, disjoint, all excluded,
        whichever step brings them), so protocols that agree on this, e.g. voc-15-1-overlap
        and voc-15-5-overlap, or a protocol and its ``eval_crop: whole`` variant, train the
        same step-0 model."""
        return dict(dataset=self.dataset, mode=self.mode, classes=list(self.steps[0]),
                    train_ignore=self.train_ignore)

    @property
    def evaluation(self) -> dict[str, str]:
        """The settings that decide how a step's predictions are scored, and nothing else."""
        return dict(eval_unseen=self.eval_unseen, eval_crop=self.eval_crop)

    def joint(self) -> 'Protocol':
        """The offline upper bound: every class of this protocol in a single step."""
        return replace(self, steps=(tuple(sorted(self.classes_seen(self.num_steps - 1))),),
                       description='')

    @property
    def run_seed_draws_class_order(self) -> bool:
        """Whether ``with_class_order`` draws from the run's seed: a random order whose file
        sets no ``class_order_seed``."""
        return self.ordering == 'random' and self.ordering_seed is None

    def with_class_order(self, run_seed: int) -> 'Protocol':
        """The protocol a run with ``run_seed`` trains: itself, unless its class order is
        random; then the same step sizes holding a permutation of the non-background classes,
        drawn from ``class_order_seed`` (or ``run_seed``). Background stays in step 0."""
        if self.ordering != 'random':
            return self
        seed = run_seed if self.run_seed_draws_class_order else self.ordering_seed
        classes = np.random.default_rng(seed).permutation(sorted(set(self.class_order) - {0}))
        sizes = [len(s) for s in self.steps]
        sizes[0] -= 1  # background stays in step 0
        bounds = np.cumsum([0, *sizes])
        steps = [tuple(sorted(int(c) for c in classes[a:b])) for a, b in zip(bounds, bounds[1:])]
        steps[0] = (0, *steps[0])
        return replace(self, steps=tuple(steps), ordering='drawn', ordering_seed=seed)

    def to_dict(self) -> dict:
        d = dict(name=self.name, dataset=self.dataset, mode=self.mode,
                 steps=[list(s) for s in self.steps], train_ignore=self.train_ignore)
        if self.ordering != 'fixed':  # fixed-order dicts (and fingerprints) stay as they were
            d.update(class_order=self.ordering, class_order_seed=self.ordering_seed)
        for key, value in self.evaluation.items():  # likewise
            if value != FILE_DEFAULTS[key]:
                d[key] = value
        return d

    @cached_property
    def fingerprint(self) -> str:
        """Hash of everything that decides what the steps train on and how they are scored
        (not the name or description)."""
        key = dict(self.to_dict())
        key.pop('name')
        return json_digest(key)


def parse_class_item(item, where: str) -> list[int]:
    if isinstance(item, bool):
        raise ProtocolError(f'{where}: {item!r} is not a class id')
    if isinstance(item, int):
        return [item]
    if isinstance(item, str):
        lo, sep, hi = item.partition('-')
        try:
            lo_i, hi_i = int(lo), int(hi if sep else lo)
        except ValueError:
            raise ProtocolError(f"{where}: {item!r} is neither a class id nor a range 'a-b'") from None
        if hi_i < lo_i:
            raise ProtocolError(f'{where}: range {item!r} is empty')
        return list(range(lo_i, hi_i + 1))
    raise ProtocolError(f'{where}: {item!r} is neither a class id nor a range')


def _choice(data: dict, key: str, choices: tuple[str, ...], src: str) -> str:
    """The file's value of field ``key`` (its default if optional and left out), refused
    unless one of ``choices``."""
    value = data.get(key, FILE_DEFAULTS.get(key))
    if value is None:
        raise ProtocolError(f'{src}: field {key}: no value (one of {choices})')
    if value not in choices:
        said = ' (YAML reads an unquoted yes, no, on, off as true or false)' if isinstance(value, bool) else ''
        raise ProtocolError(f'{src}: field {key}: {value!r} is not one of {choices}{said}')
    return value


def parse_protocol(data, source: str | Path = '<protocol>') -> Protocol:
    """Validate a protocol's mapping and build it; every error names ``source`` and the field."""
    src = str(source)
    if not isinstance(data, dict):
        raise ProtocolError(f'{src}: expected a mapping with name, dataset, mode, steps')
    for key in ('name', 'dataset', 'mode', 'steps'):
        if key not in data:
            raise ProtocolError(f'{src}: field {key!r} is missing')
    unknown = set(data) - {'name', 'dataset', 'mode', 'steps', *FILE_DEFAULTS, 'description',
                           'class_order_seed'}
    if unknown:
        raise ProtocolError(f'{src}: unknown field(s) {sorted(unknown)}')
    description = data.get('description')
    description = '' if description is None else description   # `description:` and nothing
    for key, value in (('name', data['name']), ('description', description)):
        if not isinstance(value, str):   # YAML's number, date, yes/no, empty value, list or mapping
            raise ProtocolError(f'{src}: field {key}: {value!r} is not text; quote it (YAML reads '
                                f'an unquoted 1.50, 2024-01-01, yes, nothing, or a "key: value" '
                                f'line otherwise)')
    if not is_plain_name(data['name']):
        raise ProtocolError(f'{src}: field name: {data["name"]!r} is not {PLAIN_NAME}')
    dataset = _choice(data, 'dataset', tuple(DATASET_INFO), src)
    mode = _choice(data, 'mode', MODES, src)
    train_ignore = _choice(data, 'train_ignore', TRAIN_IGNORE_CHOICES, src)
    eval_unseen = _choice(data, 'eval_unseen', EVAL_UNSEEN_CHOICES, src)
    eval_crop = _choice(data, 'eval_crop', EVAL_CROP_CHOICES, src)
    class_order = _choice(data, 'class_order', CLASS_ORDERS, src)
    order_seed = data.get('class_order_seed')
    if order_seed is not None and (isinstance(order_seed, bool) or not isinstance(order_seed, int)
                                   or order_seed < 0):
        raise ProtocolError(f'{src}: field class_order_seed: expected a non-negative integer, '
                            f'got {order_seed!r}')
    if order_seed is not None and class_order != 'random':
        raise ProtocolError(f'{src}: field class_order_seed: only with class_order: random')
    raw_steps = data['steps']
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ProtocolError(f'{src}: field steps: expected a non-empty list of steps')

    num_classes = DATASET_INFO[dataset].num_classes
    steps: list[tuple[int, ...]] = []
    first_step_of: dict[int, int] = {}
    for i, raw in enumerate(raw_steps):
        where = f'{src}: field steps[{i}]'
        items = raw if isinstance(raw, list) else [raw]
        classes = [c for item in items for c in parse_class_item(item, where)]
        if not classes:
            raise ProtocolError(f'{where}: step has no classes')
        for c in classes:
            if not 0 <= c < num_classes:
                raise ProtocolError(f'{where}: class id {c} is out of range for dataset '
                                    f'{dataset!r} (0..{num_classes - 1})')
            if c in first_step_of:
                raise ProtocolError(f'{where}: class {c} is already in steps[{first_step_of[c]}]')
            first_step_of[c] = i
        steps.append(tuple(classes))
    if 0 not in steps[0]:
        raise ProtocolError(f'{src}: field steps[0]: must contain the background class 0')
    # Background is output channel 0 wherever step 0 lists it, as in the reference (SDR/MiB
    # dataset/voc.py strips 0 from the labels and orders the channels [0] + labels_old +
    # labels): the targets' background value, the unbiased losses and MiB's init all read
    # channel 0 as background.
    steps[0] = (0, *(c for c in steps[0] if c != 0))
    missing = sorted(set(range(num_classes)) - set(first_step_of))
    if missing:
        shown = ', '.join(map(str, missing[:10])) + (' ...' if len(missing) > 10 else '')
        noun = 'class' if len(missing) == 1 else 'classes'
        raise ProtocolError(f'{src}: field steps: {noun} {shown} of dataset {dataset!r} in no '
                            f'step (the steps must cover 0..{num_classes - 1})')
    return Protocol(name=data['name'], dataset=dataset, mode=mode, steps=tuple(steps),
                    train_ignore=train_ignore, eval_unseen=eval_unseen, eval_crop=eval_crop,
                    ordering=class_order, ordering_seed=order_seed,
                    description=description,
                    source=Path(source) if source != '<protocol>' else None)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (where safe_load
    keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == 'tag:yaml.org,2002:merge':
                continue   # `<<: {...}` merges a mapping whose keys this one may override
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
            except TypeError:   # unhashable: SafeLoader's own error below says so
                break
            if twice:
                raise yaml.constructor.ConstructorError(
                    None, None, f'field {key!r} given twice', key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_protocol_file(path: str | Path) -> Protocol:
    path = Path(path)
    try:
        text = path.read_text(encoding='utf-8')
    except OSError as e:
        raise ProtocolError(f'{path}: cannot read protocol file ({e.strerror})') from None
    except UnicodeDecodeError as e:
        raise ProtocolError(f'{path}: not a UTF-8 text file ({e.reason} at byte {e.start})') from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        at = f' at line {mark.line + 1}' if mark is not None else ''
        raise ProtocolError(f'{path}: malformed YAML{at}: {getattr(e, "problem", e)}') from None
    return parse_protocol(data, path)


def available_protocols() -> list[str]:
    return sorted(p.stem for p in PROTOCOLS_DIR.glob('*.yaml'))


def is_protocol_path(name_or_path: str) -> bool:
    """Whether ``--protocol`` was given a file (a name has no suffix): ``.yaml`` or ``.yml``,
    in any case."""
    return name_or_path.lower().endswith(('.yaml', '.yml'))


def load_protocol(name_or_path: str) -> Protocol:
    """A shipped protocol by name (``voc-15-1-overlap``) or any protocol YAML by path."""
    if is_protocol_path(name_or_path):
        protocol = load_protocol_file(name_or_path)
        shipped = PROTOCOLS_DIR / f'{protocol.name}.yaml'
        if shipped.is_file() and load_protocol_file(shipped).fingerprint != protocol.fingerprint:
            raise ProtocolError(f'{name_or_path}: field name: {protocol.name!r} is a shipped '
                                f'protocol\'s, which this one is not; give it another name')
        return protocol
    path = PROTOCOLS_DIR / f'{name_or_path}.yaml'
    if not path.exists():
        raise ProtocolError(f'unknown protocol {name_or_path!r}; `cssbench list` shows the '
                            f'shipped ones, or pass a path to a .yaml file')
    protocol = load_protocol_file(path)
    if protocol.name != name_or_path:
        raise ProtocolError(f'{path}: field name: {protocol.name!r} differs from the file name')
    return protocol


def protocol_definition(protocol: dict) -> dict:
    """What two runs of one protocol share: a drawn class order differs by seed, its step
    sizes do not (a file's ``random`` order, not yet drawn, is compared the same way)."""
    d = dict(FILE_DEFAULTS, **protocol)   # a stored record leaves out what is the default
    d.pop('class_order_seed', None)
    if d['class_order'] in ('random', 'drawn'):
        d.update(class_order='drawn', steps=[len(s) for s in d['steps']])
    return d


def check_stored_protocol_name(store_root: Path, protocol: Protocol,
                               advice: str = 'give this one another name') -> None:
    """The store keeps runs by protocol name: refuse a protocol (a file of one's own) that
    takes the name of another whose runs are stored, rather than mix the two in its tables."""
    mine = protocol_definition(protocol.to_dict())
    for folder in run_folders(store_root, protocol.name):
        try:
            stored = read_json_object(folder / RUN_RECORD)['protocol']
        except (CorruptRun, KeyError):
            continue   # the store names unreadable runs where it reads them
        if not isinstance(stored, dict) or protocol_definition(stored) != mine:
            raise UserError(f'{protocol.source or protocol.name}: another protocol named '
                            f'{protocol.name!r} has runs stored ({folder}); {advice}')
