"""Tests of the synthetic VOC-layout dataset generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cssbench import synth
from cssbench.synth import SYNTH_DEFAULTS, SYNTH_VERSION, default_synth_root, make_synth, voc_colormap

SMALL = {"n_train": 40, "n_val": 10, "size": 48, "seed": 0}


def _read_ids(voc_dir: Path, list_name: str) -> list[str]:
    return (voc_dir / "ImageSets" / "Segmentation" / f"{list_name}.txt").read_text().split()


def _mask(voc_dir: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(voc_dir / "SegmentationClassAug" / f"{name}.png"))


def _file_bytes(voc_dir: Path) -> dict[str, bytes]:
    files = sorted((voc_dir / "JPEGImages").iterdir()) + sorted(
        (voc_dir / "SegmentationClassAug").iterdir()
    )
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synth(tmp_path_factory.mktemp("small") / "synth", progress=False, **SMALL)


def test_voc_colormap_matches_known_entries() -> None:
    cmap = voc_colormap()
    assert cmap.shape == (256, 3)
    assert cmap[0].tolist() == [0, 0, 0]
    assert cmap[1].tolist() == [128, 0, 0]
    assert cmap[15].tolist() == [192, 128, 128]  # VOC "person"
    assert cmap[255].tolist() == [224, 224, 192]  # VOC "void"


def test_every_class_is_a_distinct_shape_texture_pair() -> None:
    pairs = {synth.class_shape_and_texture(c) for c in range(1, 21)}
    assert len(pairs) == 20


def test_layout(small_voc: Path) -> None:
    assert small_voc.name == "VOC2012" and small_voc.parent.name == "VOCdevkit"
    train_ids = _read_ids(small_voc, "train_aug")
    val_ids = _read_ids(small_voc, "val")
    assert len(train_ids) == SMALL["n_train"] and len(val_ids) == SMALL["n_val"]
    assert train_ids[0] == "synth_train_000001" and val_ids[0] == "synth_val_000001"
    assert not set(train_ids) & set(val_ids)
    assert len(list((small_voc / "JPEGImages").iterdir())) == len(train_ids) + len(val_ids)

    palette = voc_colormap().flatten().tolist()
    for name in train_ids + val_ids:
        with Image.open(small_voc / "JPEGImages" / f"{name}.jpg") as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            image_size = image.size
        with Image.open(small_voc / "SegmentationClassAug" / f"{name}.png") as mask:
            assert mask.format == "PNG" and mask.mode == "P"
            assert mask.getpalette()[: len(palette)] == palette
            assert mask.size == image_size == (SMALL["size"], SMALL["size"])
            values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= set(range(21)) | {255}

    params = json.loads((small_voc / "synth.json").read_text())
    assert {k: params[k] for k in SMALL} == SMALL
    assert params["version"] == synth.SYNTH_VERSION


def test_same_seed_is_byte_identical_and_other_seed_differs(small_voc: Path, tmp_path: Path) -> None:
    again = make_synth(tmp_path / "again", progress=False, **SMALL)
    assert _file_bytes(again) == _file_bytes(small_voc)

    other = make_synth(tmp_path / "other", progress=False, **{**SMALL, "seed": 1})
    other_bytes, small_bytes = _file_bytes(other), _file_bytes(small_voc)
    assert other_bytes.keys() == small_bytes.keys()
    assert sum(other_bytes[k] != small_bytes[k] for k in small_bytes) > 0.9 * len(small_bytes)


def test_worker_count_does_not_change_output(small_voc: Path, tmp_path: Path) -> None:
    params = {**SMALL, "n_train": 12, "n_val": 4}
    serial = make_synth(tmp_path / "serial", progress=False, **params)
    parallel = make_synth(tmp_path / "parallel", progress=False, workers=2, **params)
    assert _file_bytes(parallel) == _file_bytes(serial)


def test_existing_dataset_is_reused_and_other_params_refused(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    voc_dir = make_synth(out, progress=False, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in voc_dir.rglob("*")}

    assert make_synth(out, progress=False, **SMALL) == voc_dir
    assert {p: p.stat().st_mtime_ns for p in voc_dir.rglob("*")} == stamps

    with pytest.raises(FileExistsError) as e:
        make_synth(out, progress=False, **{**SMALL, "seed": 3, "n_val": SMALL["n_val"] + 1})
    assert str(e.value) == (f"{out} holds a synthetic dataset with other parameters (seed "
                            f"{SMALL['seed']!r}, wanted 3; n-val {SMALL['n_val']!r}, wanted "
                            f"{SMALL['n_val'] + 1}); remove it or choose another folder")
    with pytest.raises(FileExistsError, match=f"size {SMALL['size']!r}, wanted 32"):
        make_synth(out, progress=False, **{**SMALL, "size": 32})


def test_unrelated_folder_is_refused_and_empty_folder_is_used(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a complete synthetic dataset"):
        make_synth(busy, progress=False, **SMALL)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (make_synth(empty, progress=False, **SMALL) / "synth.json").is_file()


def test_failure_leaves_no_partial_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "synth"
    real_writer = synth._write_sample
    calls = {"n": 0}

    def failing_writer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("simulated crash")
        return real_writer(*args, **kwargs)

    monkeypatch.setattr(synth, "_write_sample", failing_writer)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_synth(out, progress=False, **SMALL)
    assert not (out / "VOCdevkit" / "VOC2012" / "synth.json").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary folder is cleaned up as well

    monkeypatch.setattr(synth, "_write_sample", real_writer)
    voc_dir = make_synth(out, progress=False, **SMALL)
    assert len(_read_ids(voc_dir, "train_aug")) == SMALL["n_train"]


def test_class_statistics(tmp_path: Path) -> None:
    voc_dir = make_synth(tmp_path / "stats", n_train=600, n_val=60, size=32, seed=0, progress=False)
    present = []
    for name in _read_ids(voc_dir, "train_aug"):
        values = set(np.unique(_mask(voc_dir, name)).tolist())
        present.append(values - {0, 255})

    counts = {c: sum(c in classes for classes in present) for c in range(1, 21)}
    assert all(count > 0.05 * len(present) for count in counts.values()), counts
    for c in range(16, 21):
        with_c = [classes for classes in present if c in classes]
        with_old = sum(any(k <= 15 for k in classes) for classes in with_c)
        assert 0.2 < with_old / len(with_c) < 0.8, (c, with_old, len(with_c))

    val_present = set().union(*(set(np.unique(_mask(voc_dir, n)).tolist()) for n in _read_ids(voc_dir, "val")))
    assert set(range(1, 21)) <= val_present


def test_default_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CSSBENCH_CACHE", str(tmp_path))
    assert default_synth_root() == tmp_path / f"synth-v{SYNTH_VERSION}"
    monkeypatch.delenv("CSSBENCH_CACHE")
    assert default_synth_root() == Path.home() / ".cache" / "cssbench" / f"synth-v{SYNTH_VERSION}"
    assert SYNTH_DEFAULTS == {"n_train": 2000, "n_val": 300, "size": 64, "seed": 0}


def test_textures_shift_along_each_row_so_each_block_of_five_mixes_them():
    """Class c (1..20): shape = SHAPES[(c-1) % 5], texture = TEXTURES[((c-1)//5 + (c-1)%5) % 4]
    (hand-computed for the new classes 16..20 of 15-5 and for 1..5)."""
    got = [synth.class_shape_and_texture(c) for c in range(16, 21)]
    assert got == [('disc', 'checker'), ('square', 'solid'), ('triangle', 'hstripes'),
                   ('ring', 'dstripes'), ('cross', 'checker')]
    assert [synth.class_shape_and_texture(c)[1] for c in range(1, 6)] == [
        'solid', 'hstripes', 'dstripes', 'checker', 'solid']
    for first in (1, 6, 11, 16):   # every block of five holds at least three textures
        assert len({synth.class_shape_and_texture(c)[1] for c in range(first, first + 5)}) >= 3


def test_inner_outline_does_not_count_the_image_frame():
    region = np.zeros((5, 5), dtype=bool)
    region[0:3, 0:3] = True     # a 3x3 square in the top-left corner, touching the frame
    outline = synth._inner_outline(region)
    expected = np.zeros((5, 5), dtype=bool)
    expected[0:3, 2] = True      # its right column
    expected[2, 0:3] = True      # its bottom row; the top row and left column touch the frame
    assert outline.tolist() == expected.tolist()
    assert synth._inner_outline(np.ones((4, 4), dtype=bool)).sum() == 0   # the whole image


def test_train_and_val_samples_with_the_same_index_differ():
    """The split is part of each sample's random stream: val image i is not train image i."""
    for index in range(3):
        train_img, train_mask = synth.render_sample(0, 'train', index, 32)
        val_img, val_mask = synth.render_sample(0, 'val', index, 32)
        assert not np.array_equal(train_img, val_img)
    # and the same (seed, split, index) gives the same sample
    a, b = synth.render_sample(0, 'val', 1, 32), synth.render_sample(0, 'val', 1, 32)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_out_of_scene_objects_are_drawn_from_every_object_class(monkeypatch: pytest.MonkeyPatch):
    """With every object drawn out of scene (P_OUT_OF_SCENE = 1), the classes are uniform over
    1..20: over 400 images (about 950 objects) each of the 20 classes turns up, 0 never."""
    monkeypatch.setattr(synth, 'P_OUT_OF_SCENE', 1.0)
    drawn = [c for i in range(400) for c in synth._sample_classes(np.random.default_rng([9, i]))]
    assert set(drawn) == set(range(1, 21))
