"""Readers for the standard on-disk layouts, and the per-step torch dataset.

* Pascal VOC 2012 with the SBD augmentation::

      <root>/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
      <root>/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png   (train; SegmentationClass as fallback)
      <root>/VOCdevkit/VOC2012/SegmentationClass/<id>.png      (val; SegmentationClassAug as fallback)
      <root>/VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt   (10,582 ids)
      <root>/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt         (1,449 ids)

  The train list may also be mmsegmentation's ``ImageSets/Segmentation/trainaug.txt``, or
  either list the MiB reference's ``splits/train_aug.txt`` and ``splits/val.txt`` (the first
  found of ``VOC_LISTS``). A list line is an image id, or (the reference code's format) an
  image path and a mask path relative to VOC2012; list files are UTF-8 (a byte-order mark is
  dropped). No list may name an id twice, nor the train list a val id. ``<root>`` may also be
  the VOC2012 folder itself, or any folder holding ``JPEGImages`` as VOC2012 does: MiB's
  ``PascalVOC12``, with its ``splits`` beside, or the folder holding that ``PascalVOC12``
  (what MiB's ``--data_root`` names).
* ADE20K SceneParsing::

      <root>/ADEChallengeData2016/images/{training,validation}/<id>.jpg
      <root>/ADEChallengeData2016/annotations/{training,validation}/<id>.png

  Each image is a sample; an annotation without an image is refused. Annotation value 0 is
  "other", used as background (see ``datasets_info``).
"""
from __future__ import annotations

import codecs
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .datasets_info import DATASET_INFO, IGNORE_INDEX, DatasetInfo
from .errors import DatasetError
from .registry import DATASETS
from .seeds import derive_seed
from .synth import PARAMS_FILE as SYNTH_PARAMS_FILE

SPLITS = ('train', 'val')

# Where a VOC list's id finds its mask, in order of preference. mmsegmentation's converter
# (tools/dataset_converters/voc_aug.py) writes SBD's mask of every SBD image into
# SegmentationClassAug, val images included, and SBD's masks have no 255 boundary band: val
# is scored against VOC's own masks, in SegmentationClass, wherever they are.
VOC_MASK_FOLDERS = {'train': ('SegmentationClassAug', 'SegmentationClass'),
                    'val': ('SegmentationClass', 'SegmentationClassAug')}
# Where a split's list is looked for in the VOC2012 folder, in this order: the usual name,
# mmsegmentation's (voc_aug.py writes trainaug.txt), and the MiB reference's download
# (data/download_voc.sh unpacks DeepLab's list.zip as splits/ beside JPEGImages).
VOC_LISTS = {'train': ('ImageSets/Segmentation/train_aug.txt',
                       'ImageSets/Segmentation/trainaug.txt', 'splits/train_aug.txt'),
             'val': ('ImageSets/Segmentation/val.txt', 'splits/val.txt')}


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    mask: Path


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f'{path}: {what} not found')
    return path


def _voc2012_dir(root: Path) -> Path:
    for candidate in (root / 'VOCdevkit' / 'VOC2012', root / 'PascalVOC12', root):
        if (candidate / 'JPEGImages').is_dir():
            return candidate
    if (root / 'ADEChallengeData2016').is_dir() or (root / 'images' / 'training').is_dir():
        raise DatasetError(f'{root}: this is an ADE20K tree, but the protocol needs Pascal VOC '
                           f'(VOCdevkit/VOC2012/JPEGImages)')
    raise DatasetError(f'{root}: not a Pascal VOC root (no VOCdevkit/VOC2012/JPEGImages, '
                       f'PascalVOC12/JPEGImages or JPEGImages inside)')


def _ade_dir(root: Path) -> Path:
    for candidate in (root / 'ADEChallengeData2016', root):
        if (candidate / 'images' / 'training').is_dir():
            return candidate
    if (root / 'VOCdevkit').is_dir() or (root / 'JPEGImages').is_dir():
        raise DatasetError(f'{root}: this is a Pascal VOC tree, but the protocol needs ADE20K '
                           f'(ADEChallengeData2016/images/training)')
    raise DatasetError(f'{root}: not an ADE20K root (no ADEChallengeData2016/images/training inside)')


def _read_list_lines(list_file: Path) -> list[str]:
    """The list file's lines, read as UTF-8 (a leading byte-order mark dropped: Notepad's
    "UTF-8 with BOM" would otherwise glue it to the first id)."""
    data = list_file.read_bytes()
    try:
        return data.decode('utf-8-sig').splitlines()
    except UnicodeDecodeError as e:   # its offset counts from after the mark
        offset = e.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        raise DatasetError(f'{list_file}: not UTF-8 text (byte {offset}: {e.reason}); save it as '
                           f'UTF-8') from None


def _voc_list_file(base: Path, split: str) -> Path:
    """The first of the split's ``VOC_LISTS`` that the VOC2012 folder holds."""
    candidates = [base / name for name in VOC_LISTS[split]]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise DatasetError(f'{base}: no {split} list file (looked for '
                           f'{", ".join(str(path) for path in candidates)})')
    return found


def _voc_list_samples(base: Path, list_file: Path, split: str) -> list[Sample]:
    """The samples that ``list_file`` names, in its order."""
    mask_dirs = [base / name for name in VOC_MASK_FOLDERS[split] if (base / name).is_dir()]
    if not mask_dirs:
        raise DatasetError(f'{base}: neither SegmentationClassAug nor SegmentationClass found')
    samples = []
    for line_no, line in enumerate(_read_list_lines(list_file), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 2:
            image, mask = base / parts[0].lstrip('/'), base / parts[1].lstrip('/')
            sample_id = image.stem
        elif len(parts) == 1:
            sample_id = parts[0]
            image = base / 'JPEGImages' / f'{sample_id}.jpg'
            mask = next((d / f'{sample_id}.png' for d in mask_dirs
                         if (d / f'{sample_id}.png').exists()), mask_dirs[0] / f'{sample_id}.png')
        else:
            raise DatasetError(f'{list_file}:{line_no}: expected an id or two paths, got {line!r}')
        samples.append(Sample(sample_id, image, mask))
    if not samples:
        raise DatasetError(f'{list_file}: list file is empty')
    return samples


def _refuse_ids_listed_twice(list_file: Path, samples: list[Sample]) -> None:
    twice = [i for i, n in Counter(s.id for s in samples).items() if n > 1]   # list order
    if twice:
        raise DatasetError(f'{list_file}: {len(twice)} id(s) listed more than once, the first '
                           f'{twice[0]!r}')


def _refuse_val_ids_in_train(list_files: dict[str, Path], samples: dict[str, list[Sample]]) -> None:
    """A model trained on val images would be scored on what it learned (a test-set leak)."""
    val_ids = {s.id for s in samples['val']}
    leaked = [s.id for s in samples['train'] if s.id in val_ids]
    if leaked:
        raise DatasetError(f"{list_files['train']}: {len(leaked)} id(s) of the val list "
                           f"({list_files['val']}) listed for training, the first {leaked[0]!r}")


def is_synthetic(root: Path) -> bool:
    """Whether the VOC-layout folder ``root`` is one that ``cssbench make-synth`` wrote (False
    for a folder that is none: the reader says what is wrong with it)."""
    try:
        return (_voc2012_dir(root) / SYNTH_PARAMS_FILE).is_file()
    except DatasetError:
        return False


def _refuse_the_other_kind(root: Path, synthetic: bool) -> None:
    """The synthetic dataset and Pascal VOC share a layout, and a run on either would be
    tabled beside the other's published or stored numbers."""
    if is_synthetic(root) == synthetic:
        return
    if synthetic:
        raise DatasetError(f"{root}: not the synthetic dataset (no {SYNTH_PARAMS_FILE}, which "
                           f"make-synth writes last): synth-* protocols run on cssbench "
                           f"make-synth's folders (one it did not finish: run it again)")
    raise DatasetError(f'{root}: the synthetic dataset (it holds {SYNTH_PARAMS_FILE}): its '
                       f'protocols are synth-*')


def _voc_samples(root: Path, synthetic: bool) -> dict[str, list[Sample]]:
    base = _voc2012_dir(root)
    _refuse_the_other_kind(root, synthetic)
    list_files = {split: _voc_list_file(base, split) for split in SPLITS}
    samples = {split: _voc_list_samples(base, list_files[split], split) for split in SPLITS}
    for split in SPLITS:
        _refuse_ids_listed_twice(list_files[split], samples[split])
    _refuse_val_ids_in_train(list_files, samples)
    return samples


def _refuse_annotations_without_image(masks: Path, images: Path, image_ids: set[str]) -> None:
    """ADE20K's samples are its images: an annotation without one (a dataset half extracted)
    would be left out of the split unseen."""
    orphans = sorted(p for p in masks.glob('*.png') if p.stem not in image_ids)
    if orphans:
        raise DatasetError(f'{orphans[0]}: annotation without an image ({images / orphans[0].stem}'
                           f'.jpg not found; {len(orphans)} such annotation(s) in {masks})')


def _ade_split_samples(base: Path, split: str) -> list[Sample]:
    sub = 'training' if split == 'train' else 'validation'
    images = _require_dir(base / 'images' / sub, 'ADE20K image folder')
    masks = _require_dir(base / 'annotations' / sub, 'ADE20K annotation folder')
    image_files = sorted(images.glob('*.jpg'))
    _refuse_annotations_without_image(masks, images, {p.stem for p in image_files})
    samples = [Sample(p.stem, p, masks / f'{p.stem}.png') for p in image_files]
    if not samples:
        raise DatasetError(f'{images}: no .jpg images')
    return samples


def _ade_samples(root: Path) -> dict[str, list[Sample]]:
    base = _ade_dir(root)
    return {split: _ade_split_samples(base, split) for split in SPLITS}


def root_not_found(root: Path) -> str:
    """Why ``root``, not a folder, is no dataset root."""
    return ('a file, not a dataset root (a folder)' if root.exists()
            else 'dataset root not found')


def list_samples(info: DatasetInfo, root: str | Path) -> dict[str, list[Sample]]:
    """Each split's samples in list order. The lists are checked (no id twice, no val id in
    training) and every image and mask file is checked to exist, before anything is read."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f'{root}: {root_not_found(root)}')
    samples = _voc_samples(root, info.synthetic) if info.layout == 'voc' else _ade_samples(root)
    for split in SPLITS:
        missing = [(path, what, s.id) for s in samples[split]
                   for path, what in ((s.image, 'image'), (s.mask, 'mask')) if not path.is_file()]
        if missing:
            path, what, sample_id = missing[0]
            raise DatasetError(f'{path}: {what} of {sample_id!r} ({split} split) not found; '
                               f'{len(missing)} file(s) of the {split} split missing')
    return samples


def read_mask(path: Path) -> np.ndarray:
    """The mask's class ids as a uint8 array (palette PNGs give their indices)."""
    try:
        with Image.open(path) as im:
            if im.mode not in ('P', 'L'):
                raise DatasetError(f'{path}: mask must be a palette or greyscale PNG, not {im.mode}')
            return np.array(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f'{path}: cannot read mask ({e})') from None


def decoded_image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image, decoded whole: a file cut short (a copy interrupted)
    fails here, where its header alone would pass."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f'{path}: cannot read image ({e})') from None


def read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.array(im.convert('RGB'))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DatasetError(f'{path}: cannot read image ({e})') from None


def _to_channels(lut: np.ndarray, protocol, classes) -> np.ndarray:
    """Map each of ``classes`` to its output channel: its position in the protocol's order."""
    order = protocol.class_order
    for c in classes:
        lut[c] = order.index(c)
    return lut


def train_lut(protocol, step: int) -> np.ndarray:
    """Training targets at ``step``: the step's classes stay, every other class is background.

    Old and future classes both become 0, as in the reference code's masking
    (fcdl94/MiB dataset/voc.py). 255 follows the protocol's ``train_ignore``. Targets are
    output channels (the reference's ``inverted_order``), the class ids for ordered protocols.
    """
    lut = _to_channels(np.zeros(256, dtype=np.uint8), protocol, protocol.steps[step])
    lut[IGNORE_INDEX] = IGNORE_INDEX if protocol.train_ignore == 'ignore' else 0
    return lut


def eval_lut(protocol, step: int) -> np.ndarray:
    """Evaluation targets at ``step``: classes seen so far stay, unseen ones are ignored.

    This is the reference's test-time masking (masking value 255 for every class not yet
    seen); with the protocol's ``eval_unseen: background`` they are background instead
    (PLOP's). 255 stays ignored. Where the protocol's dataset does not score background
    (ADE20K), background is ignored, and so are the unseen classes it would hold.
    """
    unseen = 0 if protocol.eval_unseen == 'background' else IGNORE_INDEX
    lut = _to_channels(np.full(256, unseen, dtype=np.uint8), protocol, protocol.classes_seen(step))
    lut[IGNORE_INDEX] = IGNORE_INDEX
    if not DATASET_INFO[protocol.dataset].background_scored:
        lut[lut == 0] = IGNORE_INDEX
    return lut


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The random stream of one sample's augmentation in one epoch."""
    return torch.Generator().manual_seed(derive_seed(seed, epoch, index, bits=64))


@DATASETS.register_module()
class IncrementalSegDataset(Dataset):
    """Images and remapped masks of one step.

    ``transform(image, mask, generator)`` returns the pair transformed. An item is fetched by
    index or by ``(epoch, index)`` (see ``EpochKeyedSampler``); the augmentation's random
    stream is seeded from ``(seed, epoch, index)``, so it is the same in any loader worker
    and after a resume. Items are ``dict(inputs=uint8 CxHxW, data_samples=uint8 HxW)``: the
    model's data preprocessor normalises the image and widens the mask on the device, so
    only bytes cross the loader.
    """

    def __init__(self, samples: list[Sample], lut: np.ndarray, transform: Callable | None = None,
                 classes: tuple[str, ...] = (), seed: int = 0) -> None:
        self.samples = list(samples)
        self.metainfo = dict(classes=classes)
        self.lut = lut
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.samples[index]
        image = read_image(sample.image)
        mask = read_mask(sample.mask)
        if image.shape[:2] != mask.shape:
            raise DatasetError(f'{sample.mask}: mask size {mask.shape[1]}x{mask.shape[0]} differs '
                               f'from image size {image.shape[1]}x{image.shape[0]}')
        image_t = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        mask_t = torch.from_numpy(self.lut[mask])
        if self.transform is not None:
            image_t, mask_t = self.transform(image_t, mask_t, sample_generator(self.seed, epoch, index))
        return dict(inputs=image_t, data_samples=mask_t)
