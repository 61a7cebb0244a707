"""Runner pieces: loss logging without host syncs, a compact console progress line,
per-epoch seeding for exact resumes, a step's training time kept across sessions, and a
Ctrl-C that stops training whatever swallowed it."""
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
from .interrupts import raise_if_interrupted
from .io import atomic_write_json, read_json_or_none
from .registry import DATA_SAMPLERS, HOOKS
from .seeds import derive_seed
from .speed import NO_AUTOCAST


# Under float16's loss scaling an iteration whose loss overflowed is one the scaler skips;
# this many in a row is a method whose loss is NaN, not an overflow now and then.
NON_FINITE_IN_A_ROW_LIMIT = 16


@HOOKS.register_module()
class AveragedRuntimeInfoHook(RuntimeInfoHook):
    """mmengine's RuntimeInfoHook, but the losses reach the message hub as their mean over
    the last ``interval`` iterations (and over the tail of each epoch), not one by one.

    mmengine's hook turns every loss into a Python float each iteration, which waits for
    the GPU to finish the step. Here the losses are summed on the device and read back once
    per interval, when the LoggerHook and the StepProgressHook (set to multiples of the
    interval) read them. With them come what stops a step gone NaN (``refuse_non_finite``):
    whether the model's weights and statistics are finite, and the longest run of iterations
    in a row whose loss was not.
    """

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self._in_a_row = self._most_in_a_row = None   # non-finite losses, on the device
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
            if key == 'loss':   # the sum of the terms
                self._count_in_a_row(non_finite)
            if key in self._sums:
                value, non_finite = self._sums[key] + value, self._non_finite[key] + non_finite
            self._sums[key], self._non_finite[key] = value, non_finite
        self._count += 1
        if (self.every_n_inner_iters(batch_idx, self.interval)
                or self.end_of_epoch(runner.train_dataloader, batch_idx)):
            self._publish(runner, batch_idx)

    def _count_in_a_row(self, non_finite: torch.Tensor) -> None:
        if self._in_a_row is None:
            self._in_a_row = self._most_in_a_row = torch.zeros((), dtype=torch.double,
                                                               device=non_finite.device)
        self._in_a_row = (self._in_a_row + 1) * non_finite
        self._most_in_a_row = torch.maximum(self._most_in_a_row, self._in_a_row)

    def _publish(self, runner, batch_idx: int) -> None:
        if not self._sums:
            return
        keys = list(self._sums)
        state_norm = torch.nn.utils.get_total_norm(
            [t.detach() for t in (*runner.model.parameters(), *runner.model.buffers())
             if t.is_floating_point()])
        most_in_a_row = (self._most_in_a_row if self._most_in_a_row is not None
                         else torch.zeros_like(state_norm))
        read = torch.cat([torch.stack([self._sums[k] for k in keys]),
                          torch.stack([self._non_finite[k] for k in keys]),
                          torch.stack([most_in_a_row.double(), torch.isfinite(state_norm).double()])])
        values = read.tolist()   # one sync
        sums, non_finite = values[:len(keys)], dict(zip(keys, map(int, values[len(keys):-2])))
        refuse_non_finite(f'{runner.work_dir}: epoch {runner.epoch + 1} iters '
                          f'{batch_idx + 2 - self._count}-{batch_idx + 1}', non_finite,
                          self._count, most_in_a_row=int(values[-2]), state_finite=bool(values[-1]),
                          loss_scaled=getattr(runner.optim_wrapper, 'loss_scaler', None) is not None)
        for key, total in zip(keys, sums):
            finite = self._count - non_finite[key]
            runner.message_hub.update_scalar(f'train/{key}', total / finite if finite else math.nan)
        self._reset()


def refuse_non_finite(where: str, non_finite: dict[str, int], iterations: int, *,
                      most_in_a_row: int, state_finite: bool, loss_scaled: bool) -> None:
    """Stop a step gone NaN: a NaN model, which predicts class 0 everywhere, would be evaluated
    and tabled as a run like any other. ``non_finite``: in how many of the ``iterations`` that
    ``where`` names each loss was NaN or infinite; ``most_in_a_row``: the most iterations in a
    row whose loss was, so far in the step. It stops where the model's weights or batch-norm
    statistics are not finite (``state_finite``, false), or, without loss scaling, any loss
    was not (its update made the weights NaN); under float16's loss scaling an overflowed
    iteration is one the scaler skips, and only ``NON_FINITE_IN_A_ROW_LIMIT`` in a row stop
    it. Checked at each interval's end, the epoch's last included, so before the epoch's
    checkpoint: under torchrun every process sees the same weights and stops there."""
    bad = {key: n for key, n in non_finite.items() if n}
    terms = {key: n for key, n in bad.items() if key != 'loss'} or bad   # 'loss' is their sum
    said = ', '.join(f'{key} in {n} of {iterations} iterations' for key, n in terms.items())
    if not state_finite:
        what = f"the model's weights are not finite{f' (losses not finite: {said})' if said else ''}"
    elif bad and not loss_scaled:
        what = f'the loss is not finite ({said})'
    elif most_in_a_row >= NON_FINITE_IN_A_ROW_LIMIT:
        what = (f'the loss was not finite in {most_in_a_row} iterations in a row (the float16 '
                f'loss scaler skipped each; here {said})')
    else:
        return
    raise UserError(f'{where}: {what}: training stopped. Fix the method (a rerun continues the '
                    f'step from its last epoch checkpoint), or change the config (a lower lr or '
                    f'loss weight) and rerun with --overwrite or another --run-name')


@HOOKS.register_module()
class StepProgressHook(Hook):
    """Prints at the end of a session's first logging ``interval`` (a quarter epoch, as the
    runner sets it: a step says soon how long it will take), then every second interval and
    at the end of each epoch.

    Reads the loss from the message hub (its mean over the last logging interval, see
    ``AveragedRuntimeInfoHook``), so it adds no device sync. Rank 0 prints for every process.
    """

    priority = 'BELOW_NORMAL'

    def __init__(self, prefix: str, interval: int = 25) -> None:
        self.prefix = prefix
        self.interval = interval

    def before_train(self, runner) -> None:
        self._start_time = time.time()
        self._start_iter = runner.iter

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        done = runner.iter + 1 - self._start_iter
        first = done <= self.interval and self.every_n_inner_iters(batch_idx, self.interval)
        at_print = (first or self.every_n_inner_iters(batch_idx, 2 * self.interval)
                    or self.end_of_epoch(runner.train_dataloader, batch_idx))
        if not at_print or not is_main_process():
            return
        remaining = runner.max_iters - runner.iter - 1
        eta = (time.time() - self._start_time) / done * remaining
        loss = runner.message_hub.get_scalar('train/loss').current()
        lr = runner.optim_wrapper.get_lr()['lr'][0]
        print(f'{self.prefix} epoch {runner.epoch + 1}/{runner.max_epochs} '
              f'iter {batch_idx + 1}/{len(runner.train_dataloader)}  loss {loss:.4f}  lr {lr:.2e}  '
              f'eta {datetime.timedelta(seconds=round(eta))}', flush=True)


@HOOKS.register_module()
class EpochSeedHook(Hook):
    """Re-seeds torch's global generator from (seed, epoch) at each training epoch's first
    iteration.

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


@HOOKS.register_module()
class InterruptHook(Hook):
    """Stops training or evaluation at the next iteration after a Ctrl-C whose
    KeyboardInterrupt Python swallowed (``interrupts``). In every process: under torchrun
    each got the SIGINT, and one that went on would wait for the others forever."""

    priority = 'VERY_HIGH'

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        raise_if_interrupted()

    def before_val_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        raise_if_interrupted()


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


def autocasts_training(work_dir: str | Path) -> list[str] | None:
    """The autocast dtypes (``float32``: none) of every session that trained the step, as
    ``StepClockHook`` left them in the step's work dir; None if unknown. A session may change
    them (the speed section is not the config's digest), so a step stopped mid-way may have
    trained under two."""
    return read_json_or_none(Path(work_dir) / CLOCK_FILE,
                             lambda clock: [str(amp) for amp in clock['amps']])


@HOOKS.register_module()
class StepClockHook(Hook):
    """Keeps a step's training time over every session in its work dir, and the number of
    processes training it: written as training starts, and at each epoch's end (after the
    epoch's checkpoint). A resumed step's wall time then counts the sessions before the one
    that finishes it. A step resumed after its last epoch trains nothing: its clock stays
    as it was, naming the processes that trained it. It also names the autocast dtype
    ``amp`` (``float32``: none) of every session that trained the step's epochs
    (``autocasts_training``): those a resumed step's checkpoints carry, and this session's."""

    priority = 'LOWEST'   # after CheckpointHook's VERY_LOW

    def __init__(self, amp: str = NO_AUTOCAST) -> None:
        self.amp = amp

    def before_train(self, runner) -> None:
        self._earlier = earlier_training_seconds(runner.work_dir)
        self._start = time.time()
        self._amps = [self.amp]
        if runner.epoch > 0:   # continued from an earlier session's epochs: theirs too
            self._amps = sorted({*(autocasts_training(runner.work_dir) or ['unknown']), self.amp})
        if runner.epoch < runner.max_epochs:
            self._write(runner, self._earlier)   # the checkpoints from now on are these processes'

    def after_train_epoch(self, runner) -> None:
        self._write(runner, round(self._earlier + time.time() - self._start, 1))

    def _write(self, runner, seconds: float) -> None:
        if is_main_process():
            atomic_write_json(Path(runner.work_dir) / CLOCK_FILE,
                              dict(train_seconds=seconds, processes=world_size(), amps=self._amps))


@DATA_SAMPLERS.register_module()
class EpochKeyedSampler(DefaultSampler):
    """mmengine's DefaultSampler (shuffled by seed + epoch, sharded per rank) whose items are
    ``(epoch, index)``, so the dataset can seed each sample's augmentation from them."""

    def __iter__(self):
        return ((self.epoch, index) for index in super().__iter__())
