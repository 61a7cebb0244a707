"""A Ctrl-C stops `cssbench run`, even where Python swallowed its KeyboardInterrupt."""
from __future__ import annotations

import json
import os
import signal

import pytest

from cssbench import interrupts
from cssbench.cli import main
from cssbench.hooks import StepProgressHook
from cssbench.interrupts import noting_interrupts, raise_if_interrupted


class SwallowedInterrupt:
    """Sends this process a SIGINT as it is collected: the handler's KeyboardInterrupt comes
    inside ``__del__``, where Python prints 'Exception ignored in ...' and goes on."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)   # its handler runs before kill returns


@pytest.fixture
def default_sigint_handler():
    """Python's own SIGINT handler, as a command starts with, whatever the test runner set."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_swallowed_interrupt_is_raised_again_at_the_next_check(default_sigint_handler):
    with noting_interrupts():
        SwallowedInterrupt()
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
        SwallowedInterrupt()   # after the last check: the block's work is done, and it ends
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    raise_if_interrupted()   # forgotten with the block


def test_an_interrupt_raises_at_once_and_the_previous_handler_comes_back(default_sigint_handler):
    with pytest.raises(KeyboardInterrupt), noting_interrupts():
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with noting_interrupts():
        raise_if_interrupted()   # nothing came
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_or_otherwise_handled_sigint_stays_so():
    def own(signum, frame):
        pass
    for handler in (signal.SIG_IGN, own):
        previous = signal.signal(signal.SIGINT, handler)
        try:
            with noting_interrupts():
                assert signal.getsignal(signal.SIGINT) is handler
        finally:
            signal.signal(signal.SIGINT, previous)


def test_in_a_forked_loader_worker_the_handler_notes_nothing():
    # the handler a worker inherits: it raises as Python's default handler does (torch's
    # worker loop ends quietly on it), and the main process's checks do not fire
    in_a_worker = interrupts._noting_in(os.getpid() + 1)
    with pytest.raises(KeyboardInterrupt):
        in_a_worker(signal.SIGINT, None)
    raise_if_interrupted()


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_run_whose_interrupt_was_swallowed_stops_at_the_next_iteration_recorded_stopped(
        synth32, config32, tmp_path, monkeypatch, default_sigint_handler):
    iterations, went_on = [], []
    progress = StepProgressHook.after_train_iter

    def swallowing_an_interrupt_at_the_first(self, runner, batch_idx, *args, **kwargs):
        progress(self, runner, batch_idx, *args, **kwargs)
        iterations.append(runner.iter)
        if runner.iter == 0:
            SwallowedInterrupt()
            went_on.append(runner.iter)
    run = ['run', '--protocol', 'synth-15-5-overlap', '--config', str(config32),
           '--data-root', str(synth32), '--epochs', '1', '--results', str(tmp_path / 'results')]
    run_file = tmp_path / 'results' / 'synth-15-5-overlap' / 'ft' / 'small32-seed0' / 'run.json'
    with monkeypatch.context() as patched:
        patched.setattr(StepProgressHook, 'after_train_iter', swallowing_an_interrupt_at_the_first)
        assert main(run) == 130
    assert (iterations, went_on) == ([0], [0])   # swallowed; the next iteration never began
    record = json.loads(run_file.read_text())
    assert (record['status'], record['stopped_by']) == ('stopped', 'KeyboardInterrupt')
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    assert main(run) == 0   # undisturbed: continued to its end
    assert json.loads(run_file.read_text())['status'] == 'complete'
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_an_interrupt_swallowed_after_the_last_iteration_leaves_the_run_complete(
        synth32, config32, tmp_path, monkeypatch, default_sigint_handler):
    from cssbench import runner
    write_tables = runner.write_run_tables

    def swallowing_an_interrupt(*args, **kwargs):
        SwallowedInterrupt()
        return write_tables(*args, **kwargs)
    monkeypatch.setattr(runner, 'write_run_tables', swallowing_an_interrupt)
    run = ['run', '--protocol', 'synth-15-5-overlap', '--config', str(config32),
           '--data-root', str(synth32), '--epochs', '1', '--results', str(tmp_path / 'results')]
    # trained and stored: not said to be interrupted (a rerun would find it complete)
    assert main(run) == 0
    run_file = tmp_path / 'results' / 'synth-15-5-overlap' / 'ft' / 'small32-seed0' / 'run.json'
    assert json.loads(run_file.read_text())['status'] == 'complete'


def test_the_command_ignores_a_second_interrupt_once_one_stopped_it(default_sigint_handler,
                                                                     monkeypatch):
    from cssbench import cli
    monkeypatch.setattr(cli, 'main', lambda: 0)
    assert cli.command_main() == 0 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.setattr(cli, 'main', lambda: 130)
    assert cli.command_main() == 130 and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
