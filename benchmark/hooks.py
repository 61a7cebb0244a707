"""Runner pieces: a compact console progress line, and per-epoch seeding for exact resumes."""
from __future__ import annotations

import datetime
import time

import numpy as np
import torch
from mmengine.dataset import DefaultSampler
from mmengine.hooks import Hook

from .registry import DATA_SAMPLERS, HOOKS


@HOOKS.register_module()
class StepProgressHook(Hook):
    """Prints every ``interval`` iterations and at the end of each epoch.

    Reads the loss from the values mmengine already logs, so it adds no device sync.
    """

    priority = 'BELOW_NORMAL'

    def __init__(self, prefix: str, interval: int = 50) -> None:
        self.prefix = prefix
        self.interval = interval

    def before_train(self, runner) -> None:
        self._start_time = time.time()
        self._start_iter = runner.iter

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        iters_per_epoch = len(runner.train_dataloader)
        if (batch_idx + 1) % self.interval and batch_idx + 1 != iters_per_epoch:
            return
        done = runner.iter + 1 - self._start_iter
        remaining = runner.max_iters - runner.iter - 1
        eta = (time.time() - self._start_time) / done * remaining
        loss = runner.message_hub.get_scalar('train/loss').current()
        lr = runner.optim_wrapper.get_lr()['lr'][0]
        print(f'{self.prefix} epoch {runner.epoch + 1}/{runner.max_epochs} '
              f'iter {batch_idx + 1}/{iters_per_epoch}  loss {loss:.4f}  lr {lr:.2e}  '
              f'eta {datetime.timedelta(seconds=round(eta))}', flush=True)


@HOOKS.register_module()
class EpochSeedHook(Hook):
    """Re-seeds torch's global generator from (seed, epoch) before each training epoch.

    Dropout and other in-model randomness then depend on the epoch alone, so a run resumed
    from an epoch checkpoint continues exactly as the uninterrupted run would have.
    """

    priority = 'VERY_HIGH'

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def before_train_epoch(self, runner) -> None:
        state = np.random.SeedSequence([self.seed, runner.epoch]).generate_state(1)[0]
        torch.manual_seed(int(state))


@DATA_SAMPLERS.register_module()
class EpochKeyedSampler(DefaultSampler):
    """mmengine's DefaultSampler (shuffled by seed + epoch, sharded per rank) whose items are
    ``(epoch, index)``, so the dataset can seed each sample's augmentation from them."""

    def __iter__(self):
        return ((self.epoch, index) for index in super().__iter__())
