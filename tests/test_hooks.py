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
from cssbench.hooks import (NON_FINITE_IN_A_ROW_LIMIT, AveragedRuntimeInfoHook, EpochKeyedSampler,
                            EpochSeedHook, StepClockHook, StepProgressHook, autocasts_training,
                            earlier_training_seconds, processes_training)
from conftest import hook_runner


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


def test_step_clock_hook_names_the_autocast_of_every_session_that_trained_the_step(tmp_path):
    """A step continued under another autocast dtype (the speed section is not the config's
    digest) trained under both: the step-0 cache must not file it under either's key."""
    runner = SimpleNamespace(work_dir=str(tmp_path), epoch=0, max_epochs=4)
    assert autocasts_training(tmp_path) is None   # never trained
    first = StepClockHook(amp='bfloat16')
    first.before_train(runner)
    first.after_train_epoch(runner)
    assert autocasts_training(tmp_path) == ['bfloat16']
    runner.epoch = 1   # continued after epoch 1, in fp32 (another machine, or --fp32)
    StepClockHook(amp='float32').before_train(runner)
    assert autocasts_training(tmp_path) == ['bfloat16', 'float32']
    runner.epoch = 4   # continued after its last epoch: trains nothing, the clock stays
    StepClockHook(amp='float16').before_train(runner)
    assert autocasts_training(tmp_path) == ['bfloat16', 'float32']
    runner.epoch = 0   # started anew (no epoch checkpoint): an earlier clock's dtypes are no more
    StepClockHook(amp='float16').before_train(runner)
    assert autocasts_training(tmp_path) == ['float16']
    # a clock of a version that did not name them: unknown, and so is a step continued from it
    (tmp_path / 'clock.json').write_text('{"train_seconds": 1.0, "processes": 1}')
    assert autocasts_training(tmp_path) is None
    runner.epoch = 2
    StepClockHook(amp='float32').before_train(runner)
    assert autocasts_training(tmp_path) == ['float32', 'unknown']


AFTER = ('training stopped. Fix the method (a rerun continues the step from its last epoch '
         'checkpoint), or change the config (a lower lr or loss weight) and rerun with '
         '--overwrite or another --run-name')


def test_a_non_finite_loss_stops_the_step_naming_the_term_and_the_iterations():
    hook, runner = AveragedRuntimeInfoHook(interval=2), hook_runner(4, epoch=1)
    finite = dict(loss=torch.tensor(0.5), loss_ce=torch.tensor(0.3), loss_kd=torch.tensor(0.2))
    for batch_idx in range(2):   # a finite interval is published as before
        hook.after_train_iter(runner, batch_idx, outputs=finite)
    assert runner.message_hub.get_scalar('train/loss_kd').current() == pytest.approx(0.2)
    hook.after_train_iter(runner, 2, outputs=finite)
    with pytest.raises(UserError) as e:   # one NaN iteration: its update makes the weights NaN
        hook.after_train_iter(runner, 3, outputs=dict(finite, loss=torch.tensor(math.nan),
                                                     loss_kd=torch.tensor(math.nan)))
    assert str(e.value) == ('work/step1: epoch 2 iters 3-4: the loss is not finite (loss_kd in 1 '
                            f'of 2 iterations): {AFTER}')


def test_non_finite_weights_or_statistics_stop_the_step_whatever_the_loss():
    hook = AveragedRuntimeInfoHook(interval=2)
    runner = hook_runner(4, loss_scaled=True)
    runner.model.running_var[1] = math.inf   # e.g. a float16 overflow before a batch norm
    hook.after_train_iter(runner, 0, outputs=dict(loss=torch.tensor(0.5)))
    with pytest.raises(UserError) as e:
        hook.after_train_iter(runner, 1, outputs=dict(loss=torch.tensor(0.4)))
    assert str(e.value) == f"work/step1: epoch 1 iters 1-2: the model's weights are not finite: {AFTER}"


def test_under_loss_scaling_overflowed_iterations_are_skipped_until_too_many_in_a_row():
    hook = AveragedRuntimeInfoHook(interval=3)
    runner = hook_runner(40, loss_scaled=True)
    finite = dict(loss=torch.tensor(0.5), loss_ce=torch.tensor(0.4))
    overflowed = dict(loss=torch.tensor(math.inf), loss_ce=torch.tensor(math.inf))
    for batch_idx, outputs in enumerate([finite, overflowed, dict(loss=torch.tensor(0.8),
                                                                  loss_ce=torch.tensor(0.6))]):
        hook.after_train_iter(runner, batch_idx, outputs=outputs)
    # the scaler skipped the overflowed iteration: the means are over the two others
    assert runner.message_hub.get_scalar('train/loss').current() == pytest.approx(0.65)
    assert runner.message_hub.get_scalar('train/loss_ce').current() == pytest.approx(0.5)
    # a whole interval overflowed, over an interval's end: 15 in a row go on
    for batch_idx in range(3, 3 + NON_FINITE_IN_A_ROW_LIMIT - 1):
        hook.after_train_iter(runner, batch_idx, outputs=overflowed)
    assert math.isnan(runner.message_hub.get_scalar('train/loss').current())  # no finite one
    hook.after_train_iter(runner, 18, outputs=finite)   # a finite one ends the run of them
    for batch_idx in range(19, 19 + NON_FINITE_IN_A_ROW_LIMIT - 1):
        hook.after_train_iter(runner, batch_idx, outputs=overflowed)
    hook.after_train_iter(runner, 34, outputs=dict(overflowed, loss_ce=torch.tensor(math.nan)))
    with pytest.raises(UserError) as e:   # the 16th in a row, read at its interval's end
        hook.after_train_iter(runner, 35, outputs=finite)
    assert str(e.value) == ('work/step1: epoch 1 iters 34-36: the loss was not finite in 16 '
                            'iterations in a row (the float16 loss scaler skipped each; here '
                            f'loss_ce in 2 of 3 iterations): {AFTER}')


def _progress_lines(hook: StepProgressHook, runner: SimpleNamespace, epochs: range,
                    capsys) -> list[str]:
    """The lines ``hook`` prints over ``epochs`` of ``runner``'s training, each as
    'epoch E/N iter I/M'."""
    hook.before_train(runner)
    for epoch in epochs:
        runner.epoch = epoch
        for batch_idx in range(len(runner.train_dataloader)):
            hook.after_train_iter(runner, batch_idx)
            runner.iter += 1
    return [' '.join(line.split()[3:7]) for line in capsys.readouterr().out.splitlines()]


def test_the_progress_line_comes_after_the_first_logging_interval_then_every_second(capsys):
    """A step's first line came only after half an epoch (over a minute into step 0 on a busy
    2-core machine); it now comes after a quarter, and after a resume too."""
    hub = MessageHub.get_instance('test_progress')
    hub.update_scalar('train/loss', 0.5)
    runner = SimpleNamespace(iter=0, max_iters=24, epoch=0, max_epochs=3, train_dataloader=range(8),
                             message_hub=hub,
                             optim_wrapper=SimpleNamespace(get_lr=lambda: {'lr': [0.01]}))
    hook = StepProgressHook('synth step 0', interval=2)
    assert _progress_lines(hook, runner, range(2), capsys) == [
        'epoch 1/3 iter 2/8', 'epoch 1/3 iter 4/8', 'epoch 1/3 iter 8/8',
        'epoch 2/3 iter 4/8', 'epoch 2/3 iter 8/8']
    # resumed from the second epoch's checkpoint: a new session, a first line of its own
    runner.iter = 8
    assert _progress_lines(hook, runner, range(1, 3), capsys) == [
        'epoch 2/3 iter 2/8', 'epoch 2/3 iter 4/8', 'epoch 2/3 iter 8/8',
        'epoch 3/3 iter 4/8', 'epoch 3/3 iter 8/8']
