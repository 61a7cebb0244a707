"""Runner pieces: loss logging without host syncs, a compact console progress line,
per-epoch seeding for exact resumes, and a step's training time kept across sessions."""
from __future__ import annotations

import datetime
import math
import time
from pathlib import Path

import torch
from mmengine.dataset import DefaultSampler
from mmengine.hooks import Hook, RuntimeInfoHook

from .distributed import is_main_process, rank, world_size
from .errors import UserError
from .io import atomic_write_json, read_json_or_none
from .registry import DATA_SAMPLERS, HOOKS
from .seeds import derive_seed


@HOOKS.register_module()
class AveragedRuntimeInfoHook(RuntimeInfoHook):
    """mmengine's RuntimeInfoHook, but the losses reach the message hub as their mean over
    the last ``interval`` iterations (and over the tail of each epoch), not one by one.

    mmengine's hook turns every loss into a Python float each iteration, which waits for
    the GPU to finish the step. Here the losses are summed on the device and read back once
    per interval, when the LoggerHook and the StepProgressHook (set to multiples of the
    interval) read them.
    """

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}        # of each loss's finite values
        self._non_finite: dict[str, torch.Tensor] = {}  # each loss's count of the others
        self._count = 0

    def before_train_epoch(self, runner) -> None:
        super().before_train_epoch(runner)
        self._reset()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        for key, value in (outputs or {}).items():
            value = value.detach().double()
            finite = torch.isfinite(value)
            value, non_finite = torch.where(finite, value, 0.0), (~finite).double()
            if key in self._sums:
                value, non_finite = self._sums[key] + value, self._non_finite[key] + non_finite
            self._sums[key], self._non_finite[key] = value, non_finite
        self._count += 1
        if (self.every_n_inner_iters(batch_idx, self.interval)
                or self.end_of_epoch(runner.train_dataloader, batch_idx)):
            self._publish(runner, batch_idx)

    def _publish(self, runner, batch_idx: int) -> None:
        if not self._sums:
            return
        keys = list(self._sums)
        sums, non_finite = torch.stack([torch.stack([self._sums[k] for k in keys]),
                                        torch.stack([self._non_finite[k] for k in keys])]).tolist()  # one sync
        non_finite = dict(zip(keys, map(int, non_finite)))
        scaled = getattr(getattr(runner, 'optim_wrapper', None), 'loss_scaler', None) is not None
        refuse_non_finite_losses(f'{runner.work_dir}: epoch {runner.epoch + 1} iters '
                                 f'{batch_idx + 2 - self._count}-{batch_idx + 1}', non_finite,
                                 self._count, loss_scaled=scaled)
        for key, total in zip(keys, sums):
            finite = self._count - non_finite[key]
            runner.message_hub.update_scalar(f'train/{key}', total / finite if finite else math.nan)
        self._reset()


def refuse_non_finite_losses(where: str, non_finite: dict[str, int], iterations: int, *,
                             loss_scaled: bool = False) -> None:
    """Stop a step whose losses went NaN or infinite (``non_finite``: in how many of the
    ``iterations`` that ``where`` names, by loss): its weights are NaN from then on, and a NaN
    model, which predicts class 0 everywhere, would be evaluated and tabled as a run like any
    other. Under float16's loss scaling (``loss_scaled``) an iteration whose loss overflowed
    is one the scaler skips, its weights untouched; there only an interval none of whose
    losses was finite stops the step (a method that returns NaN). Stopped here, before the
    epoch's checkpoint, the step continues from its last finite one when rerun."""
    if non_finite.get('loss', 0) <= (iterations - 1 if loss_scaled else 0):
        return
    bad = {key: n for key, n in non_finite.items() if n}
    terms = {key: n for key, n in bad.items() if key != 'loss'} or bad   # 'loss' is their sum
    said = ', '.join(f'{key} in {n} of {iterations} iterations' for key, n in terms.items())
    raise UserError(f'{where}: the loss is not finite ({said}): training stopped; a rerun '
                    f'continues the step from its last epoch checkpoint, if any')


@HOOKS.register_module()
class StepProgressHook(Hook):
    """Prints every ``interval`` iterations and at the end of each epoch.

    Reads the loss from the message hub (the mean since the last print, see
    ``AveragedRuntimeInfoHook``), so it adds no device sync. Rank 0 prints for every process.
    """

    priority = 'BELOW_NORMAL'

    def __init__(self, prefix: str, interval: int = 50) -> None:
        self.prefix = prefix
        self.interval = interval

    def before_train(self, runner) -> None:
        self._start_time = time.time()
        self._start_iter = runner.iter

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        at_print = (self.every_n_inner_iters(batch_idx, self.interval)
                    or self.end_of_epoch(runner.train_dataloader, batch_idx))
        if not at_print or not is_main_process():
            return
        done = runner.iter + 1 - self._start_iter
        remaining = runner.max_iters - runner.iter - 1
        eta = (time.time() - self._start_time) / done * remaining
        loss = runner.message_hub.get_scalar('train/loss').current()
        lr = runner.optim_wrapper.get_lr()['lr'][0]
        print(f'{self.prefix} epoch {runner.epoch + 1}/{runner.max_epochs} '
              f'iter {batch_idx + 1}/{len(runner.train_dataloader)}  loss {loss:.4f}  lr {lr:.2e}  '
              f'eta {datetime.timedelta(seconds=round(eta))}', flush=True)


@HOOKS.register_module()
class EpochSeedHook(Hook):
    """Re-seeds torch's global generator from (seed, epoch) at each training epoch's start.

    Dropout and other in-model randomness then depend on the epoch alone, so a run resumed
    from an epoch checkpoint continues exactly as the uninterrupted run would have. Under
    several processes each seeds from (seed, epoch, rank): their dropout masks differ.
    """

    priority = 'VERY_HIGH'

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        # At an epoch's first iteration, not before the epoch: the loader's iterator is made in
        # between, and making it draws from this generator only the first time in a process
        # (persistent workers), i.e. in the first epoch after a resume but not in the same
        # epoch of an uninterrupted run.
        if batch_idx == 0:
            keys = [self.seed, runner.epoch] + ([rank()] if world_size() > 1 else [])
            torch.manual_seed(derive_seed(*keys))


CLOCK_FILE = 'clock.json'


def earlier_training_seconds(work_dir: str | Path) -> float:
    """How long a step trained in its earlier sessions, as ``StepClockHook`` left it in the
    step's work dir at their last epoch's end; 0 if it never trained."""
    seconds = read_json_or_none(Path(work_dir) / CLOCK_FILE,
                                lambda clock: float(clock['train_seconds']))
    return 0.0 if seconds is None else seconds


def processes_training(work_dir: str | Path) -> int | None:
    """How many processes (torchrun) train the step, and so wrote its epoch checkpoints, as
    ``StepClockHook`` left it in the step's work dir; None if unknown (never trained, or the
    clock of a version that did not say)."""
    return read_json_or_none(Path(work_dir) / CLOCK_FILE, lambda clock: int(clock['processes']))


@HOOKS.register_module()
class StepClockHook(Hook):
    """Keeps a step's training time over every session in its work dir, and the number of
    processes training it: written as training starts, and at each epoch's end (after the
    epoch's checkpoint). A resumed step's wall time then counts the sessions before the one
    that finishes it. A step resumed after its last epoch trains nothing: its clock stays
    as it was, naming the processes that trained it."""

    priority = 'LOWEST'   # after CheckpointHook's VERY_LOW

    def before_train(self, runner) -> None:
        self._earlier = earlier_training_seconds(runner.work_dir)
        self._start = time.time()
        if runner.epoch < runner.max_epochs:
            self._write(runner, self._earlier)   # the checkpoints from now on are these processes'

    def after_train_epoch(self, runner) -> None:
        self._write(runner, round(self._earlier + time.time() - self._start, 1))

    @staticmethod
    def _write(runner, seconds: float) -> None:
        if is_main_process():
            atomic_write_json(Path(runner.work_dir) / CLOCK_FILE,
                              dict(train_seconds=seconds, processes=world_size()))


@DATA_SAMPLERS.register_module()
class EpochKeyedSampler(DefaultSampler):
    """mmengine's DefaultSampler (shuffled by seed + epoch, sharded per rank) whose items are
    ``(epoch, index)``, so the dataset can seed each sample's augmentation from them."""

    def __iter__(self):
        return ((self.epoch, index) for index in super().__iter__())
