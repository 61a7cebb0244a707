"""No training iteration makes the host wait for the device.

On a GPU, an operator that reads device values back to the host (``.item()``, ``bool(t)``,
``.tolist()``, ``nonzero``, ``unique``, boolean-mask indexing, ...) stalls the step loop
until the GPU catches up. These tests run iterations on the CPU under a dispatch mode that
records every such operator, so a stall is caught here, without a GPU.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cssbench.bench import Case, build_step
from cssbench.config import load_config
from cssbench.hooks import AveragedRuntimeInfoHook
from cssbench.methods import method_names
from cssbench.speed import SPEED_DEFAULTS
from conftest import hook_runner, random_batch

aten = torch.ops.aten

# Operators whose result depends on device values that the host must read (sizes or Python
# scalars).
HOST_READING_OPS = {aten._local_scalar_dense, aten.nonzero, aten._unique, aten._unique2,
                    aten.unique_dim, aten.unique_consecutive, aten.masked_select, aten.bincount,
                    aten.repeat_interleave, aten.equal}
# Indexing with a boolean mask: its result's size is the mask's count.
MASK_INDEXING_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class HostReads(TorchDispatchMode):
    """Records the operators, and the ``tolist``/``numpy`` calls, that would wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in HOST_READING_OPS or (packet in MASK_INDEXING_OPS and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        # Tensor.tolist and Tensor.numpy read memory directly, below the dispatcher.
        self._methods = {name: getattr(torch.Tensor, name) for name in ('tolist', 'numpy')}
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, self._recording(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._methods.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _recording(self, name, method):
        def wrapper(tensor, *args, **kwargs):
            self.found.append(f'Tensor.{name}')
            return method(tensor, *args, **kwargs)
        return wrapper


def test_the_detector_sees_each_kind_of_host_read():
    x = torch.arange(6.0)
    reads = [lambda: x.sum().item(), lambda: bool(x.any()), lambda: x.tolist(),
             lambda: torch.unique(x), lambda: x[x > 2], lambda: x.clone().index_put_((x > 2,), torch.tensor(0.0)),
             lambda: torch.where(x > 2)]
    for read in reads:
        with HostReads() as detector:
            read()
        assert detector.found
    y = torch.arange(6.0, requires_grad=True)
    with HostReads() as detector:
        torch.where(y > 2, y, 0).sum().backward()  # masks as values, not as indices: no read
    assert detector.found == []
    x.tolist()  # outside the detector, Tensor.tolist is itself again
    assert detector.found == []


@pytest.mark.parametrize('amp', [None, 'float16'])   # float16: its loss scaler's steps too
@pytest.mark.parametrize('name', method_names('all'))
def test_a_training_iteration_of_every_method_reads_nothing_back(name, amp):
    speed = replace(SPEED_DEFAULTS.on('cpu'), amp=amp)   # autocast on the CPU
    model, optim = build_step(load_config('small'), Case(name, name, 1, None), speed, 'cpu')
    batch = random_batch(classes=sum(model.step_sizes))
    model.before_step_training([batch])  # once per step, before the loop (PLOP's thresholds)
    model.train()
    model.train_step(batch, optim)  # a first iteration may set up state (e.g. momentum buffers)
    with HostReads() as detector:
        model.train_step(batch, optim)
    assert detector.found == []


def test_loss_logging_reads_back_once_per_interval():
    runner, hook = hook_runner(10, hub='test_host_syncs'), AveragedRuntimeInfoHook(interval=4)
    reads = []
    for i in range(8):
        with HostReads() as detector:
            hook.after_train_iter(runner, i, outputs=dict(loss=torch.tensor(float(i))))
        reads.append(len(detector.found))
    assert reads == [0, 0, 0, 1, 0, 0, 0, 1]
