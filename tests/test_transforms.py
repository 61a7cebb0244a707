"""Training augmentation: torchvision's crop-box rule, seeded per (seed, epoch, index)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cssbench.datasets import IncrementalSegDataset, Sample, sample_generator
from cssbench.transforms import EvalTransform, TrainTransform, random_resized_crop_box
from conftest import write_jpeg, write_mask_png


def test_crop_box_lies_inside_the_image_with_area_and_ratio_in_range():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(60, 80, (0.5, 1.0), (3 / 4, 4 / 3), gen)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.5 * 4800 * 0.9 <= h * w <= 4800
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def test_crop_box_falls_back_to_the_central_box_when_no_try_fits():
    # Scale 5-6x the image area never fits: the fallback is the centre, ratio clamped to 4/3.
    gen = torch.Generator().manual_seed(0)
    assert random_resized_crop_box(10, 40, (5.0, 6.0), (3 / 4, 4 / 3), gen) == (0, 13, 10, 13)
    assert random_resized_crop_box(30, 30, (5.0, 6.0), (3 / 4, 4 / 3), gen) == (0, 0, 30, 30)


def test_train_transform_output_size_and_mask_values_kept():
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)
    mask = torch.zeros(48, 64, dtype=torch.uint8)
    mask[10:30, 20:40] = 7
    mask[0, :] = 255
    out_image, out_mask = TrainTransform(32)(image, mask, torch.Generator().manual_seed(1))
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)
    assert set(out_mask.unique().tolist()) <= {0, 7, 255}   # nearest: no blended label values


def test_eval_transform_resizes_the_shorter_side_then_centre_crops():
    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    mask = torch.zeros(40, 80, dtype=torch.uint8)
    mask[:, 40:] = 1
    out_image, out_mask = EvalTransform(20)(image, mask)
    assert out_image.shape == (3, 20, 20)
    assert out_mask[:, :10].eq(0).all() and out_mask[:, 10:].eq(1).all()


def _labelled_stripes(height: int, width: int) -> np.ndarray:
    """Bands 7 px wide and 11 px high: a label boundary every few pixels."""
    columns = (np.arange(width)[None, :] // 7) % 21
    rows = (np.arange(height)[:, None] // 11) % 2
    return (columns * (1 - rows) + rows * 20).astype(np.uint8)


def _as_tensors(mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    image = (mask.astype(np.int32) * 12 % 256).astype(np.uint8)
    return torch.from_numpy(np.stack([image, 255 - image, image // 2])), torch.from_numpy(mask)


def _pil(array: np.ndarray, size_wh: tuple[int, int], box: tuple[int, int, int, int],
         resample) -> np.ndarray:
    """The reference's PIL path: crop (top, left, h, w), then resize."""
    top, left, h, w = box
    channels_last = array.transpose(1, 2, 0) if array.ndim == 3 else array
    cropped = Image.fromarray(channels_last).crop((left, top, left + w, top + h))
    out = np.asarray(cropped.resize(size_wh, resample))
    return out.transpose(2, 0, 1) if array.ndim == 3 else out


def test_eval_transform_matches_the_references_pil_resize_and_centre_crop():
    # A VOC-sized image, the papers' crop: PIL resizes the shorter side to 512 (bilinear /
    # nearest), then the central 512 x 512 is kept. Nearest must pick the pixel whose centre
    # is nearest (PIL's rule), or the labels shift by up to half a pixel against the image.
    mask = _labelled_stripes(375, 500)
    image, mask_tensor = _as_tensors(mask)
    out_image, out_mask = EvalTransform(512)(image, mask_tensor)
    resized_width = int(512 * 500 / 375)
    left = round((resized_width - 512) / 2)
    whole = (0, 0, 375, 500)
    expected_mask = _pil(mask, (resized_width, 512), whole, Image.NEAREST)[:, left:left + 512]
    expected_image = _pil(image.numpy(), (resized_width, 512), whole, Image.BILINEAR)
    assert np.array_equal(out_mask.numpy(), expected_mask)
    difference = np.abs(out_image.numpy().astype(int) - expected_image[:, :, left:left + 512])
    assert difference.max() <= 1


def test_train_transform_matches_the_references_pil_resized_crop():
    mask = _labelled_stripes(375, 500)
    image, mask_tensor = _as_tensors(mask)
    for seed in range(3):
        box = random_resized_crop_box(375, 500, (0.5, 2.0), (3 / 4, 4 / 3),
                                      torch.Generator().manual_seed(seed))
        out_image, out_mask = TrainTransform(96, flip_prob=0.0)(
            image, mask_tensor, torch.Generator().manual_seed(seed))
        assert np.array_equal(out_mask.numpy(), _pil(mask, (96, 96), box, Image.NEAREST))
        difference = out_image.numpy().astype(int) - _pil(image.numpy(), (96, 96), box, Image.BILINEAR)
        assert np.abs(difference).max() <= 1


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    image, mask = tmp_path / 'a.jpg', tmp_path / 'a.png'
    write_jpeg(image, 64, 64)
    write_mask_png(mask, np.arange(64 * 64, dtype=np.uint8).reshape(64, 64) % 21)
    lut = np.arange(256, dtype=np.uint8)
    ds = IncrementalSegDataset([Sample('a', image, mask)], lut, TrainTransform(32), seed=5)

    first, again = ds[(3, 0)], ds[(3, 0)]
    assert torch.equal(first['inputs'], again['inputs'])
    assert torch.equal(first['data_samples'], again['data_samples'])
    other_epochs = [ds[(e, 0)]['data_samples'] for e in range(4, 8)]
    assert not all(torch.equal(first['data_samples'], o) for o in other_epochs)
    assert torch.equal(ds[0]['data_samples'], ds[(0, 0)]['data_samples'])
    # Same key, fresh generator: independent of any global RNG state.
    torch.manual_seed(123)
    assert torch.equal(ds[(3, 0)]['data_samples'], first['data_samples'])
    assert sample_generator(5, 3, 0).initial_seed() == sample_generator(5, 3, 0).initial_seed()
    assert sample_generator(5, 3, 0).initial_seed() != sample_generator(5, 4, 0).initial_seed()
