"""Runs a method through every step of a protocol with mmengine's Runner.

Per step: build the step's datasets and the model (previous step's weights loaded, the
previous model attached as a frozen teacher), train with mmengine, evaluate on the val
images of the classes seen so far, save the step's weights and metrics, go on. A step whose
weights and metrics exist is not trained again; an interrupted step resumes from its last
epoch checkpoint (mmengine's ``resume``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.runner import Runner

from . import __version__
from .datasets import IncrementalSegDataset, eval_lut, train_lut
from .datasets_info import DATASET_INFO
from . import hooks  # noqa: F401  (registers StepProgressHook)
from .errors import UserError
from .io import atomic_write_json, atomic_write_text
from .methods import get_method
from .metrics import summarize_step
from .protocols import Protocol, load_protocol
from .registry import MODELS
from .splits import index_dataset, protocol_splits, resolve_data_root, select
from .tables import format_step_table, steps_to_csv
from .transforms import EvalTransform, TrainTransform

CONFIGS_DIR = Path(__file__).resolve().parent / 'configs'
REPO_ROOT = Path(__file__).resolve().parent.parent


def load_config(name_or_path: str, epochs: int | None = None) -> Config:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS_DIR / f'{name_or_path.replace("-", "_")}.py'
    if not path.is_file():
        known = ', '.join(p.stem.replace('_', '-') for p in sorted(CONFIGS_DIR.glob('*.py')))
        raise UserError(f'unknown config {name_or_path!r} (known: {known}, or a path to a .py file)')
    cfg = Config.fromfile(str(path))
    if epochs is not None:
        if epochs < 1:
            raise UserError(f'--epochs must be at least 1, got {epochs}')
        cfg.schedule.epochs = epochs
    return cfg


def git_revision() -> str:
    try:
        out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def environment() -> dict:
    import mmengine
    import mmseg
    import torchvision
    return dict(python=platform.python_version(), torch=torch.__version__,
                torchvision=torchvision.__version__, mmengine=mmengine.__version__,
                mmseg=mmseg.__version__, cssbench=__version__, platform=platform.platform(),
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu',
                gpus=torch.cuda.device_count(), torch_threads=torch.get_num_threads())


@dataclass
class RunPaths:
    results: Path       # metrics, tables, run.json: the product's memory
    work: Path          # checkpoints and mmengine logs

    def step_work(self, step: int) -> Path:
        return self.work / f'step{step}'

    def step_weights(self, step: int) -> Path:
        return self.step_work(step) / 'model.pth'

    def step_metrics(self, step: int) -> Path:
        return self.results / 'steps' / f'step{step}.json'


def build_model(cfg: Config, model_type: str, protocol: Protocol, step: int):
    model_cfg = cfg.model.to_dict() if hasattr(cfg.model, 'to_dict') else dict(cfg.model)
    model_cfg.update(type=model_type, step_sizes=protocol.step_sizes(step))
    return MODELS.build(model_cfg)


def load_previous_weights(model, state: dict, source: Path) -> None:
    """Load step t-1's weights into a step-t model: everything but the new classifier."""
    own = model.state_dict()
    new_prefix = f'classifiers.{model.step}.'
    misfit = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith(new_prefix)]
    if misfit or missing:
        raise UserError(f'{source}: checkpoint does not fit this model (e.g. '
                        f'{(misfit + missing)[0]!r}): from another protocol or config?')
    model.load_state_dict(state, strict=False)


def save_weights(model, path: Path) -> None:
    tmp = path.with_suffix('.tmp')
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


def make_mmengine_runner(cfg: Config, model, train_set, val_set, work_dir: Path, step: int,
                         seed: int, metric_cfg: dict, progress_prefix: str) -> Runner:
    sched, data = cfg.schedule, cfg.data
    epochs = sched.epochs
    iters_per_epoch = max(1, len(train_set) // data.batch_size)
    loader = dict(batch_size=data.batch_size, num_workers=data.num_workers,
                  persistent_workers=data.num_workers > 0, pin_memory=torch.cuda.is_available(),
                  collate_fn=dict(type='default_collate'))
    return Runner(
        model=model,
        work_dir=str(work_dir),
        experiment_name=f'step{step}',
        train_dataloader=dict(loader, dataset=train_set, drop_last=True,
                              sampler=dict(type='DefaultSampler', shuffle=True)),
        val_dataloader=dict(loader, dataset=val_set, batch_size=data.eval_batch_size,
                            sampler=dict(type='DefaultSampler', shuffle=False)),
        val_evaluator=metric_cfg,
        # Evaluated once, after the last epoch, by the caller (never used to select a checkpoint).
        train_cfg=dict(by_epoch=True, max_epochs=epochs, val_begin=epochs + 1),
        val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(
            type='SGD', lr=sched.lr[min(step, 1)], momentum=sched.momentum,
            nesterov=sched.nesterov, weight_decay=sched.weight_decay)),
        param_scheduler=[dict(type='PolyLR', power=sched.poly_power, eta_min=0.0, by_epoch=True,
                              begin=0, end=epochs, convert_to_iter_based=True)],
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=1, save_last=True),
            logger=dict(type='LoggerHook', interval=max(1, iters_per_epoch // 4)),
            progress=dict(type='cssbench.StepProgressHook', prefix=progress_prefix,
                          interval=max(1, iters_per_epoch // 2)),
            timer=dict(type='IterTimerHook'),
            param_scheduler=dict(type='ParamSchedulerHook'),
            sampler_seed=dict(type='DistSamplerSeedHook'),
        ),
        randomness=dict(seed=seed + step),
        resume=(work_dir / 'last_checkpoint').exists(),  # an interrupted step goes on
        default_scope='cssbench',
        log_level='WARNING',  # the console gets StepProgressHook's lines, not mmengine's dumps
        cfg=dict(),
    )


@contextlib.contextmanager
def _trusting_own_epoch_checkpoints():
    """Let mmengine's resume unpickle the epoch checkpoint this run wrote in its work dir.

    mmengine calls torch.load without ``weights_only``, which defaults to True since torch
    2.6 and refuses the message hub's pickled history buffers. Only that resume runs here.
    """
    previous = os.environ.get('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD')
    os.environ['TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'] = '1'
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD')
            yield
    finally:
        if previous is None:
            os.environ.pop('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD')
        else:
            os.environ['TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'] = previous


class _DropDeprecationNotes(logging.Filter):
    """mmengine's CheckpointHook warns on every run about its own use of FileClient."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return 'will be deprecated in future' not in message and 'is the alias of' not in message


def _config_digest(cfg: Config) -> str:
    return hashlib.sha256(cfg.pretty_text.encode()).hexdigest()[:16]


def run_protocol(protocol_name: str, method_name: str = 'ft', *, config: str = 'small',
                 data_root: str | None = None, epochs: int | None = None,
                 results_root: str | Path = 'results', work_dir: str | Path | None = None,
                 run_name: str | None = None, seed: int = 0, overwrite: bool = False,
                 progress: bool = True, log=print) -> list[dict]:
    """Train and evaluate every step; returns the per-step metrics (also written to disk)."""
    protocol = load_protocol(protocol_name)
    method = get_method(method_name)
    cfg = load_config(config, epochs)
    steps_protocol = protocol.joint() if method.joint else protocol
    info = DATASET_INFO[protocol.dataset]

    run_name = run_name or f'{Path(config).stem.replace("_", "-")}-seed{seed}'
    results_dir = Path(results_root) / protocol.name / method.name / run_name
    paths = RunPaths(results_dir, Path(work_dir) if work_dir else results_dir / 'work')
    run_file = results_dir / 'run.json'
    if run_file.exists() and overwrite:
        shutil.rmtree(results_dir)
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get('config_digest') != _config_digest(cfg):
            raise UserError(f'{results_dir}: a run with another config is stored there; pass '
                            f'--overwrite to replace it or --run-name to keep both')
        if previous.get('status') == 'complete':
            raise UserError(f'{results_dir}: this run is complete; `cssbench table` shows it, '
                            f'--overwrite reruns it')

    root = resolve_data_root(protocol.dataset, data_root, progress=progress)
    index = index_dataset(protocol.dataset, root, progress=progress)
    splits = protocol_splits(steps_protocol, index)
    record = dict(protocol=protocol.to_dict(), method=method.name, run=run_name, seed=seed,
                  config_name=config, config=cfg.to_dict(), config_digest=_config_digest(cfg),
                  data_root=str(root), dataset_fingerprint=index.fingerprint,
                  git_revision=git_revision(), environment=environment(), status='running',
                  started=time.strftime('%Y-%m-%dT%H:%M:%S'))
    atomic_write_json(run_file, record)

    started = time.time()
    step_results = []
    for t, split in enumerate(splits):
        metrics_file = paths.step_metrics(t)
        if metrics_file.exists() and paths.step_weights(t).exists():
            log(f'[{protocol.name}/{method.name}] step {t}: done before, reusing its weights and metrics')
            step_results.append(json.loads(metrics_file.read_text()))
            continue
        log(f'[{protocol.name}/{method.name}] step {t}/{len(splits) - 1}: classes '
            f'{split["classes"][0]}..{split["classes"][-1]}, {len(split["train"])} train images, '
            f'{len(split["val"])} val images')
        if not split['train']:
            raise UserError(f'protocol {protocol.name}: step {t} keeps no training image of this dataset')
        step_start = time.time()
        iou = train_and_evaluate_step(cfg, method, steps_protocol, t, split, index, paths, seed, info)
        # Joint training's single step is reported in the protocol's columns (old/new/all).
        summary_step = protocol.num_steps - 1 if method.joint else t
        result = dict(step=t, classes=split['classes'], num_train=len(split['train']),
                      num_val=len(split['val']),
                      iou={str(c): (None if math.isnan(v) else v) for c, v in iou.items()},
                      columns=summarize_step(protocol, summary_step, iou, info.background_scored),
                      wall_time_s=round(time.time() - step_start, 1))
        atomic_write_json(metrics_file, result)
        step_results.append(result)
        log(format_step_table(protocol.name, method.name, step_results[-1:]))
    write_run_tables(results_dir, step_results)
    record.update(status='complete', wall_time_s=round(time.time() - started, 1),
                  finished=time.strftime('%Y-%m-%dT%H:%M:%S'))
    atomic_write_json(run_file, record)
    return step_results


def train_and_evaluate_step(cfg, method, protocol: Protocol, t: int, split: dict, index,
                            paths: RunPaths, seed: int, info) -> dict[int, float]:
    """Train step ``t`` and evaluate it; returns the IoU per seen class id (NaN: not in the GT)."""
    model = build_model(cfg, method.model_type, protocol, t)
    if t > 0:
        previous = torch.load(paths.step_weights(t - 1), map_location='cpu', weights_only=True)
        load_previous_weights(model, previous, paths.step_weights(t - 1))
        teacher = build_model(cfg, method.model_type, protocol, t - 1)
        teacher.load_state_dict(previous)
        model.set_teacher(teacher)
        model.init_new_classifier()

    crop = cfg.data.crop_size
    train_set = IncrementalSegDataset(select(index.samples['train'], split['train']),
                                      train_lut(protocol, t), TrainTransform(crop), info.classes)
    val_set = IncrementalSegDataset(select(index.samples['val'], split['val']),
                                    eval_lut(protocol, t, info.background_scored),
                                    EvalTransform(crop), info.classes)
    class_ids = list(protocol.classes_seen(t))
    metric_cfg = dict(type='cssbench.IncrementalIoUMetric', class_ids=class_ids, prefix='val')
    runner = make_mmengine_runner(cfg, model, train_set, val_set, paths.step_work(t), t, seed,
                                  metric_cfg, progress_prefix=f'[{protocol.name}/{method.name}] step {t}')
    runner.logger.addFilter(_DropDeprecationNotes())
    if model.teacher is not None:
        model.teacher.to(next(model.parameters()).device)
    resuming = (paths.step_work(t) / 'last_checkpoint').exists()
    with _trusting_own_epoch_checkpoints() if resuming else contextlib.nullcontext():
        runner.train()
    metrics = runner.val_loop.run()
    save_weights(model, paths.step_weights(t))
    _close_mmengine_logger(runner)

    return {c: metrics[f'val/IoU.{c}'] for c in class_ids}


def _close_mmengine_logger(runner: Runner) -> None:
    """Each Runner adds a file handler to its logger; close it so steps don't leak files."""
    logger = runner.logger
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            logger.removeHandler(handler)
    MMLogger._instance_dict.pop(logger.instance_name, None)


def write_run_tables(results_dir: Path, step_results: list[dict]) -> None:
    atomic_write_json(results_dir / 'metrics.json', dict(steps=step_results))
    atomic_write_text(results_dir / 'metrics.csv', steps_to_csv(step_results))
