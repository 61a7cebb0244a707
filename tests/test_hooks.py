"""The training hooks that make a resumed run repeat an uninterrupted one: the per-epoch
reseed of torch's generator, the sampler that hands each item its epoch, and the clock that
keeps a step's training time across sessions."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from mmengine.dataset import DefaultSampler

import cssbench.hooks as hooks
from cssbench.hooks import (EpochKeyedSampler, EpochSeedHook, StepClockHook, earlier_training_seconds,
                            processes_training)


def _draw_after_hook(hook, epoch: int, batch_idx: int) -> torch.Tensor:
    hook.before_train_iter(SimpleNamespace(epoch=epoch), batch_idx)
    return torch.rand(6)


def _draw_seeded(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(6)


def test_epoch_seed_hook_reseeds_from_seed_and_epoch_at_the_first_iteration():
    hook = EpochSeedHook(seed=7)
    for epoch in (0, 1, 4):
        # the generator state is SeedSequence([seed, epoch])'s first word, in one process
        expected = _draw_seeded(int(np.random.SeedSequence([7, epoch]).generate_state(1)[0]))
        torch.manual_seed(12345)  # whatever came before
        torch.testing.assert_close(_draw_after_hook(hook, epoch, 0), expected, rtol=0, atol=0)
    # different epochs: different streams (dropout masks change from epoch to epoch)
    assert not torch.equal(_draw_after_hook(hook, 0, 0), _draw_after_hook(hook, 1, 0))
    # another seed: another stream for the same epoch
    assert not torch.equal(_draw_after_hook(hook, 2, 0), _draw_after_hook(EpochSeedHook(8), 2, 0))


def test_epoch_seed_hook_leaves_the_generator_alone_after_the_first_iteration():
    hook = EpochSeedHook(seed=7)
    for batch_idx in (1, 2, 5):
        torch.manual_seed(99)
        torch.testing.assert_close(_draw_after_hook(hook, 3, batch_idx), _draw_seeded(99),
                                   rtol=0, atol=0)


def test_epoch_keyed_sampler_yields_the_epoch_with_default_samplers_order():
    data = list(range(10))
    for epoch in (0, 3):
        keyed, plain = EpochKeyedSampler(data, shuffle=True, seed=5), DefaultSampler(data, shuffle=True, seed=5)
        keyed.set_epoch(epoch)
        plain.set_epoch(epoch)
        items = list(keyed)
        assert items == [(epoch, i) for i in plain]
        assert sorted(i for _, i in items) == data


def test_step_clock_hook_adds_each_session_to_the_ones_before(tmp_path, monkeypatch):
    runner = SimpleNamespace(work_dir=str(tmp_path), epoch=0, max_epochs=4)
    now = [1000.0]
    monkeypatch.setattr(hooks.time, 'time', lambda: now[0])
    assert earlier_training_seconds(tmp_path) == 0.0   # never trained
    assert processes_training(tmp_path) is None
    first = StepClockHook()
    first.before_train(runner)
    for _ in range(2):   # two epochs of 30 s, then killed 10 s into the third
        now[0] += 30
        first.after_train_epoch(runner)
    now[0] += 10
    assert earlier_training_seconds(tmp_path) == 60.0
    assert processes_training(tmp_path) == 1   # which the epoch checkpoints need to continue
    resumed = StepClockHook()
    runner.epoch = 2
    resumed.before_train(runner)
    now[0] += 45
    resumed.after_train_epoch(runner)
    assert earlier_training_seconds(tmp_path) == 105.0
    # Resumed after its last epoch by two processes, it trains nothing: the checkpoints stay
    # those one process wrote.
    monkeypatch.setattr(hooks, 'world_size', lambda: 2)
    runner.epoch = 4
    StepClockHook().before_train(runner)
    assert (processes_training(tmp_path), earlier_training_seconds(tmp_path)) == (1, 105.0)
    (tmp_path / 'clock.json').write_text('{"train_seconds": ')   # cut short: counts as none
    assert earlier_training_seconds(tmp_path) == 0.0
