"""Tests of per-step image selection (benchmark/splits.py) on a hand-built tiny VOC tree."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

import cssbench.splits as splits
from cssbench.cli import main
from cssbench.datasets import eval_lut, train_lut
from cssbench.errors import DatasetError
from cssbench.metrics import range_label
from cssbench.protocols import available_protocols, load_protocol
from cssbench.splits import (compute_splits, index_dataset, keep_for_step, protocol_splits,
                             resolve_data_root)
from conftest import make_voc_tree, mask_with

# Label sets chosen so that each rule (current class present / only bg / future class /
# old class / 255) changes the answer for some image and step.
TRAIN_LABELS = {
    't0': {0, 1},
    't1': {0, 16},
    't2': {0, 1, 16},
    't3': {0, 1, 19},
    't4': {0, 16, 19},
    't5': {0, 17, 255},
    't6': {0, 19},
    't7': {0},
    't8': {1, 20},
    't9': {0, 255},
}
VAL_LABELS = {
    'v0': {0, 1},
    'v1': {0, 16},
    'v2': {0, 255},
    'v3': {0, 20},
    'v4': {17, 255},
    'v5': {0},
}

# Protocol steps: 0-15 | 16-18 | 19-20, counted by hand from the label sets above.
EXPECTED_TRAIN = {
    'overlap': [['t0', 't2', 't3', 't8'],
                ['t1', 't2', 't4', 't5'],
                ['t3', 't4', 't6', 't8']],
    'disjoint': [['t0'],
                 ['t1', 't2', 't5'],
                 ['t3', 't4', 't6', 't8']],
}
EXPECTED_VAL = [['v0'],
                ['v0', 'v1', 'v4'],
                ['v0', 'v1', 'v3', 'v4']]


def write_protocol(tmp_path: Path, mode: str) -> Path:
    path = tmp_path / f'three-{mode}.yaml'
    path.write_text(f'name: three-{mode}\ndataset: voc\nmode: {mode}\n'
                    'steps: ["0-15", "16-18", "19-20"]\n')
    return path


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    return make_voc_tree(tmp_path / 'voc',
                         {k: mask_with(v) for k, v in TRAIN_LABELS.items()},
                         {k: mask_with(v) for k, v in VAL_LABELS.items()})


def test_index_reads_label_sets(voc_root: Path) -> None:
    index = index_dataset('voc', voc_root, progress=False)
    assert index.dataset == 'voc'
    assert [s.id for s in index.samples['train']] == ['t0', 't1', 't2', 't3', 't4', 't5', 't6',
                                                      't7', 't8', 't9']
    assert [s.id for s in index.samples['val']] == ['v0', 'v1', 'v2', 'v3', 'v4', 'v5']
    assert index.label_sets['train']['t5'] == (0, 17, 255)
    assert index.label_sets['train']['t8'] == (1, 20)
    assert index.label_sets['val']['v4'] == (17, 255)
    s = index.samples['train'][0]
    assert s.image == voc_root / 'VOCdevkit/VOC2012/JPEGImages/t0.jpg'
    assert s.mask == voc_root / 'VOCdevkit/VOC2012/SegmentationClassAug/t0.png'


def test_val_masks_come_from_segmentation_class_first_train_masks_from_aug(voc_root: Path) -> None:
    # mmsegmentation's voc_aug.py converts SBD's mask of every SBD image into
    # SegmentationClassAug, val images too: val is scored against VOC's own, SegmentationClass
    from conftest import write_mask_png
    base = voc_root / 'VOCdevkit/VOC2012'
    (base / 'SegmentationClass').mkdir()
    for sample_id in ('t0', 'v0'):   # VOC's own masks, with their boundary band
        write_mask_png(base / 'SegmentationClass' / f'{sample_id}.png', mask_with({0, 2, 255}))
    index = index_dataset('voc', voc_root, progress=False)
    samples = {split: {s.id: s.mask for s in index.samples[split]} for split in ('train', 'val')}
    assert samples['val']['v0'] == base / 'SegmentationClass/v0.png'
    assert index.label_sets['val']['v0'] == (0, 2, 255)
    assert samples['val']['v1'] == base / 'SegmentationClassAug/v1.png'   # none in VOC's own
    assert samples['train']['t0'] == base / 'SegmentationClassAug/t0.png'
    assert index.label_sets['train']['t0'] == (0, 1)


def test_index_accepts_voc2012_folder_as_root(voc_root: Path) -> None:
    index = index_dataset('voc', voc_root / 'VOCdevkit' / 'VOC2012', progress=False)
    assert index.label_sets['train']['t2'] == (0, 1, 16)


@pytest.mark.parametrize('mode', ['overlap', 'disjoint'])
def test_compute_splits(tmp_path: Path, voc_root: Path, mode: str) -> None:
    protocol = load_protocol(str(write_protocol(tmp_path, mode)))
    index = index_dataset('voc', voc_root, progress=False)
    steps = compute_splits(protocol, index.label_sets)
    assert [s['step'] for s in steps] == [0, 1, 2]
    assert steps[0]['classes'] == list(range(16))
    assert steps[1]['classes'] == [16, 17, 18]
    assert steps[2]['classes'] == [19, 20]
    assert [s['train'] for s in steps] == EXPECTED_TRAIN[mode]
    assert [s['val'] for s in steps] == EXPECTED_VAL


def test_val_rule(tmp_path: Path, voc_root: Path) -> None:
    """Val at step t: images with a non-background class seen by t; never bg/255-only ones."""
    protocol = load_protocol(str(write_protocol(tmp_path, 'disjoint')))
    steps = compute_splits(protocol, index_dataset('voc', voc_root, progress=False).label_sets)
    for s in steps:
        assert 'v2' not in s['val'] and 'v5' not in s['val']   # {0,255} and {0}
    assert 'v1' not in steps[0]['val']                          # only a future class
    assert 'v4' in steps[1]['val']                              # no background needed


def test_protocol_splits_writes_cache(tmp_path: Path, voc_root: Path,
                                      isolated_cache: Path) -> None:
    protocol = load_protocol(str(write_protocol(tmp_path, 'overlap')))
    index = index_dataset('voc', voc_root, progress=False)
    assert not (isolated_cache / 'splits').exists() or not list((isolated_cache / 'splits').iterdir())
    steps = protocol_splits(protocol, index)
    assert [s['train'] for s in steps] == EXPECTED_TRAIN['overlap']
    files = list((isolated_cache / 'splits').iterdir())
    assert len(files) == 1 and files[0].suffix == '.json'
    stored = json.loads(files[0].read_text())
    assert [s['train'] for s in stored['steps']] == EXPECTED_TRAIN['overlap']
    assert [s['val'] for s in stored['steps']] == EXPECTED_VAL
    # the cached copy is what a second call returns
    assert protocol_splits(protocol, index) == steps
    # another mode is another cache entry
    other = load_protocol(str(write_protocol(tmp_path, 'disjoint')))
    assert [s['train'] for s in protocol_splits(other, index)] == EXPECTED_TRAIN['disjoint']
    assert len(list((isolated_cache / 'splits').iterdir())) == 2


def test_protocol_splits_rejects_other_dataset(voc_root: Path) -> None:
    index = index_dataset('voc', voc_root, progress=False)
    with pytest.raises(DatasetError, match='synth'):
        protocol_splits(load_protocol('synth-15-1-overlap'), index)


def test_the_scan_shows_no_progress_bar_where_stderr_is_no_terminal(voc_root: Path, capsys) -> None:
    index_dataset('voc', voc_root, progress=True)   # a log file would hold the bar's \r frames
    assert capsys.readouterr().err == ''


def test_index_is_cached(voc_root: Path, isolated_cache: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    first = index_dataset('voc', voc_root, progress=False)
    assert len(list((isolated_cache / 'scans').glob('*.json'))) == 2  # train and val

    def no_read(path):
        raise AssertionError(f'{path} re-read despite the cache')

    for reader in ('read_mask', 'decoded_image_size', 'file_sha256'):
        monkeypatch.setattr(splits, reader, no_read)
    second = index_dataset('voc', voc_root, progress=False)
    assert second.scans == first.scans
    assert second.fingerprint == first.fingerprint
    # list order survives the JSON round trip
    assert list(second.label_sets['train']) == list(TRAIN_LABELS)


def test_a_damaged_cache_entry_is_made_again(tmp_path: Path, voc_root: Path,
                                             isolated_cache: Path) -> None:
    protocol = load_protocol(str(write_protocol(tmp_path, 'overlap')))
    first = index_dataset('voc', voc_root, progress=False)
    steps = protocol_splits(protocol, first)
    train_scan, val_scan = sorted((isolated_cache / 'scans').iterdir())
    [split_file] = (isolated_cache / 'splits').iterdir()
    # cut short, another format (label sets alone, as an earlier version wrote), not a dict
    train_scan.write_text(train_scan.read_text()[:40])
    val_scan.write_text(json.dumps({i: [0, 1] for i in json.loads(val_scan.read_text())}))
    split_file.write_text('[1, 2]')
    again = index_dataset('voc', voc_root, progress=False)
    assert again.scans == first.scans and again.fingerprint == first.fingerprint
    assert protocol_splits(protocol, again) == steps
    assert json.loads(split_file.read_text())['steps'] == steps   # written anew
    for damaged in ({'steps': [{'step': 0}]}, {'steps': {'a': 1}}, {'steps': None},
                    {'steps': steps[:1]}):                       # JSON, but not the splits
        split_file.write_text(json.dumps(damaged))
        assert protocol_splits(protocol, again) == steps


def test_a_dataset_folder_from_the_environment_may_start_with_a_tilde(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv('HOME', str(tmp_path))
    monkeypatch.setenv('CSSBENCH_VOC_ROOT', '~/voc')
    with pytest.raises(DatasetError) as refused:
        resolve_data_root('voc', None)
    assert str(refused.value) == f'{tmp_path / "voc"}: dataset root not found (named by $CSSBENCH_VOC_ROOT)'
    (tmp_path / 'voc').write_text('')   # a file there: said so, where 'not found' misled
    with pytest.raises(DatasetError) as refused:
        resolve_data_root('voc', None)
    assert str(refused.value) == (f'{tmp_path / "voc"}: a file, not a dataset root (a folder) '
                                  f'(named by $CSSBENCH_VOC_ROOT)')
    (tmp_path / 'voc').unlink()
    (tmp_path / 'voc').mkdir()
    assert resolve_data_root('voc', None) == tmp_path / 'voc'


def test_a_scan_an_earlier_version_cached_is_made_again(voc_root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    image = next((voc_root / 'VOCdevkit' / 'VOC2012' / 'JPEGImages').glob('*.jpg'))
    image.write_bytes(image.read_bytes()[:-50])   # cut short, its header whole
    with monkeypatch.context() as earlier:   # version 1 read the header only
        earlier.setattr(splits, 'SCAN_VERSION', 1)
        earlier.setattr(splits, 'decoded_image_size', lambda path: PIL.Image.open(path).size)
        index_dataset('voc', voc_root, progress=False)
    with pytest.raises(DatasetError, match=f'{image}: cannot read image'):
        index_dataset('voc', voc_root, progress=False)


def _copy_voc_tree(voc_root: Path, to: Path) -> Path:
    shutil.copytree(voc_root, to)
    return to


def _replace_image(root: Path, sample_id: str, size: tuple[int, int] = (4, 4)) -> Path:
    """Another image for ``sample_id`` (other pixels), dated after the first."""
    from conftest import write_jpeg
    image = root / f'VOCdevkit/VOC2012/JPEGImages/{sample_id}.jpg'
    before = image.read_bytes()
    write_jpeg(image, *size, seed=1000)
    assert image.read_bytes() != before
    later = image.stat().st_mtime + 2
    os.utime(image, (later, later))  # a coarse file-system clock still sees a change
    return image


def test_fingerprint_covers_the_images_and_masks_bytes(voc_root: Path, tmp_path: Path) -> None:
    original = index_dataset('voc', voc_root, progress=False)
    copy = index_dataset('voc', _copy_voc_tree(voc_root, tmp_path / 'copy'), progress=False)
    assert copy.fingerprint == original.fingerprint   # another folder, the same bytes

    other_image = _copy_voc_tree(voc_root, tmp_path / 'other-image')
    _replace_image(other_image, 't3')
    index = index_dataset('voc', other_image, progress=False)
    assert index.label_sets == original.label_sets
    assert index.fingerprint != original.fingerprint

    from conftest import write_mask_png
    other_mask = _copy_voc_tree(voc_root, tmp_path / 'other-mask')
    mask_file = other_mask / 'VOCdevkit/VOC2012/SegmentationClassAug/v0.png'
    flipped = mask_with({0, 1})[:, ::-1]   # the same classes, other pixels
    assert not np.array_equal(flipped, mask_with({0, 1}))
    write_mask_png(mask_file, flipped)
    index = index_dataset('voc', other_mask, progress=False)
    assert index.label_sets == original.label_sets
    assert index.fingerprint != original.fingerprint


def test_changed_image_is_scanned_again(voc_root: Path) -> None:
    first = index_dataset('voc', voc_root, progress=False)
    _replace_image(voc_root, 't3')
    second = index_dataset('voc', voc_root, progress=False)
    assert second.scans['train']['t3'].image_sha256 != first.scans['train']['t3'].image_sha256
    assert second.fingerprint != first.fingerprint
    # an image of another size than its mask is found by the scan it causes
    image = _replace_image(voc_root, 't3', size=(4, 6))
    with pytest.raises(DatasetError) as e:
        index_dataset('voc', voc_root, progress=False)
    assert str(image) in str(e.value) and '6x4' in str(e.value)


def test_changed_mask_invalidates_index_cache(voc_root: Path) -> None:
    first = index_dataset('voc', voc_root, progress=False)
    from conftest import write_mask_png
    mask_file = voc_root / 'VOCdevkit/VOC2012/SegmentationClassAug/t7.png'
    write_mask_png(mask_file, mask_with({0, 2, 3}))
    later = mask_file.stat().st_mtime + 2
    os.utime(mask_file, (later, later))  # a coarse file-system clock still sees a change
    second = index_dataset('voc', voc_root, progress=False)
    assert first.label_sets['train']['t7'] == (0,)
    assert second.label_sets['train']['t7'] == (0, 2, 3)
    assert second.fingerprint != first.fingerprint
    # rewritten to the same size: its modification time tells
    size = mask_file.stat().st_size
    write_mask_png(mask_file, mask_with({0, 2, 4}))
    assert mask_file.stat().st_size == size
    os.utime(mask_file, (later + 2, later + 2))
    assert index_dataset('voc', voc_root, progress=False).label_sets['train']['t7'] == (0, 2, 4)
    # replaced by another file of the same size and times (as `cp -p` or `rsync -a` replace)
    replacement = mask_file.with_name('t7.new.png')
    write_mask_png(replacement, mask_with({0, 2, 5}))
    assert replacement.stat().st_size == size
    os.utime(replacement, (later + 2, later + 2))
    os.replace(replacement, mask_file)
    assert index_dataset('voc', voc_root, progress=False).label_sets['train']['t7'] == (0, 2, 5)


def test_mask_and_image_of_different_sizes_fail_at_indexing(voc_root: Path) -> None:
    from conftest import write_mask_png
    mask_file = voc_root / 'VOCdevkit/VOC2012/SegmentationClassAug/t7.png'
    write_mask_png(mask_file, mask_with({0, 2, 3}, size=(4, 5)))
    with pytest.raises(DatasetError) as e:
        index_dataset('voc', voc_root, progress=False)
    assert str(mask_file) in str(e.value) and '5x4' in str(e.value) and '4x4' in str(e.value)


@pytest.mark.parametrize('labels, current, old, mode, expected', [
    ({0, 16}, {16}, set(range(16)), 'overlap', True),
    ({0, 16}, {16}, set(range(16)), 'disjoint', True),
    ({0}, set(range(16)), set(), 'overlap', False),            # background alone never counts
    ({0, 255}, set(range(16)), set(), 'overlap', False),
    ({0, 1}, {16}, set(range(16)), 'overlap', False),           # only an old class
    ({0, 17, 255}, {17}, set(range(17)), 'disjoint', True),     # 255 allowed
    ({0, 17, 18}, {17}, set(range(17)), 'disjoint', False),     # 18 is a future class
    ({0, 17, 18}, {17}, set(range(17)), 'overlap', True),
    ({3, 17}, {17}, set(range(17)), 'disjoint', True),          # old class allowed
    ({3, 17}, {17}, set(), 'disjoint', False),                  # ... only if it is old
    ({17}, {17}, set(), 'disjoint', True),                      # no background needed
    ((0, 1, 2), {0, 1, 2}, set(), 'disjoint', True),            # tuples accepted
])
def test_keep_for_step(labels, current, old, mode, expected) -> None:
    assert keep_for_step(labels, current, old, mode) is expected


@pytest.mark.parametrize('mode', ['overlap', 'disjoint'])
def test_cli_splits(tmp_path: Path, voc_root: Path, mode: str, capsys) -> None:
    from cssbench.cli import main
    out = tmp_path / 'out' / 'splits.json'
    rc = main(['splits', '--protocol', str(write_protocol(tmp_path, mode)),
               '--data-root', str(voc_root), '--out', str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data['protocol'] == f'three-{mode}'
    assert [data['steps'][i]['train'] for i in range(3)] == EXPECTED_TRAIN[mode]
    assert [data['steps'][i]['val'] for i in range(3)] == EXPECTED_VAL
    printed = capsys.readouterr().out
    assert f'three-{mode}' in printed


def test_cli_splits_notes_a_step_with_no_images(tmp_path: Path, voc_root: Path, capsys) -> None:
    from cssbench.cli import main
    path = tmp_path / 'no-18.yaml'   # no image, train or val, holds class 18
    path.write_text('name: no-18\ndataset: voc\nmode: overlap\nsteps: [[0, 18], "1-17", "19-20"]\n')
    assert main(['splits', '--protocol', str(path), '--data-root', str(voc_root)]) == 0
    printed = capsys.readouterr()
    assert printed.out.splitlines()[2].split() == ['0', '0', '0', '0,18']
    assert printed.err == ('cssbench: note: step 0 has no training or evaluation images: '
                           '`cssbench run` refuses this protocol on this data\n')


def test_cli_splits_bad_root_exits_2(tmp_path: Path, capsys) -> None:
    from cssbench.cli import main
    rc = main(['splits', '--protocol', str(write_protocol(tmp_path, 'overlap')),
               '--data-root', str(tmp_path / 'absent')])
    assert rc == 2
    assert str(tmp_path / 'absent') in capsys.readouterr().err


# --- errors --------------------------------------------------------------------------------

def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / 'nowhere'
    with pytest.raises(DatasetError) as e:
        index_dataset('voc', root, progress=False)
    assert str(root) in str(e.value)


def test_root_without_voc(tmp_path: Path) -> None:
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetError) as e:
        index_dataset('voc', tmp_path / 'empty', progress=False)
    assert str(tmp_path / 'empty') in str(e.value) and 'VOC' in str(e.value)


def test_missing_list_file(voc_root: Path) -> None:
    list_file = voc_root / 'VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt'
    list_file.unlink()
    with pytest.raises(DatasetError) as e:
        index_dataset('voc', voc_root, progress=False)
    assert str(list_file) in str(e.value)


def test_a_missing_train_list_names_every_place_looked_in(voc_root: Path) -> None:
    base = voc_root / 'VOCdevkit/VOC2012'
    (base / 'ImageSets/Segmentation/train_aug.txt').unlink()
    with pytest.raises(DatasetError) as e:
        index_dataset('voc', voc_root, progress=False)
    assert str(e.value) == (f'{base}: no train list file (looked for '
                            f'{base}/ImageSets/Segmentation/train_aug.txt, '
                            f'{base}/ImageSets/Segmentation/trainaug.txt, '
                            f'{base}/splits/train_aug.txt)')


def test_mmsegmentations_train_list_name(voc_root: Path) -> None:
    # tools/dataset_converters/voc_aug.py writes ImageSets/Segmentation/trainaug.txt
    lists = voc_root / 'VOCdevkit/VOC2012/ImageSets/Segmentation'
    (lists / 'train_aug.txt').rename(lists / 'trainaug.txt')
    index = index_dataset('voc', voc_root, progress=False)
    assert list(index.label_sets['train']) == list(TRAIN_LABELS)
    # with both, train_aug.txt is read
    (lists / 'train_aug.txt').write_text('t0\nt1\n')
    assert list(index_dataset('voc', voc_root, progress=False).label_sets['train']) == ['t0', 't1']


def test_mibs_download_layout(voc_root: Path, tmp_path: Path) -> None:
    """fcdl94/MiB data/download_voc.sh: VOC2012's contents in PascalVOC12, DeepLab's lists as
    splits/ beside them, in pair lines."""
    mib = tmp_path / 'PascalVOC12'
    (voc_root / 'VOCdevkit/VOC2012').rename(mib)
    shutil.rmtree(mib / 'ImageSets')
    (mib / 'splits').mkdir()
    for name, ids in (('train_aug.txt', TRAIN_LABELS), ('val.txt', VAL_LABELS)):
        (mib / 'splits' / name).write_text(
            ''.join(f'/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n' for i in ids))
    index = index_dataset('voc', mib, progress=False)
    assert list(index.label_sets['train']) == list(TRAIN_LABELS)
    assert list(index.label_sets['val']) == list(VAL_LABELS)
    assert index.samples['val'][0].mask == mib / 'SegmentationClassAug/v0.png'
    # or the folder holding PascalVOC12, as the reference's --data_root names it
    parent = index_dataset('voc', tmp_path, progress=False)
    assert parent.samples == index.samples and parent.fingerprint == index.fingerprint


def test_list_names_missing_image(voc_root: Path) -> None:
    list_file = voc_root / 'VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt'
    list_file.write_text(list_file.read_text() + 'ghost\n')
    with pytest.raises(DatasetError) as e:
        index_dataset('voc', voc_root, progress=False)
    assert str(voc_root / 'VOCdevkit/VOC2012/JPEGImages/ghost.jpg') in str(e.value)
    assert 'ghost' in str(e.value)


def test_a_list_file_starting_with_a_byte_order_mark(voc_root: Path) -> None:
    # Notepad's "UTF-8 with BOM": the mark is no part of the first id
    list_file = voc_root / 'VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt'
    list_file.write_text('\ufeff' + list_file.read_text(), encoding='utf-8')
    index = index_dataset('voc', voc_root, progress=False)
    assert list(index.label_sets['val']) == list(VAL_LABELS)


@pytest.mark.parametrize('list_name, lines, says', [
    ('train_aug.txt', ['t0', 't3', 't1', 't3', 't1', 't3'],
     "2 id(s) listed more than once, the first 't3'"),
    ('val.txt', ['v0', 'v1', 'v0'], "1 id(s) listed more than once, the first 'v0'"),
    ('train_aug.txt', ['t0', 'v4', 't1', 'v1'],   # a test-set leak
     "2 id(s) of the val list ({lists}/val.txt) listed for training, the first 'v4'"),
])
def test_a_list_naming_an_id_twice_or_val_ids_for_training_is_refused_before_a_scan(
        voc_root: Path, isolated_cache: Path, list_name, lines, says) -> None:
    lists = voc_root / 'VOCdevkit/VOC2012/ImageSets/Segmentation'
    (lists / list_name).write_text(''.join(f'{i}\n' for i in lines))
    with pytest.raises(DatasetError) as e:
        index_dataset('voc', voc_root, progress=False)
    assert str(e.value) == f'{lists / list_name}: ' + says.format(lists=lists)
    assert not (isolated_cache / 'scans').exists()   # not even the train split's


def test_list_names_missing_mask(voc_root: Path) -> None:
    """The first file missing, and how many (a dataset half extracted misses many: it named
    the first alone, where an ADE annotation without its image says how many)."""
    mask = voc_root / 'VOCdevkit/VOC2012/SegmentationClassAug/v3.png'
    mask.unlink()
    (voc_root / 'VOCdevkit/VOC2012/JPEGImages/v4.jpg').unlink()
    with pytest.raises(DatasetError) as e:
        index_dataset('voc', voc_root, progress=False)
    assert str(e.value) == f"{mask}: mask of 'v3' (val split) not found; 2 file(s) of the val split missing"


def test_mask_with_out_of_range_value(tmp_path: Path) -> None:
    root = make_voc_tree(tmp_path / 'voc', {'a': mask_with({0, 1}), 'b': mask_with({0, 42})},
                         {'c': mask_with({0, 1})})
    with pytest.raises(DatasetError) as e:
        index_dataset('voc', root, progress=False)
    msg = str(e.value)
    assert str(root / 'VOCdevkit/VOC2012/SegmentationClassAug/b.png') in msg
    assert '42' in msg


def test_a_mask_value_just_past_the_last_class_is_refused(tmp_path: Path) -> None:
    """VOC's classes are 0..20: 20 passes, and 21, the first value past them, is refused as 42
    is (a valid range one too long would take 21 for a class)."""
    root = make_voc_tree(tmp_path / 'voc', {'a': mask_with({0, 20}), 'b': mask_with({0, 21})},
                         {'c': mask_with({0, 1})})
    with pytest.raises(DatasetError, match=r'b\.png: mask holds value\(s\) \[21\]'):
        index_dataset('voc', root, progress=False)


def test_voc_tree_given_to_ade(voc_root: Path) -> None:
    with pytest.raises(DatasetError) as e:
        index_dataset('ade', voc_root, progress=False)
    assert 'VOC' in str(e.value)
    assert str(voc_root) in str(e.value)


def test_two_path_list_lines(tmp_path: Path) -> None:
    """The reference's list format: '<image path> <mask path>' relative to VOC2012."""
    root = make_voc_tree(tmp_path / 'voc', {'a': mask_with({0, 3}), 'b': mask_with({0, 20})},
                         {'c': mask_with({0, 1})})
    lists = root / 'VOCdevkit/VOC2012/ImageSets/Segmentation'
    (lists / 'train_aug.txt').write_text('/JPEGImages/b.jpg /SegmentationClassAug/b.png\n'
                                         '/JPEGImages/a.jpg /SegmentationClassAug/a.png\n')
    index = index_dataset('voc', root, progress=False)
    assert index.label_sets['train'] == {'b': (0, 20), 'a': (0, 3)}
    assert list(index.label_sets['train']) == ['b', 'a']


def test_protocol_splits_follows_reordered_list(voc_root: Path) -> None:
    protocol = load_protocol('voc-15-5-overlap')
    first = protocol_splits(protocol, index_dataset('voc', voc_root, progress=False))
    assert first[0]['train'] == ['t0', 't2', 't3', 't8']
    list_file = voc_root / 'VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt'
    list_file.write_text(''.join(f'{i}\n' for i in reversed(TRAIN_LABELS)))  # same ids, t9..t0
    index = index_dataset('voc', voc_root, progress=False)
    assert compute_splits(protocol, index.label_sets)[0]['train'] == ['t8', 't3', 't2', 't0']
    assert protocol_splits(protocol, index)[0]['train'] == ['t8', 't3', 't2', 't0']


def _make_ade_tree(root: Path) -> Path:
    from conftest import write_jpeg, write_mask_png
    base = root / 'ADEChallengeData2016'
    for sub, items in (('training', {'ADE_train_1': {0, 101}, 'ADE_train_2': {5, 150}}),
                       ('validation', {'ADE_val_1': {0, 3}})):
        (base / 'images' / sub).mkdir(parents=True)
        (base / 'annotations' / sub).mkdir(parents=True)
        for n, (i, labels) in enumerate(items.items()):
            write_jpeg(base / 'images' / sub / f'{i}.jpg', 4, 4, seed=n)
            write_mask_png(base / 'annotations' / sub / f'{i}.png', mask_with(labels))
    return root


def test_ade_tree_indexes_and_splits(tmp_path: Path) -> None:
    root = _make_ade_tree(tmp_path / 'ade')
    index = index_dataset('ade', root, progress=False)
    assert index.label_sets['train'] == {'ADE_train_1': (0, 101), 'ADE_train_2': (5, 150)}
    assert index.label_sets['val'] == {'ADE_val_1': (0, 3)}
    steps = protocol_splits(load_protocol('ade-100-50'), index)
    assert [s['train'] for s in steps] == [['ADE_train_2'], ['ADE_train_1', 'ADE_train_2']]
    assert [s['val'] for s in steps] == [['ADE_val_1'], ['ADE_val_1']]


def test_an_ade_annotation_without_its_image_is_refused(tmp_path: Path) -> None:
    # a half-extracted dataset: its annotations without images were left out unseen
    root = _make_ade_tree(tmp_path / 'ade')
    base = root / 'ADEChallengeData2016'
    (base / 'images/validation/ADE_val_1.jpg').unlink()
    annotations = base / 'annotations/validation'
    shutil.copy(annotations / 'ADE_val_1.png', annotations / 'ADE_val_0.png')
    with pytest.raises(DatasetError) as e:
        index_dataset('ade', root, progress=False)
    assert str(e.value) == (f'{base}/annotations/validation/ADE_val_0.png: annotation without an '
                            f'image ({base}/images/validation/ADE_val_0.jpg not found; 2 such '
                            f'annotation(s) in {annotations})')


def test_ade_tree_given_to_voc(tmp_path: Path) -> None:
    root = _make_ade_tree(tmp_path / 'ade')
    with pytest.raises(DatasetError) as e:
        index_dataset('voc', root, progress=False)
    assert 'ADE20K' in str(e.value) and str(root) in str(e.value)


def test_splits_command_prints_and_writes_the_classes_of_the_drawn_order_and_its_seed(
        synth32, tmp_path, capsys):
    out = tmp_path / 'splits.json'
    assert main(['splits', '--protocol', 'synth-15-1-overlap-random', '--seed', '1',
                 '--data-root', str(synth32), '--out', str(out)]) == 0
    drawn = load_protocol('synth-15-1-overlap-random').with_class_order(1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f'synth-15-1-overlap-random (overlap, class order drawn with seed 1) on {synth32}'
    rows = [line.split() for line in lines[2:-1]]
    assert [row[-1] for row in rows] == [range_label(step) for step in drawn.steps]
    assert rows[0][-1] != '0-15' and rows[1][-1] == str(drawn.steps[1][0])
    written = json.loads(out.read_text())
    assert written['class_order_seed'] == 1   # the lists alone would not say how to draw them again
    assert [s['classes'] for s in written['steps']] == [list(step) for step in drawn.steps]
    assert main(['splits', '--protocol', 'synth-15-1-overlap', '--data-root', str(synth32),
                 '--out', str(out)]) == 0
    assert 'class_order_seed' not in json.loads(out.read_text())   # a fixed order: none
    assert capsys.readouterr().out.startswith(f'synth-15-1-overlap (overlap) on {synth32}')


def test_splits_says_when_its_seed_changes_nothing(synth32, tmp_path, capsys):
    fixed = ['splits', '--protocol', 'synth-15-1-overlap', '--data-root', str(synth32)]
    assert main(fixed) == 0
    default = capsys.readouterr()
    assert main([*fixed, '--seed', '3']) == 0
    seeded = capsys.readouterr()
    assert seeded.out == default.out and default.err == ''
    assert seeded.err == ("cssbench: note: --seed changes nothing in synth-15-1-overlap's "
                          "splits: its class order is fixed\n")
    # a random order drawn with the protocol's own seed: the run seed is not used either
    own = tmp_path / 'own.yaml'
    own.write_text('name: own\ndataset: synth\nmode: overlap\nsteps: ["0-15", 16, 17, 18, 19, 20]\n'
                   'class_order: random\nclass_order_seed: 7\n')
    assert main(['splits', '--protocol', str(own), '--data-root', str(synth32), '--seed', '3']) == 0
    assert capsys.readouterr().err.endswith('its class order is drawn with its class_order_seed, 7\n')
    # where the seed draws the order, no note
    assert main(['splits', '--protocol', 'synth-15-1-overlap-random', '--seed', '3',
                 '--data-root', str(synth32)]) == 0
    assert capsys.readouterr().err == ''


def test_disjoint_keeps_an_image_holding_every_allowed_value() -> None:
    """The disjoint rule is L(img) ⊆ C ∪ O ∪ {0, 255}: a subset, not a proper subset. An
    image whose label set *is* that whole set (here {0, 3, 17, 255} with C = {17}, O = {0, 3})
    is kept, as one holding a part of it is."""
    allowed = {0, 3, 17, 255}
    assert keep_for_step(allowed, {17}, {0, 3}, 'disjoint') is True
    assert keep_for_step({0, 17}, {17}, {0, 3}, 'disjoint') is True
    # step 0 of a disjoint protocol: C = {0, 1, 2} (background in the step), O empty
    assert keep_for_step({0, 1, 2, 255}, {0, 1, 2}, set(), 'disjoint') is True
    # one value beyond the allowed set drops it
    assert keep_for_step(allowed | {18}, {17}, {0, 3}, 'disjoint') is False


def test_protocols_agreeing_on_their_first_step_train_and_score_step_0_alike() -> None:
    # The step-0 cache shares one model among protocols with equal first_step_training():
    # their step-0 images, training targets and (same evaluation) val images and scores agree,
    # checked on random label sets over every pair of shipped protocols of a dataset.
    rng = np.random.default_rng(0)
    protocols = [load_protocol(n).with_class_order(seed) for n in available_protocols()
                 for seed in (0, 1)]
    shared = 0
    for dataset in ('voc', 'ade'):
        classes = 21 if dataset == 'voc' else 151
        label_sets = {split: {f'{split}{i}': tuple(sorted({0, *rng.choice(classes, rng.integers(1, 4))}))
                              for i in range(400)} for split in ('train', 'val')}
        ofs = [p for p in protocols if p.dataset == dataset]
        for a, b in combinations(ofs, 2):
            if a.first_step_training() != b.first_step_training():
                continue
            shared += a.steps != b.steps
            assert compute_splits(a, label_sets)[0] == compute_splits(b, label_sets)[0]
            assert np.array_equal(train_lut(a, 0), train_lut(b, 0))
            if a.evaluation == b.evaluation:
                assert np.array_equal(eval_lut(a, 0), eval_lut(b, 0))
    assert shared >= 4   # 15-1 / 15-5 and 10-1 / 10-10, overlapped and disjoint (and ADE's)
    first = lambda name, **kw: replace(load_protocol(name), **kw).first_step_training()
    assert first('voc-15-1-overlap') == first('voc-15-5-overlap') == first(
        'voc-15-1-overlap', eval_crop='whole', eval_unseen='background')
    assert first('voc-15-1-overlap') != first('voc-15-1-disjoint')       # the mode
    assert first('voc-15-1-overlap') != first('voc-15-1-overlap-plop')   # train_ignore
    assert first('voc-15-1-overlap') != first('voc-10-1-overlap')        # step 0's classes
    assert first('voc-15-1-overlap') != first('synth-15-1-overlap')      # the dataset
    drawn = load_protocol('voc-15-1-overlap-random')
    assert drawn.with_class_order(0).first_step_training() != drawn.with_class_order(1).first_step_training()


def test_protocol_splits_reads_a_valid_cache_entry_instead_of_computing_again(
        tmp_path: Path, voc_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    protocol = load_protocol(str(write_protocol(tmp_path, 'overlap')))
    index = index_dataset('voc', voc_root, progress=False)
    steps = protocol_splits(protocol, index)

    def no_compute(*args):
        raise AssertionError('splits computed again despite a valid cache entry')

    monkeypatch.setattr(splits, 'compute_splits', no_compute)
    assert protocol_splits(protocol, index) == steps


def test_a_cache_entry_with_every_step_but_damaged_steps_is_made_again(
        tmp_path: Path, voc_root: Path, isolated_cache: Path) -> None:
    # As many steps as the protocol has (so the length check alone would take them), but
    # each step is not a dict, or lacks one of step / classes / train / val.
    protocol = load_protocol(str(write_protocol(tmp_path, 'overlap')))
    index = index_dataset('voc', voc_root, progress=False)
    steps = protocol_splits(protocol, index)
    [split_file] = (isolated_cache / 'splits').iterdir()
    for damaged in ([1, 2, 3],
                    [{k: v for k, v in s.items() if k != 'val'} for s in steps],
                    [{k: v for k, v in s.items() if k != 'step'} for s in steps]):
        assert len(damaged) == protocol.num_steps
        split_file.write_text(json.dumps({'steps': damaged}))
        assert protocol_splits(protocol, index) == steps
        assert json.loads(split_file.read_text())['steps'] == steps   # written anew


def test_index_root_is_absolute_with_links_resolved_and_a_tilde_expanded(
        tmp_path: Path, voc_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The record of a run names index.root, read from anywhere: a relative path, a symbolic
    # link or a ~ given here must come out as the real absolute folder.
    link = tmp_path / 'link-to-voc'
    link.symlink_to(voc_root)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('HOME', str(tmp_path))
    real = voc_root.resolve()
    for given in ('link-to-voc', link, '~/link-to-voc'):
        index = index_dataset('voc', given, progress=False)
        assert index.root == real and index.root.is_absolute()
        assert [s.id for s in index.samples['val']] == list(VAL_LABELS)


def test_a_data_root_given_may_start_with_a_tilde(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv('HOME', str(tmp_path))
    assert resolve_data_root('voc', '~/VOCdevkit') == tmp_path / 'VOCdevkit'
    assert resolve_data_root('synth', '~/s') == tmp_path / 's'   # given: no default generated


def test_the_fingerprints_of_a_fixed_index_do_not_change_between_versions() -> None:
    # Run records store the dataset fingerprint and a continued run compares it (an earlier
    # version's label-set fingerprint is accepted too): both must stay what they were.
    scans = {'train': {'a': splits.SampleScan((0, 1), 'aa' * 32, 'bb' * 32),
                       'b': splits.SampleScan((0, 16, 255), 'cc' * 32, 'dd' * 32)},
             'val': {'c': splits.SampleScan((0, 20), 'ee' * 32, 'ff' * 32)}}
    index = splits.DatasetIndex('voc', Path('/nowhere'), {'train': [], 'val': []}, scans)
    assert index.fingerprint == '193052cec71e4078'
    assert index.label_set_fingerprint == '04984082bcd2b706'
    # the label-set fingerprint follows the label sets (and not the bytes)
    relabelled = dict(scans, val={'c': splits.SampleScan((0, 19), 'ee' * 32, 'ff' * 32)})
    other = splits.DatasetIndex('voc', Path('/nowhere'), {'train': [], 'val': []}, relabelled)
    assert other.label_set_fingerprint != index.label_set_fingerprint
