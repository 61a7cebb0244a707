"""A step's mmengine Runner: its data loaders, optimizer, learning-rate schedule, hooks and
evaluation, built for a block and released after it."""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from mmengine.config import Config, ConfigDict
from mmengine.logging import MMLogger
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import DefaultScope
from mmengine.runner import Runner

from . import hooks, metrics  # noqa: F401  (register the hooks, the sampler and the metric)
from .datasets import IncrementalSegDataset, eval_lut, train_lut
from .datasets_info import DATASET_INFO
from .distributed import world_size
from .errors import UserError
from .protocols import Protocol
from .speed import (autocast_name, effective_speed, optim_wrapper_config, training_device,
                    val_loop_config)
from .transforms import EvalTransform, TrainTransform


def per_process_batch(batch_size: int, processes: int) -> int:
    """A config's batch size is the total over the processes; each takes an equal share, of 2
    images at least where BN is not synchronised (on the CPU: gloo has no SyncBN), as the head's
    image-pooling BN cannot train on one."""
    if batch_size % processes:
        raise UserError(f'batch size {batch_size} does not split evenly over {processes} '
                        f'processes: set data.batch_size to a multiple of {processes}')
    share = batch_size // processes
    if share < 2 and training_device() != 'cuda':
        raise UserError(f'batch size {batch_size} over {processes} processes leaves each 1 image, '
                        f'and on the CPU (no SyncBN) batch norm trains on each process\'s own '
                        f'images, 2 at least: set data.batch_size to {2 * processes} or more')
    return share


def loader_settings(data: ConfigDict, batch_size: int) -> dict:
    """A step's DataLoader settings (``cssbench bench`` measures the same loader)."""
    return dict(batch_size=batch_size, num_workers=data.num_workers,
                persistent_workers=data.num_workers > 0, pin_memory=training_device() == 'cuda')


def sgd_config(schedule: ConfigDict, lr: float) -> dict:
    # fused: the whole update (weight decay, momentum, Nesterov, step) in one pass over each
    # tensor, where the default takes five; the same numbers (bit for bit on CPU).
    return dict(type='SGD', lr=lr, momentum=schedule.momentum, nesterov=schedule.nesterov,
                weight_decay=schedule.weight_decay, fused=True)


def distribute(model):
    """The model as each process trains it: with several processes, DDP, with SyncBN on CUDA
    (gloo has none: on CPU each process normalises with its own batch statistics)."""
    if world_size() == 1:
        return model
    on_cuda = training_device() == 'cuda'
    if on_cuda:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Buffers are not broadcast: SyncBN keeps BN's statistics equal, and methods sum their
    # data-derived state over the processes themselves (SDR's prototypes, PLOP's thresholds).
    # (Newer torch deprecates the flag for one that older ones lack.)
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated',
                                category=FutureWarning)
        return MMDistributedDataParallel(module=model, broadcast_buffers=False,
                                         device_ids=[torch.cuda.current_device()] if on_cuda else None)


class StepRunner(Runner):
    """mmengine's Runner, without the copy of its config it writes into the work dir (a step
    is given no config file: an empty one was written; run.json holds the resolved one) and
    without the line it prints on resuming from a checkpoint."""

    def dump_config(self) -> None:
        pass

    def build_logger(self, log_level='INFO', log_file=None, **kwargs) -> MMLogger:
        # ``log_level`` (WARNING) is the console's, whose lines are StepProgressHook's; the log
        # file in the step's work dir keeps mmengine's INFO lines (each logging interval's
        # losses, lr, times, eta), which that level set on every handler left out of it
        logger = super().build_logger(log_level='INFO', log_file=log_file, **kwargs)
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(max(handler.level, logging._checkLevel(log_level)))
        return logger

    def resume(self, *args, **kwargs) -> None:
        # mmengine print()s 'Loads checkpoint by local backend from path: ...' past the
        # logger's level (the runner names the epoch the step continues after instead), and
        # so a checkpoint that does not match the model: that one must still show.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            super().resume(*args, **kwargs)
        sys.stdout.writelines(line for line in printed.getvalue().splitlines(keepends=True)
                              if not line.startswith('Loads checkpoint by '))


def make_mmengine_runner(cfg: Config, model, train_set, val_set, work_dir: Path, step_seed: int,
                         metric_cfg: dict, progress_prefix: str, lr: float, whole_images: bool,
                         deterministic: bool, resume: bool) -> StepRunner:
    sched, data = cfg.schedule, cfg.data
    speed, processes = effective_speed(cfg), world_size()
    epochs = sched.epochs
    batch = per_process_batch(data.batch_size, processes)
    # whole batches of each process's shard (drop_last; shards are padded to equal sizes)
    iters_per_epoch = math.ceil(len(train_set) / processes) // batch   # >= 1: the runner checks
    # The losses reach the message hub averaged over this many iterations (one host sync
    # each); the logger and the console line print at multiples of it.
    log_interval = max(1, iters_per_epoch // 4)
    loader = dict(loader_settings(data, batch), collate_fn=dict(type='default_collate'))
    # Whole images differ in size: one a batch, as in the reference.
    eval_batch = 1 if whole_images else max(1, data.eval_batch_size // processes)
    return StepRunner(
        model=distribute(model),
        work_dir=str(work_dir),
        experiment_name=work_dir.name,
        train_dataloader=dict(loader, dataset=train_set, drop_last=True,
                              sampler=dict(type='cssbench.EpochKeyedSampler', shuffle=True)),
        # Not padded to a multiple of the processes: each val image is scored exactly once.
        val_dataloader=dict(loader, dataset=val_set, batch_size=eval_batch,
                            sampler=dict(type='DefaultSampler', shuffle=False, round_up=False)),
        val_evaluator=metric_cfg,
        # Evaluated once, after the last epoch, by the caller (never used to select a checkpoint).
        train_cfg=dict(by_epoch=True, max_epochs=epochs, val_begin=epochs + 1),
        val_cfg=val_loop_config(speed, varying_sizes=whole_images),
        optim_wrapper=optim_wrapper_config(speed, sgd_config(sched, lr)),
        # The reference's poly decay (MiB utils/scheduler.py), per iteration k of N:
        # lr (1 - k/N)^power. mmengine's PolyLR reaches 0 at end - 1, hence N + 1.
        param_scheduler=[dict(type='PolyLR', power=sched.poly_power, eta_min=0.0, by_epoch=False,
                              begin=0, end=epochs * iters_per_epoch + 1)],
        default_hooks=dict(
            runtime_info=dict(type='cssbench.AveragedRuntimeInfoHook', interval=log_interval),
            # Two kept: mmengine deletes the older one before it writes the newer.
            checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2),
            logger=dict(type='LoggerHook', interval=log_interval),
            progress=dict(type='cssbench.StepProgressHook', prefix=progress_prefix,
                          interval=log_interval),
            timer=dict(type='IterTimerHook'),
            param_scheduler=dict(type='ParamSchedulerHook'),
            sampler_seed=dict(type='DistSamplerSeedHook'),
        ),
        # The losses arrive averaged already: the log shows them as they are (no 'loss' in
        # the smoothing pattern); the timings are smoothed over the logging interval.
        log_processor=dict(window_size=log_interval, mean_pattern=r'.*(time|data_time|grad_norm).*'),
        custom_hooks=[dict(type='cssbench.EpochSeedHook', seed=step_seed),
                      dict(type='cssbench.StepClockHook', amp=autocast_name(speed.amp)),
                      dict(type='cssbench.InterruptHook')],
        env_cfg=dict(cudnn_benchmark=speed.cudnn_benchmark),
        launcher='pytorch' if processes > 1 else 'none',
        randomness=dict(seed=step_seed, deterministic=deterministic),
        resume=resume,
        default_scope='cssbench',
        log_level='WARNING',  # the console gets StepProgressHook's lines, not mmengine's dumps
        cfg=dict(),
    )


@contextlib.contextmanager
def trusting_own_epoch_checkpoints():
    """Let mmengine's resume unpickle the epoch checkpoint this run wrote in its work dir.

    mmengine calls torch.load without ``weights_only``, which defaults to True since torch
    2.6 and refuses the message hub's pickled history buffers. Only that resume loads
    anything inside ``runner.train()``.
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


@contextlib.contextmanager
def step_runner(cfg: Config, model, protocol: Protocol, t: int, split: dict, work_dir: Path,
                step_seed: int, deterministic: bool, tag: str, resume: bool) -> Iterator[Runner]:
    """The mmengine Runner of step ``t`` (its datasets, metric, schedule and hooks), for the
    block; its globals and loader workers are released after it, also after an error."""
    crop, classes = cfg.data.crop_size, DATASET_INFO[protocol.dataset].classes
    train_set = IncrementalSegDataset(split['train_samples'], train_lut(protocol, t),
                                      TrainTransform(crop), classes, seed=step_seed)
    whole_images = protocol.eval_crop == 'whole'
    val_set = IncrementalSegDataset(split['val_samples'], eval_lut(protocol, t),
                                    EvalTransform(None if whole_images else crop), classes)
    # collect_device 'gpu': under DDP the processes' results are gathered with
    # all_gather_object (gloo included), not through a temporary folder in the cwd.
    metric_cfg = dict(type='cssbench.IncrementalIoUMetric', class_ids=list(protocol.classes_seen(t)),
                      prefix='val', collect_device='gpu')
    runner = make_mmengine_runner(cfg, model, train_set, val_set, work_dir, step_seed,
                                  metric_cfg, progress_prefix=f'{tag} step {t}',
                                  lr=cfg.schedule.lr[min(t, 1)], whole_images=whole_images,
                                  deterministic=deterministic, resume=resume)
    runner.logger.addFilter(_DropDeprecationNotes())
    try:
        yield runner
    finally:
        _release_mmengine_globals(runner)


def score_step(runner: Runner, protocol: Protocol, t: int) -> dict[int, float]:
    """The IoU per class seen at step ``t`` of the runner's model (NaN: not in the GT)."""
    metrics = runner.val_loop.run()
    return {c: metrics[f'val/IoU.{c}'] for c in protocol.classes_seen(t)}


def shut_down_loader_workers(iterator) -> None:
    """Join a DataLoader iterator's worker processes now (through torch's private API):
    persistent workers would otherwise be joined whenever the garbage collector gets to the
    loader, stalling whatever runs then (seconds per worker)."""
    if hasattr(iterator, '_shutdown_workers'):
        iterator._shutdown_workers()


def _release_mmengine_globals(runner: Runner) -> None:
    """Each Runner registers a logger (with an open log file), a visualizer and a default
    scope under its experiment name, and its loaders keep worker processes; release them all,
    so that steps leak no files or processes and names never clash."""
    for loop in (runner._train_loop, runner._val_loop):   # those built: a loop, not its config
        shut_down_loader_workers(getattr(getattr(loop, 'dataloader', None), '_iterator', None))
    logger = runner.logger
    for handler in list(logger.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            logger.removeHandler(handler)
    MMLogger._instance_dict.pop(logger.instance_name, None)
    runner.visualizer.close()
    type(runner.visualizer)._instance_dict.pop(runner.visualizer.instance_name, None)
    DefaultScope._instance_dict.pop(runner.experiment_name, None)
