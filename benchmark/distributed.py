"""Several processes on one run, as ``torchrun --nproc_per_node=K -m cssbench run ...`` starts them.

Every process trains on its share of each batch (DDP); rank 0 alone decides what the run
folder holds, holds the run's locks and writes results, weights, caches and logs. The others
take rank 0's decisions (``decided_by_main``) and wait for its files at ``barrier()``.
With one process every function here does nothing (``decided_by_main`` calls its function
as it is), but that one started by torchrun ends with torchrun's agent (``end_with_parent``).
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import os
import signal
import sys
import warnings

import torch
import torch.distributed as dist

from .errors import RaisedByMainProcess, RunHeldElsewhere, UserError


def start_from_env(parent: int | None = None) -> int:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK); returns the number of processes. NCCL with one GPU per process on CUDA,
    gloo on CPU. Ranks other than 0 print nothing, warnings included: rank 0 speaks for the
    run (an error of their own they still report). Started by torchrun, with any number of
    processes, this one ends when torchrun's agent dies (``end_with_parent``): ``parent``,
    its process id, read as early as can be (default: now)."""
    if 'TORCHELASTIC_RUN_ID' in os.environ:   # set by torchrun's agent alone
        end_with_parent(os.getppid() if parent is None else parent)
    if int(os.environ.get('WORLD_SIZE', '1')) <= 1 or dist.is_initialized():
        return world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
    dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
    atexit.register(dist.destroy_process_group)
    # as torchrun sets OMP_NUM_THREADS; mmengine would set it to 1, warning at every step
    os.environ.setdefault('MKL_NUM_THREADS', os.environ.get('OMP_NUM_THREADS', '1'))
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, 'w')
        warnings.simplefilter('ignore')
    return world_size()


PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


def end_with_parent(parent: int) -> None:
    """Have the kernel send this process SIGTERM when ``parent``, the process that started it,
    dies. torchrun's agent stops its workers when it is stopped, but killed with SIGKILL (by a
    scheduler, the OOM killer) it cannot: they would train on alone, holding their GPUs and
    the run. Linux only; elsewhere nothing."""
    if not sys.platform.startswith('linux'):
        return
    # The signal comes when the thread that started this process ends: torchrun's agent starts
    # its workers from its main thread, which lives as long as the agent (another launcher
    # might start them from a thread that ends before it: hence torchrun's alone).
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:   # it died before it could be asked: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main_process() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes, in place (it must live on the backend's device:
    CUDA under NCCL, CPU under gloo); returns it. One process: unchanged."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def broadcast_buffers_from_main(module: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BN statistics, class prototypes): what each
    process then evaluates is the model rank 0 saves. Without SyncBN (on CPU) each process's
    BN statistics follow its own batches during training."""
    if world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


class _UserErrorOfMain(RaisedByMainProcess, UserError):
    pass


class _RunHeldElsewhereOfMain(RaisedByMainProcess, RunHeldElsewhere):
    pass


class _OSErrorOfMain(RaisedByMainProcess, OSError):
    pass


class _ErrorOfMain(RaisedByMainProcess, RuntimeError):
    pass


def _kind_of(error: Exception) -> type[RaisedByMainProcess]:
    if isinstance(error, RunHeldElsewhere):   # every process leaves the run alike
        return _RunHeldElsewhereOfMain
    if isinstance(error, UserError):
        return _UserErrorOfMain
    return _OSErrorOfMain if isinstance(error, OSError) else _ErrorOfMain


def decided_by_main(fn):
    """Decorator: ``fn`` runs on rank 0 only, and every process gets its return value, or
    raises its error: a UserError (a RunHeldElsewhere too) or an OSError stays one, with the
    same message, and is also a ``RaisedByMainProcess`` on the other processes (rank 0
    reports it). Every process must call the decorated function at the same point."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if world_size() == 1:
            return fn(*args, **kwargs)
        outcome = [None]
        if is_main_process():
            try:
                outcome[0] = ('value', fn(*args, **kwargs))
            except Exception as e:
                outcome[0] = ('error', _kind_of(e), str(e))
                dist.broadcast_object_list(outcome)
                raise
        dist.broadcast_object_list(outcome)
        if outcome[0][0] == 'value':
            return outcome[0][1]
        _, kind, message = outcome[0]
        raise kind(message)
    return wrapper
