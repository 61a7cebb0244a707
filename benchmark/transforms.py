"""Paired image/mask transforms of the reference training and evaluation (on uint8 tensors).

Training follows fcdl94/MiB run.py: RandomResizedCrop(crop, scale=(0.5, 2.0), ratio=(3/4, 4/3))
with the image bilinear and the mask nearest, then a horizontal flip with p=0.5. Evaluation is
by default the reference's legacy preset, Resize(shorter side = crop) then CenterCrop(crop):
only the central square is scored; a protocol's ``eval_crop: whole`` scores the whole image at
its own resolution (no crop size: the pair as it is). The reference resizes PIL images; on
tensors, antialiased bilinear gives PIL's bilinear and ``NEAREST_EXACT`` PIL's nearest (the
source pixel whose centre is nearest; torchvision's ``NEAREST`` floors, shifting the mask by
up to half a pixel).

Random draws come from an explicit ``torch.Generator`` that the dataset seeds per sample and
epoch, so augmentation is the same in any loader worker and after a resume.
"""
from __future__ import annotations

import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float], generator: torch.Generator
                            ) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn as torchvision's RandomResizedCrop does: ten tries at a box of
    random area and aspect ratio inside the image, else the central box of clamped ratio."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    def __init__(self, crop_size: int, scale: tuple[float, float] = (0.5, 2.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5) -> None:
        self.crop_size = crop_size
        self.scale = scale
        self.ratio = ratio
        self.flip_prob = flip_prob

    def __call__(self, image: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        top, left, h, w = random_resized_crop_box(*image.shape[-2:], self.scale, self.ratio, generator)
        size = [self.crop_size, self.crop_size]
        image = F.resized_crop(image, top, left, h, w, size, InterpolationMode.BILINEAR, antialias=True)
        mask = F.resized_crop(mask[None], top, left, h, w, size, InterpolationMode.NEAREST_EXACT)[0]
        if torch.rand((), generator=generator) < self.flip_prob:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


class EvalTransform:
    def __init__(self, crop_size: int | None) -> None:
        self.crop_size = crop_size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.crop_size is None:
            return image, mask
        if min(image.shape[-2:]) != self.crop_size:
            image = F.resize(image, [self.crop_size], InterpolationMode.BILINEAR, antialias=True)
            mask = F.resize(mask[None], [self.crop_size], InterpolationMode.NEAREST_EXACT)[0]
        size = [self.crop_size, self.crop_size]
        return F.center_crop(image, size), F.center_crop(mask[None], size)[0]
