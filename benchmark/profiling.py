"""Where a training step's time goes (``cssbench bench --profile``): torch.profiler over a few
steps, the time summed by kind of work. On a GPU the kinds are of its kernels' time, which
set the step's pace when it is the GPU's; on the CPU, of the operators' own time.

A kind is read from the kernel's or operator's name: cuDNN's and cuBLAS's convolution and
matmul kernels, PyTorch's batch-norm kernels (and the Triton kernels torch.compile fuses
around a batch norm, whose names say so), the optimizer's multi-tensor kernels; the rest is
elementwise work (ReLUs, residual adds, casts, the losses) and reductions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

KINDS = (  # (kind, what names it), the first that matches
    ('batch norm', re.compile(r'batch_?norm|bn_fw|bn_bw|welford', re.IGNORECASE)),
    ('convolution, matmul', re.compile(
        r'conv|gemm|xmma|cutlass|nvjet|implicit|wgrad|dgrad|fprop|\bmm\b|aten::(?:bmm|mm|addmm)$')),
    ('optimizer', re.compile(r'multi_tensor|fused_sgd|_foreach')),
)
OTHER = 'elementwise, other'
TOP = 5   # the longest kernels (operators) named per regime


@dataclass(frozen=True)
class StepProfile:
    """Milliseconds per step."""
    busy: str                               # what is timed: 'kernels' (GPU) or 'operators' (CPU)
    wall_ms: float                          # the step, from start to the device's end
    busy_ms: float                          # their time
    by_kind: dict[str, float]               # busy_ms by kind, KINDS' order then OTHER
    top: list[tuple[str, float, float]]     # (name, ms per step, calls per step), longest first


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), OTHER)


def profile_step(step, first: int, steps: int, device: str, wall_s: float) -> StepProfile:
    """``step(first) ... step(first + steps - 1)`` profiled; ``wall_s``, a step's time as
    timed apart from the profiler (whose recording slows the host)."""
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device == 'cuda')
    with profile(activities=activities) as prof:
        for i in range(first, first + steps):
            step(i)
        if device == 'cuda':   # the kernels still running, recorded too
            torch.cuda.synchronize()
    return summarize(prof.key_averages(), steps, device, wall_s)


def summarize(events, steps: int, device: str, wall_s: float) -> StepProfile:
    """A profile's kernels (``device`` 'cuda') or operators, ``events`` as key_averages
    gives them, per step."""
    if device == 'cuda':
        # "## Call CompiledFxGraph ... ##": torch.compile's ranges, projected onto the GPU's
        # timeline over the kernels they launched, which they would count twice
        timed = [(e.key, e.self_device_time_total, e.count) for e in events
                 if e.device_type == DeviceType.CUDA and not e.key.startswith('## ')]
    else:
        timed = [(e.key, e.self_cpu_time_total, e.count) for e in events
                 if e.device_type == DeviceType.CPU and e.key.startswith('aten::')]
    by_kind = dict.fromkeys([kind for kind, _ in KINDS] + [OTHER], 0.0)
    for name, us, _ in timed:
        by_kind[kind_of(name)] += us / 1e3 / steps
    top = sorted(timed, key=lambda t: -t[1])[:TOP]
    return StepProfile(busy='kernels' if device == 'cuda' else 'operators', wall_ms=1e3 * wall_s,
                       busy_ms=sum(by_kind.values()), by_kind=by_kind,
                       top=[(name, us / 1e3 / steps, count / steps) for name, us, count in top])


def format_profiles(case: str, profiles: dict[str, StepProfile]) -> list[str]:
    """The report's lines: per regime, the step's wall and busy time, the kinds, the top."""
    lines = [f'where a step of {case} spends its time (torch.profiler, ms per step):']
    for name, p in profiles.items():
        kinds = ', '.join(f'{kind} {ms:.1f} ({100 * ms / p.busy_ms:.0f} %)'
                          for kind, ms in p.by_kind.items() if p.busy_ms > 0)
        lines.append(f'  {name}: wall {p.wall_ms:.1f}, {p.busy} {p.busy_ms:.1f}: {kinds}')
        lines += [f'      {ms:7.2f} ms  {calls:5.0f} x  {_shortened(kernel)}' for kernel, ms, calls in p.top]
    return lines


def _shortened(name: str, width: int = 100) -> str:
    return name if len(name) <= width else name[:width - 3] + '...'
