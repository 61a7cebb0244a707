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


def sections_digest(sections: dict, model_keys: Collection[str] | None = None) -> str:
    """The digest of a config's sections (``Config.to_dict()``, or as run.json holds them):
    the speed section and ``SPEED_ONLY_DATA_SETTINGS`` left out, and with ``model_keys``
    every setting of the model section but those."""
    kept = {k: v for k, v in sections.items() if k != 'speed'}
    if isinstance(kept.get('data'), dict):
        kept['data'] = {k: v for k, v in kept['data'].items() if k not in SPEED_ONLY_DATA_SETTINGS}
    if model_keys is not None and isinstance(kept.get('model'), dict):
        kept['model'] = {k: v for k, v in kept['model'].items() if k in model_keys}
    # As run.json holds them first (keys strings, tuples lists), then sorted: a dict keyed by
    # numbers sorts by its keys' text, as the stored config's does, not by their value.
    plain = json.loads(json.dumps(kept, default=str))
    text = json.dumps(plain, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
