"""A compact progress line for the console: step, epoch, iteration, loss, lr and ETA."""
from __future__ import annotations

import datetime
import time

from mmengine.hooks import Hook

from .registry import HOOKS


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
