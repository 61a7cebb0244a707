"""Tests of label remapping and the per-step torch dataset (benchmark/datasets.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from cssbench.datasets import IncrementalSegDataset, Sample, eval_lut, train_lut
from cssbench.errors import DatasetError
from cssbench.protocols import load_protocol, parse_protocol
from conftest import make_voc_tree, write_jpeg, write_mask_png


@pytest.fixture
def p15_1():
    return load_protocol('voc-15-1-overlap')


def test_train_lut_step2_default_background(p15_1) -> None:
    lut = train_lut(p15_1, 2)
    assert lut.shape == (256,) and lut.dtype == np.uint8
    assert lut[17] == 17
    assert lut[0] == 0
    assert lut[1] == 0 and lut[15] == 0          # old classes -> background
    assert lut[16] == 0                          # old single-class step -> background
    assert lut[18] == 0 and lut[20] == 0         # future classes -> background
    assert lut[255] == 0                         # reference behaviour: 255 trained as bg
    # exactly one value is not mapped to 0
    assert np.flatnonzero(lut).tolist() == [17]


def test_train_lut_step0(p15_1) -> None:
    lut = train_lut(p15_1, 0)
    assert lut[:16].tolist() == list(range(16))
    assert lut[16:21].tolist() == [0, 0, 0, 0, 0]
    assert lut[255] == 0


def test_train_lut_ignore(p15_1) -> None:
    p = dataclasses.replace(p15_1, train_ignore='ignore')
    lut = train_lut(p, 2)
    assert lut[255] == 255
    assert lut[17] == 17 and lut[0] == 0 and lut[16] == 0 and lut[18] == 0


def test_train_lut_ignore_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / 'plop.yaml'
    path.write_text('name: plop\ndataset: voc\nmode: overlap\ntrain_ignore: ignore\n'
                    'steps: ["0-15", 16, 17, 18, 19, 20]\n')
    lut = train_lut(load_protocol(str(path)), 2)
    assert lut[255] == 255 and lut[17] == 17 and lut[1] == 0


def test_eval_lut_step2(p15_1) -> None:
    lut = eval_lut(p15_1, 2)
    assert lut[:18].tolist() == list(range(18))
    assert lut[18:21].tolist() == [255, 255, 255]
    assert lut[255] == 255
    assert lut[21:255].tolist() == [255] * 234


def test_eval_lut_unseen_as_background(p15_1) -> None:
    # PLOP's evaluation: classes not yet learned are background; 255 stays ignored
    lut = eval_lut(dataclasses.replace(p15_1, eval_unseen='background'), 2)
    assert lut[:18].tolist() == list(range(18))
    assert lut[18:21].tolist() == [0, 0, 0]
    assert lut[255] == 255
    assert (eval_lut(dataclasses.replace(p15_1, eval_unseen='background'), 5)[:21]
            == eval_lut(p15_1, 5)[:21]).all()   # the last step has no unseen class
    # ADE20K ignores background in evaluation, and so the unseen classes it would hold
    ade = dataclasses.replace(load_protocol('ade-100-10'), eval_unseen='background')
    assert eval_lut(ade, 1)[[0, 111, 150, 255]].tolist() == [255, 255, 255, 255]


def test_eval_lut_ignores_background_on_ade() -> None:
    lut = eval_lut(load_protocol('ade-100-10'), 1)
    assert lut[0] == 255
    assert lut[1:111].tolist() == list(range(1, 111))
    assert lut[111:].tolist() == [255] * 145


def test_luts_map_to_output_channels_for_unordered_protocol() -> None:
    # class order 0..15, 20, 16, 17, 18, 19: class 20 is output channel 16
    p = parse_protocol(dict(name='x', dataset='voc', mode='overlap', steps=['0-15', 20, '16-19']))
    t1 = train_lut(p, 1)
    assert t1[20] == 16
    assert np.flatnonzero(t1).tolist() == [20]
    e1 = eval_lut(p, 1)
    assert e1[20] == 16
    assert e1[16:20].tolist() == [255, 255, 255, 255]
    t2 = train_lut(p, 2)
    assert t2[16:21].tolist() == [17, 18, 19, 20, 0]
    e2 = eval_lut(p, 2)
    assert e2[16:21].tolist() == [17, 18, 19, 20, 16]


# --- IncrementalSegDataset -----------------------------------------------------------------

MASK = np.array([[0, 1, 16, 17],
                 [17, 18, 255, 0],
                 [20, 17, 17, 1]], dtype=np.uint8)   # 3 rows x 4 columns


@pytest.fixture
def tiny(tmp_path: Path) -> list[Sample]:
    root = make_voc_tree(tmp_path / 'voc', {'a': MASK}, {'b': MASK})
    base = root / 'VOCdevkit' / 'VOC2012'
    return [Sample('a', base / 'JPEGImages' / 'a.jpg', base / 'SegmentationClassAug' / 'a.png')]


def test_dataset_item_train(tiny, p15_1) -> None:
    ds = IncrementalSegDataset(tiny, train_lut(p15_1, 2))
    assert len(ds) == 1
    item = ds[0]
    assert set(item) == {'inputs', 'data_samples'}
    img, mask = item['inputs'], item['data_samples']
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 3, 4)
    assert mask.dtype == torch.uint8 and tuple(mask.shape) == (3, 4)  # widened on the device
    assert mask.tolist() == [[0, 0, 0, 17],
                             [17, 0, 0, 0],
                             [0, 17, 17, 0]]


def test_dataset_item_eval(tiny, p15_1) -> None:
    item = IncrementalSegDataset(tiny, eval_lut(p15_1, 2))[0]
    assert item['data_samples'].tolist() == [[0, 1, 16, 17],
                                             [17, 255, 255, 0],
                                             [255, 17, 17, 1]]


def test_dataset_transform_applied(tiny, p15_1) -> None:
    def flip(image, mask, generator):
        assert isinstance(generator, torch.Generator)
        return image.flip(-1), mask.flip(-1)

    item = IncrementalSegDataset(tiny, eval_lut(p15_1, 5), transform=flip)[0]
    assert item['data_samples'].tolist() == [[17, 16, 1, 0],
                                             [0, 255, 18, 17],
                                             [1, 17, 17, 20]]
    assert item['data_samples'].dtype == torch.uint8


def test_dataset_size_mismatch(tmp_path: Path, p15_1) -> None:
    image, mask = tmp_path / 'a.jpg', tmp_path / 'a.png'
    write_jpeg(image, 4, 4)
    write_mask_png(mask, np.zeros((4, 5), dtype=np.uint8))
    ds = IncrementalSegDataset([Sample('a', image, mask)], train_lut(p15_1, 0))
    with pytest.raises(DatasetError) as e:
        ds[0]
    assert str(mask) in str(e.value)
    assert '5x4' in str(e.value) and '4x4' in str(e.value)


def _truncated_jpeg(path: Path) -> None:
    write_jpeg(path, 64, 64)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _garbage_bytes(path: Path) -> None:
    path.write_bytes(b'not a jpeg at all')


@pytest.mark.parametrize('corrupt', [_truncated_jpeg, _garbage_bytes])
def test_dataset_unreadable_image_names_the_file(tmp_path: Path, p15_1, corrupt) -> None:
    image, mask = tmp_path / 'a.jpg', tmp_path / 'a.png'
    corrupt(image)
    write_mask_png(mask, np.zeros((64, 64), dtype=np.uint8))
    ds = IncrementalSegDataset([Sample('a', image, mask)], train_lut(p15_1, 0))
    with pytest.raises(DatasetError) as e:
        ds[0]
    assert str(image) in str(e.value)


def test_dataset_rgb_mask_rejected(tmp_path: Path, p15_1) -> None:
    from PIL import Image
    image, mask = tmp_path / 'a.jpg', tmp_path / 'a.png'
    write_jpeg(image, 4, 4)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(mask)
    ds = IncrementalSegDataset([Sample('a', image, mask)], train_lut(p15_1, 0))
    with pytest.raises(DatasetError) as e:
        ds[0]
    assert str(mask) in str(e.value) and 'RGB' in str(e.value)


@pytest.mark.parametrize('dataset, first, later', [('voc', '1-15', '16-20'),
                                                   ('ade', '1-100', '101-150')])
def test_background_is_channel_0_wherever_step_0_lists_it(dataset, first, later) -> None:
    """The reference orders the channels [0] + labels_old + labels whatever the task's list
    order: a step 0 written with background last trains and scores as one written with it first."""
    last = parse_protocol(dict(name='x', dataset=dataset, mode='overlap', steps=[[first, 0], later]))
    usual = parse_protocol(dict(name='x', dataset=dataset, mode='overlap', steps=[f'0-{first[2:]}', later]))
    assert last.class_order[0] == 0
    for step in (0, 1):
        assert train_lut(last, step).tolist() == train_lut(usual, step).tolist()
        assert eval_lut(last, step).tolist() == eval_lut(usual, step).tolist()
    # step 1: an old class (3) and the 255 band are background (channel 0), not class 1
    lut = train_lut(last, 1)
    assert lut[3] == 0 and lut[0] == 0
    n_first = len(last.steps[0])
    assert sorted(np.unique(lut).tolist()) == [0, *range(n_first, len(last.class_order))]
    # evaluation: class 1 is scored at channel 1; on ADE class 0 alone is ignored
    scored = eval_lut(last, 0)
    assert scored[1] == 1
    assert scored[0] == (255 if dataset == 'ade' else 0)
