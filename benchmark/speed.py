"""The GPU fast path: bf16 autocast, channels_last, cudnn benchmark, the teacher made for
inference and (opt-in) torch.compile.

A config may hold a ``speed`` section; the defaults are ``SPEED_DEFAULTS``. The settings
apply on CUDA only: on CPU a run stays fp32 in the contiguous layout, exactly as without
them. ``--fp32`` gives the reference code's regime (``REFERENCE_SPEED``: PyTorch's defaults),
``--compile`` adds torch.compile.

bf16 needs no loss scaling (it has fp32's exponent range), so for bf16 the optimizer wrapper
here only adds autocast to mmengine's plain OptimWrapper. float16 (``amp='float16'``, for GPUs
without native bf16) scales the loss; mmengine's AmpOptimWrapper, which does so too, works
only on accelerators, not on the CPU that the tests run on.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace

import torch
import torch._functorch.config
from mmengine.optim import OptimWrapper
from mmengine.runner import ValLoop

from .errors import UserError
from .models import fold_batch_norms, store_convolutions_in
from .registry import LOOPS, OPTIM_WRAPPERS

AMP_DTYPES = ('bfloat16', 'float16', None)
NO_AUTOCAST = 'float32'   # how records (run.json, clock.json, the step-0 key) name amp=None


def autocast_name(amp: str | None) -> str:
    """``amp`` as the records name it: its dtype, ``float32`` for none."""
    return amp or NO_AUTOCAST


# torch.compile's AOTAutograd cache keys a graph on whether autocast is on, and before torch
# 2.13 not on its dtype (pytorch/pytorch#181564): on torch 2.11 a model compiled under float16
# autocast ran the graph cached under bf16, in bf16 (seen on an H100: bf16 kernels and the same
# graph in both regimes). Compiling under autocast there goes without that cache; the FX graph
# cache below it keys on the traced graph, whose dtypes are the autocast's, and stays.
AUTOGRAD_CACHE_KEYS_AUTOCAST_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)


@dataclass(frozen=True)
class Speed:
    amp: str | None = 'bfloat16'    # autocast dtype of the forward passes; None: fp32
    channels_last: bool = True       # model and inputs in NHWC memory layout
    cudnn_benchmark: bool = True     # cudnn picks the fastest convolution per shape
    compile: bool = False            # torch.compile of the backbone and the head
    inference_teacher: bool = True   # the frozen teacher's BNs folded, its weights in amp's dtype

    def on(self, device: str) -> 'Speed':
        """What takes effect on ``device``: on CPU, none of the CUDA-only settings."""
        if device == 'cuda':
            return self
        return replace(self, amp=None, channels_last=False, cudnn_benchmark=False,
                       inference_teacher=False)


SPEED_DEFAULTS = Speed()
REFERENCE_SPEED = Speed(amp=None, channels_last=False, cudnn_benchmark=False, compile=False,
                        inference_teacher=False)


def training_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def emulated_bf16_note(speed: Speed) -> str | None:
    """A line for a run whose ``speed`` autocasts to bf16 on a GPU that has no bf16 units
    (before NVIDIA's Ampere: V100, T4), where PyTorch emulates it; None otherwise."""
    if speed.amp != 'bfloat16' or torch.cuda.is_bf16_supported(including_emulation=False):
        return None
    return (f'{torch.cuda.get_device_name()} computes bfloat16 only in emulation (slowly): '
            f"speed = dict(amp='float16') in the config trains in float16 (loss-scaled), "
            f'--fp32 in fp32')


def resolve_speed(section: dict | None, source: str, *, compile: bool = False,
                  fp32: bool = False) -> dict:
    """The config's ``speed`` section over the defaults, then the run flags; as a dict (it
    goes back into the config). ``source`` names the config file in errors."""
    if section is not None and not isinstance(section, dict):
        raise UserError(f'{source}: speed must be a dict of speed settings, e.g. '
                        f"speed = dict(amp='float16'), got {section!r}")
    section = dict(section or {})
    unknown = set(section) - set(asdict(SPEED_DEFAULTS))
    if unknown:
        raise UserError(f'{source}: unknown speed setting(s) {sorted(unknown)} '
                        f'(known: {", ".join(asdict(SPEED_DEFAULTS))})')
    if section.get('amp', 'bfloat16') not in AMP_DTYPES:
        raise UserError(f'{source}: speed.amp must be "bfloat16", "float16" or None, got '
                        f'{section["amp"]!r}')
    for name, default in asdict(SPEED_DEFAULTS).items():   # a string 'False' would turn it on
        if isinstance(default, bool) and not isinstance(section.get(name, default), bool):
            raise UserError(f'{source}: speed.{name} must be True or False, got {section[name]!r}')
    if compile and fp32:
        raise UserError('--compile and --fp32 exclude each other (--fp32 is the eager reference regime)')
    speed = REFERENCE_SPEED if fp32 else replace(SPEED_DEFAULTS, **section)
    return asdict(replace(speed, compile=True) if compile else speed)


def effective_speed(cfg) -> Speed:
    """The settings of ``cfg`` (defaults where it has none) that apply on this machine."""
    return Speed(**resolve_speed(cfg.get('speed'), cfg.filename)).on(training_device())


def prepare_model(model, speed: Speed, device: str):
    """Move a segmentor, and its teacher if it has one, to ``device`` in ``speed``'s memory
    layout, compiled if asked; the data preprocessor then hands over channels_last inputs.
    With ``inference_teacher`` the teacher, frozen, is first made for inference: its BNs folded
    into its convolutions (the same function to rounding, without a pass over its activations
    per BN: 110 in DeepLabV3-ResNet101), and under autocast its convolution weights stored in
    autocast's dtype (the same numbers, without autocast's cast of each weight at each step)."""
    if speed.inference_teacher and model.teacher is not None:
        fold_batch_norms(model.teacher)
        if speed.amp:
            store_convolutions_in(model.teacher, getattr(torch, speed.amp))
    for net in (model, model.teacher):
        if net is None:
            continue
        net.to(device)
        if speed.channels_last:
            net.to(memory_format=torch.channels_last)
        net.data_preprocessor.channels_last = speed.channels_last
        if speed.compile:
            if speed.amp and not AUTOGRAD_CACHE_KEYS_AUTOCAST_DTYPE:
                torch._functorch.config.enable_autograd_cache = False
            # The backbone and the head: no data-dependent control flow, and training's shapes
            # are fixed. Whole-image evaluation's sizes vary: at the second size dynamo compiles
            # each once more, shape-generic (on CPU, 18 VOC-like sizes made 4 graphs in all).
            # The methods' losses stay eager.
            net.backbone.compile()
            net.decode_head.compile()
    return model


def autocast(amp: str | None):
    """The forward passes' autocast context for ``amp`` (a dtype name; None: none), on the
    training device."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(training_device(), dtype=getattr(torch, amp))


@OPTIM_WRAPPERS.register_module()
class AutocastOptimWrapper(OptimWrapper):
    """mmengine's OptimWrapper whose forward passes (``optim_context``) run under autocast.

    Under float16 it scales the loss (PyTorch's GradScaler, dynamic: a step whose gradients
    overflowed is skipped and the scale halved). The fused SGD takes the scale and the
    overflow flag as tensors and skips on the device, so that adds no host sync either. The
    scaler's state is saved with the optimizer's: a resumed step scales as it would have.
    """

    def __init__(self, *args, dtype: str = 'bfloat16', **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.amp = dtype
        self.loss_scaler = None
        if dtype == 'float16':
            self.loss_scaler = torch.amp.GradScaler(training_device())
            _start_momentum_at_zero(self.optimizer)

    @contextlib.contextmanager
    def optim_context(self, model):
        with super().optim_context(model), autocast(self.amp):
            yield

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        super().backward(loss if self.loss_scaler is None else self.loss_scaler.scale(loss),
                         **kwargs)

    def step(self, **kwargs) -> None:
        if self.loss_scaler is None:
            super().step(**kwargs)
            return
        self.loss_scaler.step(self.optimizer, **kwargs)
        self.loss_scaler.update()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.loss_scaler is not None:
            state['loss_scaler'] = self.loss_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        scaler = state_dict.pop('loss_scaler', None)
        if self.loss_scaler is not None and scaler is not None:
            self.loss_scaler.load_state_dict(scaler)
        super().load_state_dict(state_dict)


def _start_momentum_at_zero(optimizer: torch.optim.SGD) -> None:
    """Give each trained parameter its momentum buffer, zero, before the first step. The fused
    SGD makes it at its first step, uninitialised (``empty_like``) for the kernel to fill,
    which a skipped step does not: float16's first gradients often overflow at the initial
    scale. From zero the first update is the same (no dampening: momentum * 0 + g)."""
    for group in optimizer.param_groups:
        if group['momentum']:
            for p in group['params']:
                if p.requires_grad:
                    optimizer.state[p].setdefault('momentum_buffer', torch.zeros_like(p))


@LOOPS.register_module()
class SpeedValLoop(ValLoop):
    """mmengine's ValLoop with each batch's forward under autocast of ``dtype`` (None: none)
    and, where ``cudnn_benchmark`` is given, cudnn's benchmark mode set to it while it runs."""

    def __init__(self, runner, dataloader, evaluator, dtype: str | None = None,
                 cudnn_benchmark: bool | None = None) -> None:
        super().__init__(runner, dataloader, evaluator)
        self.amp = dtype
        self.cudnn_benchmark = cudnn_benchmark

    def run(self) -> dict:
        previous = torch.backends.cudnn.benchmark
        if self.cudnn_benchmark is not None:
            torch.backends.cudnn.benchmark = self.cudnn_benchmark
        try:
            return super().run()
        finally:
            torch.backends.cudnn.benchmark = previous

    def run_iter(self, idx, data_batch) -> None:
        with autocast(self.amp):
            super().run_iter(idx, data_batch)


def optim_wrapper_config(speed: Speed, optimizer: dict) -> dict:
    if speed.amp is None:
        return dict(optimizer=optimizer)
    return dict(type='cssbench.AutocastOptimWrapper', dtype=speed.amp, optimizer=optimizer)


def val_loop_config(speed: Speed, varying_sizes: bool = False) -> dict:
    """Evaluation under ``speed``'s autocast; for images of ``varying_sizes``, without cudnn's
    benchmark mode, which would search its algorithms again for every new size."""
    return dict(type='cssbench.SpeedValLoop', dtype=speed.amp,
                cudnn_benchmark=False if varying_sizes else None)
