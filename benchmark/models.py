"""The incremental segmentor: a backbone, a DeepLabV3 head and one classifier per step.

The classifier grows by one 1x1 convolution per step (as the reference code's ``cls``
ModuleList); the logits of all steps are concatenated in the protocol's class order. The
segmentor follows mmengine's model interface (``forward(inputs, data_samples, mode)``) so
mmengine's Runner trains it; methods subclass it and override ``loss``.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import NewType

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from mmengine.model import BaseDataPreprocessor, BaseModel
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .datasets_info import IGNORE_INDEX
from .errors import UserError
from .losses import cross_entropy
from .registry import MODELS

# The annotation of a method's setting that weighs a loss term (``loss_kd: LossWeight = 100.0``):
# a config's value must be a number >= 0 (runner._SETTING_KINDS). The methods test ``weight >
# 0``, so a negative one would turn its term off as 0 does, unnoticed.
LossWeight = NewType('LossWeight', float)

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@MODELS.register_module()
class SegDataPreprocessor(BaseDataPreprocessor):
    """Moves a uint8 batch (images and masks) to the device, then normalises the images and
    widens the masks to int64 there: only bytes cross the loader and the bus.

    The copy does not block the host (the loader's pinned batches are fresh each time, so
    nothing overwrites them while the copy is in flight).
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last: bool = False) -> None:
        super().__init__(non_blocking=True)
        self.register_buffer('mean', torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.channels_last = channels_last

    def forward(self, data: dict, training: bool = False) -> dict:
        data = self.cast_data(data)
        inputs = (data['inputs'].float() - self.mean) / self.std
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = data.get('data_samples')
        return dict(inputs=inputs, data_samples=None if targets is None else targets.long())


def read_state_dict(path: Path, what: str, advice: str = '') -> dict:
    """The tensors saved at ``path``; a file that does not load is refused, naming it."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # whatever stops it loading is the file's
        raise UserError(f'{path}: cannot read {what} ({type(e).__name__}: {e}){advice}') from None
    if not isinstance(state, dict):
        raise UserError(f'{path}: not a state dict of tensors')
    return state


def load_imagenet_weights(net: nn.Module, path: Path) -> None:
    """Every weight of ``net`` but its fc from a torchvision-layout checkpoint at ``path``; a
    file that does not hold them all is refused (a silently partial load would train from
    random weights). What is missing is load_state_dict's own report, which does not ask for
    BN's ``num_batches_tracked`` (checkpoints older than that counter lack it)."""
    state = {k: v for k, v in read_state_dict(path, 'this pretrained checkpoint').items()
             if not k.startswith('fc.')}
    try:
        loaded = net.load_state_dict(state, strict=False)
    except RuntimeError as e:   # the names match, a shape does not (another depth)
        raise UserError(f'{path}: does not fit the backbone: {str(e).splitlines()[-1].strip()}') from None
    missing = [k for k in loaded.missing_keys if not k.startswith('fc.')]
    unexpected = loaded.unexpected_keys
    if missing or unexpected:
        needed = sum(not k.startswith('fc.') and not k.endswith('.num_batches_tracked')
                     for k in net.state_dict())
        what = [f'{len(missing)} of its {needed} tensors missing (e.g. {missing[0]})'] if missing else []
        what += [f'{len(unexpected)} unknown (e.g. {unexpected[0]})'] if unexpected else []
        raise UserError(f"{path}: not a torchvision {type(net).__name__} checkpoint: {', '.join(what)}")


RESNET_DEPTHS = (18, 34, 50, 101, 152)   # torchvision's ResNets


@MODELS.register_module()
class TorchvisionResNet(nn.Module):
    """torchvision's ResNet without its pooling and fc, dilated to ``output_stride`` (8, 16, or 32: none;
    depths 18 and 34, whose blocks do not dilate, take 32 only).

    ``pretrained`` is a local path to an ImageNet checkpoint in torchvision's layout.
    """

    def __init__(self, depth: int = 101, output_stride: int = 16, pretrained: str | None = None) -> None:
        super().__init__()
        dilate = {16: [False, False, True], 8: [False, True, True], 32: [False, False, False]}
        if depth not in RESNET_DEPTHS:
            raise ValueError(f'depth must be one of {", ".join(map(str, RESNET_DEPTHS))}, got {depth!r}')
        if output_stride not in dilate:
            raise ValueError(f'output_stride must be 8, 16 or 32, got {output_stride!r}')
        if depth < 50 and output_stride != 32:   # torchvision's BasicBlock does not dilate
            raise ValueError(f'depth {depth} takes output_stride=32 only (its blocks cannot '
                             f'dilate), got {output_stride}')
        net = getattr(torchvision.models, f'resnet{depth}')(
            weights=None, replace_stride_with_dilation=dilate[output_stride])
        if pretrained:
            load_imagenet_weights(net, Path(pretrained).expanduser())
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = net.fc.in_features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = self.stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel - 1) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """A basic residual block that, unlike torchvision's BasicBlock, accepts dilation."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, 3, stride, dilation)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, dilation, dilation, bias=False),
                                   nn.BatchNorm2d(cout))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


@MODELS.register_module()
class SmallResNet(nn.Module):
    """A residual network small enough for CPU runs and tests: a stride-2 stem, then one
    block per stage (output stride 8 with the default strides)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 96, 128), strides=(1, 2, 2, 1),
                 dilations=(1, 1, 1, 2)) -> None:
        super().__init__()
        if not len(widths) == len(strides) == len(dilations):   # a stage each: zip would drop some
            raise ValueError(f'widths {tuple(widths)}, strides {tuple(strides)} and dilations '
                             f'{tuple(dilations)} differ in length (one of each per stage)')
        self.stem = conv_bn_relu(3, widths[0], 3, stride=2)
        cins = (widths[0], *widths[:-1])
        self.stages = nn.ModuleList(ResidualBlock(cin, cout, s, d)
                                    for cin, cout, s, d in zip(cins, widths, strides, dilations))
        self.out_channels = widths[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


@MODELS.register_module()
class ASPPHead(nn.Module):
    """DeepLabV3's atrous spatial pyramid pooling; returns features, not logits.

    The same function as the reference's head (MiB/SDR ``modules/deeplab.py: DeeplabV3``):
    its one normalisation over the concatenated branches is per channel, i.e. per branch, and
    its ``red_conv`` of the branches plus ``pool_red_conv`` of the pooled branch is one 1x1
    convolution of all five, ``project`` here. Its inplace-ABN activates with a leaky ReLU
    (slope 0.01) where this uses ReLU, as torchvision's ResNet does."""

    def __init__(self, in_channels: int, channels: int = 256, dilations=(1, 6, 12, 18)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(conv_bn_relu(in_channels, channels, 1 if d == 1 else 3, dilation=d)
                                      for d in dilations)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels, 1))
        self.project = conv_bn_relu(channels * (len(dilations) + 1), channels, 1)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])
        x = torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1)
        return self.project(x)


def _conv_bn_pairs(net: nn.Module):
    """(parent, conv name, BN name) of each convolution in ``net`` whose output only the BN
    after it reads: neighbours in a plain ``nn.Sequential``, and convN, bnN in torchvision's
    residual blocks. Subclasses are passed over: their forward may read a convolution twice."""
    for parent in net.modules():
        if type(parent) is nn.Sequential:
            names = list(parent._modules)
            pairs = zip(names, names[1:])
        elif type(parent) in (torchvision.models.resnet.Bottleneck, torchvision.models.resnet.BasicBlock):
            pairs = ((f'conv{i}', f'bn{i}') for i in (1, 2, 3) if hasattr(parent, f'conv{i}'))
        else:
            continue
        for conv, bn in pairs:
            if (type(parent._modules[conv]) is nn.Conv2d
                    and isinstance(parent._modules[bn], nn.modules.batchnorm._BatchNorm)
                    and parent._modules[bn].running_mean is not None):  # else: batch statistics
                yield parent, conv, bn


def fold_batch_norms(net: nn.Module) -> int:
    """Fold each batch norm of ``net`` (frozen, in eval mode) into the convolution before it:
    the same function to rounding, with one pass over the activations fewer per BN. Returns
    how many it folded; a BN it cannot pair with its convolution stays."""
    if net.training:
        raise ValueError('batch norms fold only in eval mode (in training they use batch statistics)')
    pairs = list(_conv_bn_pairs(net))
    for parent, conv, bn in pairs:
        setattr(parent, conv, fuse_conv_bn_eval(parent._modules[conv], parent._modules[bn]))
        setattr(parent, bn, nn.Identity())
    return len(pairs)


def store_convolutions_in(net: nn.Module, dtype: torch.dtype) -> None:
    """Store the convolution weights of ``net`` (frozen) in ``dtype``, as autocast to ``dtype``
    casts them at each call of a frozen network (it keeps casts only of weights that train):
    under autocast the same numbers, without a cast per weight per call. Outside autocast
    ``net`` computes in ``dtype`` too: its backbone takes its input in ``dtype``."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            module.to(dtype)
    net.backbone.register_forward_pre_hook(lambda _, args: (args[0].to(dtype), *args[1:]))


def upsample_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Logits at the input size, in fp32: under bf16 autocast the losses, the distillation
    and the argmax see full-precision logits (a no-op cast in fp32 runs). The resize runs
    with autocast off: autocast would round its matrix products' inputs back to bf16."""
    device = logits.device.type
    with (torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device)
          else contextlib.nullcontext()):   # (not on the meta device, for one)
        return resize_bilinear(logits.float(), size)


def resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """``F.interpolate(x, size, mode='bilinear', align_corners=False)``, computed as two
    matrix products, ``rows @ x @ cols.T``, in ``x``'s dtype: on a GPU the backward of
    interpolate's kernel adds each output gradient into the input with atomics, about a
    fifth of DeepLabV3-R101's bf16 training step at 512 px (18.5 of 85 ms on an H100, for
    the logits' 32 to 512 px: hundreds of additions into each input value); the products'
    backward is two products (under 1 ms)."""
    rows = bilinear_weights(x.shape[-2], size[0], x.device, x.dtype)
    cols = bilinear_weights(x.shape[-1], size[1], x.device, x.dtype)
    return rows @ (x @ cols.T)


def bilinear_weights(n_in: int, n_out: int, device, dtype) -> torch.Tensor:
    """The ``(n_out, n_in)`` matrix of 1-d bilinear resizing with align_corners=False: output
    ``i`` reads the input at ``(i + 0.5) * n_in / n_out - 0.5``, clamped to the input, with
    the tent weights ``max(0, 1 - |position - j|)`` on inputs ``j``."""
    position = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out)
                - 0.5).clamp(0, n_in - 1)
    inputs = torch.arange(n_in, device=device, dtype=torch.float64)
    return (1 - (position[:, None] - inputs).abs()).clamp(min=0).to(dtype)


@MODELS.register_module()
class IncrementalSegmentor(BaseModel):
    """Backbone + head + one classifier per step; trained with plain cross-entropy (fine-tuning).

    ``step_sizes[i]`` is the number of classes step i added (step 0 counts background);
    ``overlapped`` tells whether the protocol is overlapped (the runner sets both). A
    method that needs the previous step's model finds it in ``self.teacher`` (frozen, in eval
    mode, kept out of this module's parameters and checkpoints; in the GPU fast path made
    for inference, ``speed.prepare_model``), ``None`` at step 0.
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if 'step0_kind' not in vars(cls):   # not inherited
            cls.step0_kind = None

    def __init__(self, backbone: dict, decode_head: dict, step_sizes: list[int],
                 data_preprocessor: dict | None = None, ignore_index: int = IGNORE_INDEX,
                 overlapped: bool = False, classifier_dropout: float = 0.0) -> None:
        # Built here, not by BaseModel: mmengine's root registry cannot see cssbench's scope.
        super().__init__(data_preprocessor=MODELS.build(
            data_preprocessor or dict(type='cssbench.SegDataPreprocessor')))
        self.backbone = MODELS.build(backbone)
        self.decode_head = MODELS.build(dict(decode_head, in_channels=self.backbone.out_channels))
        # Dropout sits before the classifiers, not in the head: ``extract``'s features are the
        # head's output as is, for the methods that distil them.
        self.classifier_dropout = nn.Dropout2d(classifier_dropout)
        self.classifiers = nn.ModuleList(nn.Conv2d(self.decode_head.channels, n, 1) for n in step_sizes)
        self.step_sizes = list(step_sizes)
        self.ignore_index = ignore_index
        self.overlapped = overlapped  # the protocol's image filtering, for methods that need it
        self.__dict__['teacher'] = None  # a plain attribute: not a submodule

    @property
    def step(self) -> int:
        return len(self.step_sizes) - 1

    @property
    def num_old_classes(self) -> int:
        return sum(self.step_sizes[:-1])

    def set_teacher(self, teacher: 'IncrementalSegmentor | None') -> None:
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.__dict__['teacher'] = teacher

    # What step 0 trains. Methods of one kind train the same step-0 model (weights and any
    # extra state), so a cached one of the same kind, first step, data, config and seed
    # stands in for training it (step0.cache_key); None: always train step 0. Each method
    # class states its own (__init_subclass__): a subclass may train step 0 otherwise.
    step0_kind: str | None = None

    # The method's own settings (constructor arguments) that its step 0 never reads, e.g.
    # distillation weights: configs that differ only in them share a cached step 0. Every
    # setting not named counts, a subclass's new ones too.
    settings_unused_at_step0: tuple[str, ...] = ()

    # Hyperparameters (constructor arguments) that differ by dataset from the defaults in the
    # signature, which are the VOC ones: {'ade': dict(...)}. A config's values win over both.
    dataset_defaults: dict[str, dict] = {}

    # Names of buffers whose first dimension is indexed by class (e.g. per-class prototypes);
    # a step-t model takes the previous step's rows of them and keeps its new rows as built.
    class_indexed_buffers: tuple[str, ...] = ()

    def init_new_classifier(self) -> None:
        """Initialise the newest step's classifier; fine-tuning keeps the default init."""

    def before_step_training(self, dataloader) -> None:
        """Called once before a step's first epoch (again when an interrupted step resumes
        training; not for one stopped after its last epoch, which only evaluates), with the
        step's training loader and the teacher attached; for methods that need a pass over
        the step's data first (e.g. pseudo-label thresholds). Nothing by default."""

    def after_step_training(self, dataloader) -> None:
        """Called once after a step's last epoch with the step's training loader (batches as
        the data preprocessor takes them), before evaluation; for methods that summarise the
        step's data with the trained model (no shipped method does: SDR updates its prototypes
        during training). Nothing by default."""

    def extract(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The backbone's stages and the head's features, for methods that distil them."""
        body = self.backbone(inputs)
        return dict(body=body, features=self.decode_head(body[-1]))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        features = self.classifier_dropout(features)
        return torch.cat([cls(features) for cls in self.classifiers], dim=1)

    def encode_decode(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.extract(inputs)
        logits = self.classify(out['features'])
        out['logits'] = upsample_logits(logits, inputs.shape[-2:])
        return out

    def forward(self, inputs: torch.Tensor, data_samples: torch.Tensor | None = None,
                mode: str = 'tensor'):
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        if mode == 'predict':
            return self.predict(inputs, data_samples)
        return self.encode_decode(inputs)['logits']

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.encode_decode(inputs)['logits']
        return dict(loss_ce=cross_entropy(logits, targets, self.ignore_index))

    def parse_losses(self, losses: dict) -> tuple[torch.Tensor, dict]:
        """mmengine's sum of the terms named ``loss*`` (others are only logged), refusing a
        term that is not one number: mmengine would average a per-pixel map, ignored pixels
        included, and fail on a float, or an integer or boolean tensor, with a traceback."""
        for name, value in losses.items():
            if not isinstance(value, torch.Tensor):
                what = f'a {type(value).__name__}'
            elif value.numel() != 1:
                what = f'a tensor of shape {tuple(value.shape)}'
            elif not value.is_floating_point():   # a count, say: mmengine's mean() fails on it
                what = f'a tensor of dtype {value.dtype}, not a floating-point one'
            else:
                continue
            raise UserError(f'{type(self).__name__}.loss returned {name!r} as {what}: each '
                            f'term is one number, a tensor reduced as the method means it')
        return super().parse_losses(losses)

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> list[dict]:
        pred = self.encode_decode(inputs)['logits'].argmax(dim=1)
        return [dict(pred=pred, gt=targets)]


@torch.no_grad()
def init_classifier_from_background(model: IncrementalSegmentor) -> None:
    """MiB's balanced init of the newest step's classifier (reference
    ``segmentation_module.py: init_new_classifier``, run when ``init_balanced``): every new
    class gets the background's weight and the bias ``b_bkg - log(N_new + 1)``, which the
    background's bias becomes too, so that p(bkg) + sum p(new) of the new model equals the old
    model's p(bkg)."""
    bkg, new = model.classifiers[0], model.classifiers[-1]
    new_bias = bkg.bias[0] - math.log(model.step_sizes[-1] + 1)
    new.weight.copy_(bkg.weight[0].expand_as(new.weight))
    new.bias.copy_(new_bias.expand_as(new.bias))
    bkg.bias[0] = new_bias
