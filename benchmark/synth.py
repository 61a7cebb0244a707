"""Procedural 21-class segmentation dataset in the Pascal VOC 2012 (+ SBD aug) layout.

The generator draws 1-4 textured shapes on a smooth, noisy background.  Every object
class is a (shape, texture) pair, so a class can only be recognised by its shape and
texture, never by its colour (both colours of an object are random per instance).
Classes co-occur through "scene types", which makes the disjoint and overlapped
class-incremental splits differ the way they do on real VOC.

The result is written exactly like VOC so that the project's VOC reader loads it::

    <out>/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    <out>/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png
    <out>/VOCdevkit/VOC2012/ImageSets/Segmentation/{train_aug,val}.txt
    <out>/VOCdevkit/VOC2012/synth.json
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import UserError
from .io import cache_dir, read_json_or_none, temporary_beside

__all__ = [
    "SYNTH_DEFAULTS",
    "SYNTH_VERSION",
    "default_synth_root",
    "ensure_default_synth",
    "make_synth",
    "render_sample",
    "voc_colormap",
]

# Bump whenever the generated pixels change, so that stale caches are not reused.
SYNTH_VERSION = 2

SYNTH_DEFAULTS: dict[str, int] = {"n_train": 2000, "n_val": 300, "size": 64, "seed": 0}

NUM_CLASSES = 21  # background + 20 objects
IGNORE_INDEX = 255
JPEG_QUALITY = 95

SHAPES = ("disc", "square", "triangle", "ring", "cross")
TEXTURES = ("solid", "hstripes", "dstripes", "checker")

SPLITS = {"train": "train_aug", "val": "val"}
# Written last into VOC2012, with the parameters: it marks a complete synthetic dataset, and
# tells it from Pascal VOC (datasets.is_synthetic).
PARAMS_FILE = "synth.json"
_SPLIT_CODES = {"train": 0, "val": 1}

# Scene types: class id -> relative weight.  Classes 16-20 have their own scene but
# also turn up inside the scenes of classes 1-15, so that roughly half of the images
# with a class of 16-20 also contain an older class.
SCENES: tuple[dict[int, float], ...] = (
    {1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 16: 0.6, 19: 0.45},
    {6: 1, 7: 1, 8: 1, 9: 1, 10: 1, 17: 0.6, 20: 0.45},
    {11: 1, 12: 1, 13: 1, 14: 1, 15: 1, 18: 0.6, 19: 0.15, 20: 0.15},
    {16: 1, 17: 1, 18: 1, 19: 1, 20: 1},
)
SCENE_PROBS = np.array([0.28, 0.28, 0.28, 0.16])
OBJECT_COUNT_PROBS = np.array([0.25, 0.30, 0.27, 0.18])  # for 1, 2, 3, 4 objects
P_OUT_OF_SCENE = 0.12  # chance that an object's class is drawn uniformly instead
P_IGNORE_BAND = 0.3  # share of objects whose outline is marked 255

OBJECT_SIZE_RANGE = (0.25, 0.45)  # object extent as a fraction of the image side
MIN_CENTRE_GAP = 0.8  # centres at least this fraction of the summed radii apart, if possible
PLACEMENT_TRIES = 20
TEXTURE_PERIOD_RANGE = (4.0, 6.0)  # in pixels at 64 px, scaled with the image size


# ----------------------------------------------------------------------------- classes


def class_shape_and_texture(class_id: int) -> tuple[str, str]:
    """Shape and texture names of object class ``class_id`` (1..20)."""
    if not 1 <= class_id < NUM_CLASSES:
        raise ValueError(f"object class ids are 1..{NUM_CLASSES - 1}, got {class_id}")
    # Shift the texture along each row of five classes, so that every block of five
    # consecutive classes (e.g. 16-20) mixes textures as well as shapes.
    index = class_id - 1
    row, shape = divmod(index, len(SHAPES))
    return SHAPES[shape], TEXTURES[(row + shape) % len(TEXTURES)]


CLASS_NAMES = tuple('-'.join(class_shape_and_texture(c)) for c in range(1, NUM_CLASSES))


def voc_colormap(n: int = 256) -> np.ndarray:
    """The standard Pascal VOC palette: bits of the index interleaved into R, G, B."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        cmap[index] = (r, g, b)
    return cmap


_PALETTE = voc_colormap().flatten().tolist()


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Object:
    class_id: int
    cx: float
    cy: float
    radius: float  # half of the object's extent
    aspect: float  # horizontal stretch
    period: float  # texture period in pixels
    phase: float
    colour_a: np.ndarray
    colour_b: np.ndarray
    ignore_band: bool


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent generator per image, so output does not depend on worker count."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def _sample_classes(rng: np.random.Generator) -> list[int]:
    scene = SCENES[rng.choice(len(SCENES), p=SCENE_PROBS)]
    ids = np.array(list(scene), dtype=np.int64)
    weights = np.array(list(scene.values()), dtype=np.float64)
    weights /= weights.sum()
    n_objects = 1 + int(rng.choice(len(OBJECT_COUNT_PROBS), p=OBJECT_COUNT_PROBS))
    classes = []
    for _ in range(n_objects):
        if rng.random() < P_OUT_OF_SCENE:
            classes.append(int(rng.integers(1, NUM_CLASSES)))
        else:
            classes.append(int(rng.choice(ids, p=weights)))
    return classes


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One light and one dark random colour, in random order."""
    light = rng.uniform(150, 255, size=3)
    dark = rng.uniform(0, 100, size=3)
    return (light, dark) if rng.random() < 0.5 else (dark, light)


def _place_centre(rng: np.random.Generator, size: int, radius: float,
                  placed: list[_Object]) -> tuple[float, float]:
    """A centre keeping the object mostly clear of earlier ones.

    Partial occlusion stays possible, but an object rarely hides most of another: shape is
    half of what tells classes apart, and a shape mostly hidden cannot be learned from.
    """
    for _ in range(PLACEMENT_TRIES):
        cx, cy = rng.uniform(radius, size - radius, size=2)
        if all(np.hypot(cx - o.cx, cy - o.cy) >= MIN_CENTRE_GAP * (radius + o.radius) for o in placed):
            break
    return float(cx), float(cy)


def _sample_objects(rng: np.random.Generator, size: int) -> list[_Object]:
    objects: list[_Object] = []
    for class_id in _sample_classes(rng):
        radius = 0.5 * size * rng.uniform(*OBJECT_SIZE_RANGE)
        colour_a, colour_b = _contrasting_colours(rng)
        cx, cy = _place_centre(rng, size, radius, objects)
        objects.append(
            _Object(
                class_id=class_id,
                cx=cx,
                cy=cy,
                radius=radius,
                aspect=rng.uniform(0.85, 1.15),
                period=max(3.0, rng.uniform(*TEXTURE_PERIOD_RANGE) * size / 64),
                phase=rng.uniform(0, 1),
                colour_a=colour_a,
                colour_b=colour_b,
                ignore_band=bool(rng.random() < P_IGNORE_BAND),
            )
        )
    return objects


def _smooth_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Bilinearly upsampled random coarse colour grid (float HxWx3)."""
    cells = int(rng.integers(2, 5))
    grid = rng.uniform(30, 225, size=(cells, cells, 3))
    t = np.linspace(0, cells - 1, size)
    lo = np.minimum(np.floor(t).astype(np.int64), cells - 2)
    frac = (t - lo)[:, None]
    # Separable linear interpolation: first along rows, then along columns.
    rows = grid[lo] * (1 - frac[:, :, None]) + grid[lo + 1] * frac[:, :, None]
    field = rows[:, lo] * (1 - frac[None, :, :]) + rows[:, lo + 1] * frac[None, :, :]
    return field


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape in normalised coordinates, where the object spans roughly [-1, 1]^2."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":  # apex at the top, base at the bottom
        return (v <= 0.9) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == "cross":
        return ((np.abs(u) <= 0.34) & (np.abs(v) <= 1.0)) | (
            (np.abs(v) <= 0.34) & (np.abs(u) <= 1.0)
        )
    raise ValueError(f"unknown shape {shape!r}")


def _texture_pattern(texture: str, x: np.ndarray, y: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Boolean two-colour pattern over pixel grids ``x``, ``y`` (True = second colour)."""
    half = period / 2.0
    if texture == "solid":
        return np.zeros(x.shape, dtype=bool)
    if texture == "hstripes":
        return (np.floor(y / half + 2 * phase) % 2).astype(bool)
    if texture == "dstripes":
        return (np.floor((x + y) / (np.sqrt(2.0) * half) + 2 * phase) % 2).astype(bool)
    if texture == "checker":
        return ((np.floor(x / half + phase) + np.floor(y / half + phase)) % 2).astype(bool)
    raise ValueError(f"unknown texture {texture!r}")


def _paint_object(obj: _Object, image: np.ndarray, instances: np.ndarray, instance_id: int) -> None:
    """Draw ``obj`` over ``image`` and record its pixels in ``instances`` (in place)."""
    size = image.shape[0]
    reach = obj.radius * max(obj.aspect, 1.0) + 1
    y0, y1 = max(0, int(obj.cy - reach)), min(size, int(np.ceil(obj.cy + reach)) + 1)
    x0, x1 = max(0, int(obj.cx - reach)), min(size, int(np.ceil(obj.cx + reach)) + 1)
    y, x = np.mgrid[y0:y1, x0:x1] + 0.5  # pixel centres of the bounding box
    u = (x - obj.cx) / (obj.radius * obj.aspect)
    v = (y - obj.cy) / obj.radius
    shape, texture = class_shape_and_texture(obj.class_id)
    inside = _shape_mask(shape, u, v)
    pattern = _texture_pattern(texture, x, y, obj.period, obj.phase)
    colours = np.where(pattern[..., None], obj.colour_b, obj.colour_a)
    image[y0:y1, x0:x1][inside] = colours[inside]
    instances[y0:y1, x0:x1][inside] = instance_id


def _inner_outline(region: np.ndarray) -> np.ndarray:
    """Pixels of ``region`` with a 4-neighbour outside it (the image frame does not count)."""
    padded = np.pad(region, 1, mode="edge")
    eroded = (
        padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & region
    )
    return region & ~eroded


def render_sample(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (uint8 HxWx3) and label mask (uint8 HxW) of one sample, fully determined
    by ``(seed, split, index, size)``."""
    rng = sample_rng(seed, split, index)
    image = _smooth_background(rng, size)
    objects = _sample_objects(rng, size)
    instances = np.zeros((size, size), dtype=np.int16)
    for instance_id, obj in enumerate(objects, start=1):
        _paint_object(obj, image, instances, instance_id)
    image += rng.normal(0, 5, size=image.shape)  # mild sensor-like noise everywhere

    label = np.zeros((size, size), dtype=np.uint8)
    for instance_id, obj in enumerate(objects, start=1):
        label[instances == instance_id] = obj.class_id
    # Bands are drawn after all labels, so an occluder's band is not overwritten.
    for instance_id, obj in enumerate(objects, start=1):
        if obj.ignore_band:
            label[_inner_outline(instances == instance_id)] = IGNORE_INDEX
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


# ----------------------------------------------------------------------------- writing


def image_id(split: str, index: int) -> str:
    """VOC-style id, e.g. ``synth_train_000001`` (1-based)."""
    return f"synth_{split}_{index + 1:06d}"


def _write_sample(voc_dir: Path, seed: int, split: str, index: int, size: int) -> str:
    """Render one sample and write its JPEG and palette PNG; returns its id."""
    name = image_id(split, index)
    image, label = render_sample(seed, split, index, size)
    Image.fromarray(image).save(voc_dir / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY)
    mask = Image.frombytes("P", (size, size), label.tobytes())
    mask.putpalette(_PALETTE)
    mask.save(voc_dir / "SegmentationClassAug" / f"{name}.png")
    return name


def _write_sample_task(task: tuple[str, int, str, int, int]) -> str:
    voc_dir, seed, split, index, size = task
    return _write_sample(Path(voc_dir), seed, split, index, size)


def _params(n_train: int, n_val: int, size: int, seed: int) -> dict:
    return {
        "generator": "cssbench.synth",
        "version": SYNTH_VERSION,
        "seed": seed,
        "size": size,
        "n_train": n_train,
        "n_val": n_val,
        "num_classes": NUM_CLASSES,
    }


def _voc_dir(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def _read_params(root: Path) -> dict | None:
    return read_json_or_none(_voc_dir(root) / PARAMS_FILE)


def _iter_written(tasks: list[tuple[str, int, str, int, int]], workers: int) -> Iterator[str]:
    if workers <= 1:
        for task in tasks:
            yield _write_sample_task(task)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_write_sample_task, tasks, chunksize=32)


def _generate(root: Path, params: dict, progress: bool, workers: int) -> None:
    """Write a complete dataset into the (empty) folder ``root``."""
    voc_dir = _voc_dir(root)
    for sub in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc_dir / sub).mkdir(parents=True, exist_ok=True)
    counts = {"train": params["n_train"], "val": params["n_val"]}
    tasks = [
        (str(voc_dir), params["seed"], split, index, params["size"])
        for split, count in counts.items()
        for index in range(count)
    ]
    bar = tqdm(total=len(tasks), desc=f"synth VOC {params['size']}px", unit="img",
               disable=None if progress else True)   # None: a bar on a terminal only
    with bar:
        for _ in _iter_written(tasks, workers):
            bar.update(1)
    for split, list_name in SPLITS.items():
        ids = [image_id(split, index) for index in range(counts[split])]
        _write_lines(voc_dir / "ImageSets" / "Segmentation" / f"{list_name}.txt", ids)
    # Written last: its presence marks the folder as complete.
    (voc_dir / PARAMS_FILE).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def writes_into(out: Path) -> bool:
    """Whether ``make_synth`` writes a dataset into ``out`` (new, or an empty folder), rather
    than reusing or refusing what is there."""
    return not out.exists() or _is_empty_dir(out)


def make_synth(
    out: str | Path,
    *,
    n_train: int = SYNTH_DEFAULTS["n_train"],
    n_val: int = SYNTH_DEFAULTS["n_val"],
    size: int = SYNTH_DEFAULTS["size"],
    seed: int = SYNTH_DEFAULTS["seed"],
    progress: bool = True,
    workers: int = 1,
) -> Path:
    """Generate the synthetic VOC-layout dataset under ``out``; returns ``out/VOCdevkit/VOC2012``.

    The data is written into a temporary sibling folder that is renamed to ``out`` only
    once complete.  An existing dataset with the same parameters is reused as is; any
    other non-empty ``out`` raises :class:`FileExistsError`.
    """
    if n_train < 1 or n_val < 1 or size < 16:
        raise UserError(f"a synthetic dataset needs n_train >= 1, n_val >= 1 and size >= 16 "
                        f"(got {n_train}, {n_val}, {size})")
    if workers < 1:
        raise UserError(f'a synthetic dataset is drawn by at least 1 worker, got {workers}')
    out = Path(out).expanduser().absolute()
    params = _params(n_train, n_val, size, seed)
    if not writes_into(out):
        return _reuse_or_refuse(out, params)

    with temporary_beside(out, folder=True) as tmp:
        _generate(tmp, params, progress, workers)
        if _is_empty_dir(out):
            out.rmdir()
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process may have finished the same dataset first.
            if out.exists() and not _is_empty_dir(out):
                return _reuse_or_refuse(out, params)
            raise
    return _voc_dir(out)


def _reuse_or_refuse(out: Path, params: dict) -> Path:
    existing = _read_params(out)
    if existing == params:
        return _voc_dir(out)
    if not isinstance(existing, dict):
        raise FileExistsError(
            f"{out} exists and is not a complete synthetic dataset (no readable "
            f"VOCdevkit/VOC2012/synth.json); remove it or choose another folder"
        )
    # named as make-synth's options: n_train is --n-train
    differing = "; ".join(f"{key.replace('_', '-')} {existing.get(key)!r}, wanted {value!r}"
                          for key, value in params.items() if existing.get(key) != value)
    raise FileExistsError(
        f"{out} holds a synthetic dataset with other parameters ({differing}); "
        f"remove it or choose another folder"
    )


def default_synth_root() -> Path:
    """Cache folder of the default dataset, ``$CSSBENCH_CACHE/synth-v<version>`` (default cache
    ``~/.cache/cssbench``): a new generator version makes a new folder, never a clash."""
    return cache_dir() / f"synth-v{SYNTH_VERSION}"


def ensure_default_synth(progress: bool = True) -> Path:
    """The default synthetic dataset's VOC2012 folder, generating it on first use."""
    return make_synth(default_synth_root(), progress=progress, **SYNTH_DEFAULTS)
