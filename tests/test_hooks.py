"""The training hooks that make a resumed run repeat an uninterrupted one: the per-epoch
reseed of torch's generator, the sampler that hands each item its epoch, and the clock that
keeps a step's training time across sessions; and the loss logging that stops a step whose
loss is not finite."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmengine.dataset import DefaultSampler
from mmengine.logging import MessageHub

import cssbench.hooks as hooks
from cssbench.errors import UserError
from cssbench.hooks import (AveragedRuntimeInfoHook, EpochKeyedSampler, EpochSeedHook, StepClockHook,
                            earlier_training_seconds, processes_training)


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


def _runner_at(epoch: int, iters_per_epoch: int) -> SimpleNamespace:
    return SimpleNamespace(epoch=epoch, work_dir='work/step1', train_dataloader=range(iters_per_epoch),
                           message_hub=MessageHub.get_instance('test_hooks_losses'))


def test_a_non_finite_loss_stops_the_step_naming_the_term_and_the_iterations():
    hook, runner = AveragedRuntimeInfoHook(interval=2), _runner_at(epoch=1, iters_per_epoch=4)
    finite = dict(loss=torch.tensor(0.5), loss_ce=torch.tensor(0.3), loss_kd=torch.tensor(0.2))
    for batch_idx in range(2):   # a finite interval is published as before
        hook.after_train_iter(runner, batch_idx, outputs=finite)
    assert runner.message_hub.get_scalar('train/loss_kd').current() == pytest.approx(0.2)
    hook.after_train_iter(runner, 2, outputs=finite)
    with pytest.raises(UserError) as e:   # one NaN iteration: its weights are NaN from then on
        hook.after_train_iter(runner, 3, outputs=dict(finite, loss=torch.tensor(math.nan),
                                                     loss_kd=torch.tensor(math.nan)))
    assert str(e.value) == ('work/step1: epoch 2 iters 3-4: the loss is not finite (loss_kd in 1 '
                            'of 2 iterations): training stopped; a rerun continues the step from '
                            'its last epoch checkpoint, if any')


def test_under_loss_scaling_an_overflowed_iteration_is_skipped_and_one_never_finite_stops():
    hook, runner = AveragedRuntimeInfoHook(interval=3), _runner_at(epoch=0, iters_per_epoch=6)
    runner.optim_wrapper = SimpleNamespace(loss_scaler=object())   # float16's GradScaler
    finite = dict(loss=torch.tensor(0.5), loss_ce=torch.tensor(0.4))
    overflowed = dict(loss=torch.tensor(math.inf), loss_ce=torch.tensor(math.inf))
    for batch_idx, outputs in enumerate([finite, overflowed, dict(loss=torch.tensor(0.8),
                                                                  loss_ce=torch.tensor(0.6))]):
        hook.after_train_iter(runner, batch_idx, outputs=outputs)
    # the scaler skipped the overflowed iteration: the means are over the two others
    assert runner.message_hub.get_scalar('train/loss').current() == pytest.approx(0.65)
    assert runner.message_hub.get_scalar('train/loss_ce').current() == pytest.approx(0.5)
    hook.after_train_iter(runner, 3, outputs=overflowed)
    hook.after_train_iter(runner, 4, outputs=overflowed)
    with pytest.raises(UserError, match=r'iters 4-6: the loss is not finite \(loss_ce in 3 of 3 '):
        hook.after_train_iter(runner, 5, outputs=dict(overflowed, loss_ce=torch.tensor(math.nan)))
