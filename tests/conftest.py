"""Shared fixtures: the CPU for every test but the GPU ones, an isolated cache folder, a tiny
Pascal VOC tree writer; a run made one that stopped mid-way, and a folder locked by another
process as a run locks it."""
from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import mmengine.device.utils
from mmengine.logging import MessageHub
import numpy as np
import pytest
import torch
from PIL import Image


# A CPU's results depend on its number of threads (they set the order of floating-point sums),
# and torch takes one per core: the suite's numeric thresholds (a run that forgets, one that
# forgets less) are set on one thread, which every machine has, and so are the processes the
# tests start.
os.environ['OMP_NUM_THREADS'] = '1'
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def on_the_cpu_outside_test_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test but test_gpu.py's runs on the CPU, also on a machine with a GPU (and so do
    the processes it starts): they check results bit for bit (a resumed run ends as an
    uninterrupted one, a cached step 0 scores as a fresh one), which cuDNN's nondeterministic
    kernels would not give. test_gpu.py tests the GPU."""
    if request.node.path.name != 'test_gpu.py':
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
        # mmengine chose its device once, when imported: its Runner moves each model there
        # and resumes checkpoints onto it
        monkeypatch.setattr(mmengine.device.utils, 'DEVICE', 'cpu')
        monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test caches under its own tmp folder, never under ~/.cache."""
    cache = tmp_path / 'cache'
    monkeypatch.setenv('CSSBENCH_CACHE', str(cache))
    return cache


def mount_read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[Path]:
    """Refuse, as a read-only mount does (EROFS), to create a file or folder under ``folder``
    or open one there for writing; the paths refused are listed in the list returned. And say
    so, as it does: ``os.access`` denies writing there, ``os.statvfs`` flags it read-only. Tests
    run as root here, which file permissions do not stop: a ``chmod a-w`` would test nothing."""
    refused: list[Path] = []
    real_os_open, real_open, real_mkdir = os.open, builtins.open, os.mkdir
    real_access, real_statvfs = os.access, os.statvfs

    def under_folder(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(folder)

    def refuse_under_folder(path) -> None:
        if under_folder(path):
            refused.append(Path(path))
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def guarded_access(path, mode, *args, **kwargs):
        return not (mode & os.W_OK and under_folder(path)) and real_access(path, mode, *args, **kwargs)

    def guarded_statvfs(path):
        found = real_statvfs(path)
        if not under_folder(path):
            return found
        return os.statvfs_result((*found[:8], found.f_flag | os.ST_RDONLY, *found[9:]))

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            refuse_under_folder(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_open(file, mode='r', *args, **kwargs):
        if set(mode) & set('wax+'):
            refuse_under_folder(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        refuse_under_folder(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, 'open', guarded_os_open)
    monkeypatch.setattr(builtins, 'open', guarded_open)
    monkeypatch.setattr(io, 'open', guarded_open)
    monkeypatch.setattr(os, 'mkdir', guarded_mkdir)
    monkeypatch.setattr(os, 'access', guarded_access)
    monkeypatch.setattr(os, 'statvfs', guarded_statvfs)
    return refused


def hook_runner(iters_per_epoch: int, *, epoch: int = 0, loss_scaled: bool = False,
                hub: str = 'test_hooks') -> SimpleNamespace:
    """What AveragedRuntimeInfoHook reads of mmengine's Runner: its epoch, work dir, loader,
    model (a batch norm: weights and statistics), optimizer wrapper (``loss_scaled``: with
    float16's GradScaler) and message hub (``hub``: its name)."""
    return SimpleNamespace(epoch=epoch, work_dir='work/step1', train_dataloader=range(iters_per_epoch),
                           model=torch.nn.BatchNorm1d(2),
                           optim_wrapper=SimpleNamespace(loss_scaler=object() if loss_scaled else None),
                           message_hub=MessageHub.get_instance(hub))


LOCK_AND_WAIT = ('import fcntl, pathlib, sys, time; folder = pathlib.Path(sys.argv[1]); '
                 'folder.mkdir(parents=True, exist_ok=True); lock = open(folder / ".lock", "w"); '
                 'fcntl.lockf(lock, fcntl.LOCK_EX); print("locked", flush=True); time.sleep(300)')


@contextlib.contextmanager
def locked_by_another_process(folder: Path):
    """``folder`` locked (as a cssbench run locks it) by another process while in the block."""
    holder = subprocess.Popen([sys.executable, '-c', LOCK_AND_WAIT, str(folder)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'locked\n'
        yield
    finally:
        holder.kill()
        holder.wait()


def mask_with(labels, size: tuple[int, int] = (4, 4)) -> np.ndarray:
    """A uint8 mask of ``size`` (h, w) whose set of values is exactly ``labels``."""
    labels = sorted(labels)
    h, w = size
    assert len(labels) <= h * w
    flat = np.array([labels[i % len(labels)] for i in range(h * w)], dtype=np.uint8)
    return flat.reshape(h, w)


def _palette() -> list[int]:
    pal = []
    for i in range(256):
        pal += [(i * 37) % 256, (i * 91) % 256, (i * 53) % 256]
    return pal


def write_mask_png(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(np.asarray(mask, dtype=np.uint8))  # mode 'L'
    im.putpalette(_palette())                                 # becomes mode 'P'
    assert im.mode == 'P'
    im.save(path)


def write_jpeg(path: Path, height: int, width: int, seed: int = 0) -> None:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format='JPEG', quality=95)


def make_voc_tree(root: Path, train: dict[str, np.ndarray], val: dict[str, np.ndarray]) -> Path:
    """Write ``root/VOCdevkit/VOC2012`` with one JPEG and one palette PNG per id; return root."""
    root = Path(root)
    base = root / 'VOCdevkit' / 'VOC2012'
    images, masks, lists = (base / 'JPEGImages', base / 'SegmentationClassAug',
                            base / 'ImageSets' / 'Segmentation')
    for d in (images, masks, lists):
        d.mkdir(parents=True, exist_ok=True)
    for n, (sample_id, mask) in enumerate({**train, **val}.items()):
        mask = np.asarray(mask, dtype=np.uint8)
        write_jpeg(images / f'{sample_id}.jpg', mask.shape[0], mask.shape[1], seed=n)
        write_mask_png(masks / f'{sample_id}.png', mask)
    (lists / 'train_aug.txt').write_text(''.join(f'{i}\n' for i in train))
    (lists / 'val.txt').write_text(''.join(f'{i}\n' for i in val))
    return root


def join_val_images_in_pairs(voc: Path) -> None:
    """Each val image and mask becomes itself beside the next one (32x64) or above it (64x32):
    sizes that differ, and half of each image outside the central square."""
    ids = (voc / 'ImageSets' / 'Segmentation' / 'val.txt').read_text().split()
    files = [(voc / 'JPEGImages' / f'{i}.jpg', voc / 'SegmentationClassAug' / f'{i}.png') for i in ids]
    originals = [(np.asarray(Image.open(jpg)), Image.open(png)) for jpg, png in files]
    for n, (jpg, png) in enumerate(files):
        (image, mask), (next_image, next_mask) = originals[n], originals[(n + 1) % len(files)]
        axis = 1 - n % 2
        Image.fromarray(np.concatenate([image, next_image], axis)).save(jpg, quality=95)
        joined = Image.fromarray(np.concatenate([np.asarray(mask), np.asarray(next_mask)], axis), 'P')
        joined.putpalette(mask.getpalette())
        joined.save(png)


def stop_run_in_step(run_dir: Path, work: Path, t: int, steps: int = 2) -> None:
    """Make a run of ``steps`` steps one stopped in step ``t`` after its last epoch checkpoint
    (kept with --keep-epoch-checkpoints): the steps from ``t`` on have neither weights nor
    metrics."""
    for step in range(t, steps):
        (run_dir / 'steps' / f'step{step}.json').unlink(missing_ok=True)
        (work / f'step{step}' / 'model.pth').unlink(missing_ok=True)
    run = json.loads((run_dir / 'run.json').read_text())
    (run_dir / 'run.json').write_text(json.dumps(dict(run, status='running')))


def unregister_methods(*names: str) -> None:
    """Undo a test's ``register_method``: each method, and its class in the MODELS registry."""
    from cssbench.methods import METHODS
    from cssbench.registry import MODELS
    for name in names:
        method = METHODS.pop(name, None)
        if method is not None:
            MODELS._module_dict.pop(method.model_type.removeprefix('cssbench.'), None)


@pytest.fixture
def voc_tree() -> Callable[..., Path]:
    """The ``make_voc_tree`` helper as a fixture."""
    return make_voc_tree


CONFIGS = Path(__file__).resolve().parent.parent / 'benchmark' / 'configs'
SMALL_DIGEST = '32e30451df041122'  # the small config's (stored runs' are computed anew: the
                                   # older rule's 4b660a8be0305c19 counted its loader workers)


@pytest.fixture(scope='session')
def synth32(tmp_path_factory) -> Path:
    """A small synthetic VOC-layout dataset of 32 px images, for end-to-end runs."""
    from cssbench.synth import make_synth
    return make_synth(tmp_path_factory.mktemp('synth') / 'data', n_train=120, n_val=30, size=32,
                      seed=3, progress=False)


@pytest.fixture(scope='session')
def config32(tmp_path_factory) -> Path:
    """The small config at 32 px crops, without loader workers."""
    path = tmp_path_factory.mktemp('config') / 'small32.py'
    path.write_text(f"_base_ = ['{CONFIGS / 'small.py'}']\n"
                    "data = dict(crop_size=32, batch_size=16, num_workers=0)\n")
    return path


def random_batch(n: int = 4, size: int = 32, classes: int = 17, seed: int = 0) -> dict:
    """A training batch as the loader delivers it (uint8 images and masks): random labels
    below ``classes``, the first 4 rows of every mask ignored (255)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, classes, (n, size, size), generator=g, dtype=torch.uint8)
    masks[:, :4] = 255
    return dict(inputs=torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                data_samples=masks)


def method_model(name: str, step: int, cfg=None, protocol: str = 'voc-15-5-overlap',
                 prepare_old=None):
    """A method's model at step 0, or at step 1 as the runner makes it: step 0's weights
    loaded, step 0 attached as the teacher, the new classifier initialised. The step-0
    classifiers are drawn at random (non-trivial, so that initialisations show);
    ``prepare_old(old)`` may set more of step 0's state first."""
    import torch

    from cssbench.config import load_config
    from cssbench.methods import get_method
    from cssbench.protocols import load_protocol
    from cssbench.runner import attach_previous_step, build_model
    torch.manual_seed(0)
    cfg = cfg or load_config('small')
    method, proto = get_method(name), load_protocol(protocol)
    old = build_model(cfg, method.model_type, proto, 0)
    if step == 0:
        return old
    with torch.no_grad():
        for p in old.classifiers.parameters():
            p.normal_(0, 0.5)
        if prepare_old is not None:
            prepare_old(old)
    model = build_model(cfg, method.model_type, proto, 1)
    attach_previous_step(model, build_model(cfg, method.model_type, proto, 0), old.state_dict(),
                         Path('step0'))   # as the runner hands a step over
    return model


def with_trained_looking_batch_norms(model):
    """``model`` with every BN's statistics and affine parameters drawn away from their
    initial 0 and 1, as training leaves them (the initial ones fold to almost nothing)."""
    import torch
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for tensor, low, high in ((m.running_mean, -1, 1), (m.running_var, 0.2, 3),
                                      (m.weight, 0.3, 2), (m.bias, -1, 1)):
                if tensor is not None:
                    tensor.data.uniform_(low, high, generator=generator)
    return model


def batch_norms(net) -> int:
    import torch
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


def sdr_losses_with_a_trained_teacher(speed, device: str):
    """SDR's step-1 model, its teacher's BNs trained-looking, prepared by ``speed`` on
    ``device``, and its losses (eval mode: no dropout draws) under ``speed``'s autocast on
    one batch whose masks are mostly background, where SDR reads the teacher's pseudo-labels."""
    import torch
    from cssbench.speed import prepare_model
    model = method_model('sdr', 1, prepare_old=with_trained_looking_batch_norms)
    prepare_model(model, speed, device)
    model.eval()
    targets = torch.zeros(2, 32, 32, dtype=torch.uint8)
    targets[:, :16, :16] = 16   # the new class
    batch = dict(inputs=torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(0)),
                 data_samples=targets)
    with torch.no_grad(), torch.autocast(device, dtype=getattr(torch, speed.amp or 'bfloat16'),
                                         enabled=speed.amp is not None):
        losses = model(**model.data_preprocessor(batch, True), mode='loss')
    return model, losses


def drift_student(model) -> None:
    """Move the student's backbone away from its teacher's, as training does: at step 1 they
    start equal, so a distillation of their features would be 0 whatever it computed."""
    import torch
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))


def float16_steps_by_hand(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """float16's optimizer (autocast and its loss scaler on the training device, ``device``)
    against Nesterov SGD steps computed by hand, after a first step whose gradients overflow;
    its state saved and loaded as an epoch checkpoint does."""
    from mmengine.config import ConfigDict
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from cssbench.engine import sgd_config
    from cssbench.speed import Speed, optim_wrapper_config
    # Memory that PyTorch leaves uninitialised (the fused SGD's momentum at its first step)
    # holds NaN here.
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, 'empty_like', lambda *a, **k: empty_like(*a, **k).fill_(float('nan')))
    schedule = ConfigDict(momentum=0.9, nesterov=True, weight_decay=0.01)
    model = torch.nn.Linear(1, 1, bias=False, device=device)
    model.weight.data.fill_(2.0)

    def float16_optimizer():
        with DefaultScope.overwrite_default_scope('cssbench'):
            return build_optim_wrapper(model, optim_wrapper_config(Speed(amp='float16'),
                                                                   sgd_config(schedule, 0.1)))
    optim = float16_optimizer()

    def iteration(grad: float) -> None:
        with optim.optim_context(model):
            out = model(torch.ones(1, 1, device=device))   # w * 1, in float16
            assert out.dtype == torch.float16
            loss = (out * grad).sum()                         # d loss / d w = grad
        optim.update_params(loss)
    # The first gradient, 1 scaled by 2^16, overflows float16 (max 65504): the step is
    # skipped (no weight decay, no momentum) and the scale halved. Scaled by 2^15 the same
    # gradient fits, and the steps are those of test_speed.py's fp32 Nesterov test:
    # 2 - 0.1 * 1.938 = 1.8062, then 1.8062 + 0.1 * 0.0894822 = 1.81514822.
    iteration(1.0)
    assert model.weight.item() == 2.0 and optim.loss_scaler.get_scale() == 2.0 ** 15
    for grad, expected in ((1.0, 1.8062), (-0.5, 1.81514822)):
        iteration(grad)
        assert model.weight.item() == pytest.approx(expected, rel=1e-6)
    assert optim.loss_scaler.get_scale() == 2.0 ** 15
    # saved with the optimizer (an epoch checkpoint): a resumed step scales alike
    state = optim.state_dict()
    assert state['loss_scaler']['scale'] == 2.0 ** 15
    resumed = float16_optimizer()
    resumed.load_state_dict(state)
    assert resumed.loss_scaler.get_scale() == 2.0 ** 15
    assert resumed.optimizer.state_dict()['state'] == optim.optimizer.state_dict()['state']
