"""Paired image/mask transforms of the reference training and evaluation (on uint8 tensors).

Training follows fcdl94/MiB run.py: RandomResizedCrop(crop, scale=(0.5, 2.0)) with the
image bilinear and the mask nearest, then a horizontal flip with p=0.5. Evaluation is the
reference's legacy preset, Resize(shorter side = crop) then CenterCrop(crop).
"""
from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as F


class TrainTransform:
    def __init__(self, crop_size: int, scale: tuple[float, float] = (0.5, 2.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5) -> None:
        self.crop_size = crop_size
        self.scale = scale
        self.ratio = ratio
        self.flip_prob = flip_prob

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top, left, h, w = RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        size = [self.crop_size, self.crop_size]
        image = F.resized_crop(image, top, left, h, w, size, InterpolationMode.BILINEAR, antialias=True)
        mask = F.resized_crop(mask[None], top, left, h, w, size, InterpolationMode.NEAREST)[0]
        if torch.rand(()) < self.flip_prob:
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


class EvalTransform:
    def __init__(self, crop_size: int) -> None:
        self.crop_size = crop_size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if min(image.shape[-2:]) != self.crop_size:
            image = F.resize(image, [self.crop_size], InterpolationMode.BILINEAR, antialias=True)
            mask = F.resize(mask[None], [self.crop_size], InterpolationMode.NEAREST)[0]
        size = [self.crop_size, self.crop_size]
        return F.center_crop(image, size), F.center_crop(mask[None], size)[0]
