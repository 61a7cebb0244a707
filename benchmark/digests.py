"""A config's digests: what identifies the results a config computes.

They are computed from the config's sections as plain JSON, so the store computes a stored
run's from the config its run.json holds, by the rule of the code reading it: a rule that
changes (a setting found to decide only speed) applies to the runs stored before.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Collection

# Data settings that decide how fast, not what is computed: the loader's worker count (each
# sample's augmentation is seeded by the sample, datasets.sample_generator) and the batch
# evaluation takes (the weights are scored as trained; batching does not change a prediction).
SPEED_ONLY_DATA_SETTINGS = ('num_workers', 'eval_batch_size')

# The model settings every method's run of one model shares: the base segmentor's
# (runner.model_setting_parameters(IncrementalSegmentor); a test checks this copy, which
# the store reads without importing the models) and the model's type.
SHARED_MODEL_SETTINGS = ('type', 'backbone', 'decode_head', 'step_sizes', 'data_preprocessor',
                         'ignore_index', 'overlapped', 'classifier_dropout')


def json_digest(value, length: int = 16) -> str:
    """The sha256 of ``value`` as JSON with sorted keys, its first ``length`` hex digits."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def sections_digest(sections: dict, model_keys: Collection[str] | None = None) -> str:
    """The digest of a config's sections (``Config.to_dict()``, or as run.json holds them):
    what ``_what_it_computes`` keeps, and with ``model_keys`` every setting of the model
    section but those."""
    kept = _what_it_computes(sections)
    if model_keys is not None and isinstance(kept.get('model'), dict):
        kept['model'] = {k: v for k, v in kept['model'].items() if k in model_keys}
    return json_digest(kept)


def _what_it_computes(sections: dict) -> dict:
    """The sections but the speed section and ``SPEED_ONLY_DATA_SETTINGS``, as run.json holds
    them (keys strings, tuples lists): sorted, a dict keyed by numbers sorts by its keys'
    text, as the stored config's does, not by their value."""
    kept = {k: v for k, v in sections.items() if k != 'speed'}
    if isinstance(kept.get('data'), dict):
        kept['data'] = {k: v for k, v in kept['data'].items() if k not in SPEED_ONLY_DATA_SETTINGS}
    return json.loads(json.dumps(kept, default=str))


def config_differences(before: dict, now: dict, most: int = 3) -> str:
    """What differs between two configs' sections, as their digests see it, in words:
    ``schedule.epochs was 1, now 2`` (at most ``most`` settings named)."""
    was, now = _settings(_what_it_computes(before)), _settings(_what_it_computes(now))
    # compared as the digests see them, as sorted JSON: 1 and 1.0 (or 0 and False) differ;
    # a part's type first: another backbone's other settings follow from it
    names = sorted((k for k in was.keys() | now.keys()
                    if _as_json(was.get(k, _NONE)) != _as_json(now.get(k, _NONE))),
                   key=lambda k: (k.rsplit('.', 1)[-1] != 'type', k))
    said = [f'{k} was {_said(was.get(k, _NONE))}, now {_said(now.get(k, _NONE))}'
            for k in names[:most]]
    return '; '.join(said) + (f'; and {len(names) - most} more' if len(names) > most else '')


_NONE = object()   # a setting a config does not hold


def _as_json(value) -> str:
    return 'unset' if value is _NONE else json.dumps(value, sort_keys=True)


def _said(value, most: int = 60) -> str:
    """A setting's value as JSON, cut to ``most`` characters (a long list stays one line)."""
    text = _as_json(value)
    return text if len(text) <= most else text[:most - 3] + '...'


def _settings(sections: dict, prefix: str = '') -> dict:
    """Every setting of ``sections`` by its dotted name (``schedule.epochs``); a list is one."""
    found = {}
    for key, value in sections.items():
        name = f'{prefix}{key}'
        found.update(_settings(value, f'{name}.') if isinstance(value, dict) and value
                     else {name: value})
    return found


def shared_sections_digest(sections: dict) -> str:
    """The digest without the method's own settings (those the base segmentor does not take,
    e.g. lwf's ``loss_kd``): the same for every method's run of one model, data and schedule,
    by which the tables find the joint training that a run compares with."""
    return sections_digest(sections, SHARED_MODEL_SETTINGS)


def stored_digests(record: dict) -> tuple[str | None, str | None]:
    """A run.json record's config digest and shared one, computed from the config it holds;
    as recorded where it holds none (the shared one None where not recorded either)."""
    config = record.get('config')
    if isinstance(config, dict):
        return sections_digest(config), shared_sections_digest(config)
    return record.get('config_digest'), record.get('shared_config_digest') or None


def epochs_and_the_rest(record: dict) -> tuple[int | None, str | None]:
    """A run.json record's epochs per step (its resolved config's ``schedule.epochs``:
    ``--epochs``, else the dataset's, else the config's) and the digest of its config without
    them, by which the tables see configs that differ in their epochs alone; (None, None)
    where the record does not hold them."""
    config = record.get('config')
    schedule = config.get('schedule') if isinstance(config, dict) else None
    epochs = schedule.get('epochs') if isinstance(schedule, dict) else None
    if type(epochs) is not int:
        return None, None
    rest = dict(config, schedule={k: v for k, v in schedule.items() if k != 'epochs'})
    return epochs, sections_digest(rest)
