"""The embedded synthetic MVTec-like set: the main job's default data on a fresh machine.

Twelve classes named after the paper's MVTec classes (so the split protocol applies unchanged):
four procedural textures (carpet, leather, tile, wood) and eight objects (bottle, cable,
capsule, hazelnut, metal_nut, pill, toothbrush, transistor). Normal images vary in pose
(rotation, shift, scale), lighting (gain, gradient) and texture randomness. Defects (scratch,
crack, hole, stain, missing_part, contamination, colour_shift) change pixels only inside their
mask, so masks are pixel-exact; most are low-contrast so the set is not trivially separable.

Every image is a pure function of (seed, class, split, index): generation order and the other
classes never change it. Everything is numpy-vectorized over pixels.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from nexvitad_jax.data.decode import CategoryArrays
from nexvitad_jax.errors import UserInputError

TEXTURE_CLASSES = ("carpet", "leather", "tile", "wood")
OBJECT_CLASSES = (
    "bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "toothbrush", "transistor",
)  # fmt: skip
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(sorted(TEXTURE_CLASSES + OBJECT_CLASSES))
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "carpet": ("hole", "stain", "contamination", "colour_shift", "crack"),
    "leather": ("scratch", "crack", "stain", "colour_shift", "hole"),
    "tile": ("crack", "stain", "contamination", "colour_shift", "hole"),
    "wood": ("scratch", "crack", "hole", "stain", "colour_shift"),
    "bottle": ("contamination", "crack", "missing_part", "stain"),
    "cable": ("missing_part", "colour_shift", "scratch", "contamination"),
    "capsule": ("crack", "scratch", "missing_part", "stain"),
    "hazelnut": ("crack", "hole", "scratch", "stain"),
    "metal_nut": ("scratch", "colour_shift", "missing_part", "contamination"),
    "pill": ("crack", "contamination", "colour_shift", "stain"),
    "toothbrush": ("missing_part", "contamination", "colour_shift"),
    "transistor": ("missing_part", "scratch", "colour_shift", "contamination"),
}
_SPLIT_IDS = {"train": 0, "test": 1}


@dataclasses.dataclass
class _Scene:
    """A rendered normal image and what defects need: the background and the object region."""

    image: np.ndarray  # float32 (S, S, 3) in [0, 1]
    background: np.ndarray  # float32 (S, S, 3): what a missing part reveals
    region: np.ndarray  # bool (S, S): where defects may go (the object, or everywhere)


# ---------------------------------------------------------------------------------------------
# Vectorized primitives


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] (x right, y down)."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    return np.meshgrid(t, t, indexing="xy")


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in about [0, 1]: a random cells x cells grid upsampled bicubically."""
    grid = rng.random((cells, cells), dtype=np.float32)
    return np.asarray(Image.fromarray(grid, "F").resize((size, size), Image.BICUBIC))


def _fractal(rng: np.random.Generator, size: int, cells: int, octaves: int = 3) -> np.ndarray:
    total = np.zeros((size, size), np.float32)
    norm = 0.0
    for octave in range(octaves):  # a handful of octaves, each a whole-image operation
        amplitude = 0.5**octave
        total += amplitude * _noise(rng, size, min(cells * 2**octave, size))
        norm += amplitude
    return total / norm


def _rotate(x, y, cx, cy, angle):
    c, s = np.cos(angle), np.sin(angle)
    u, v = x - cx, y - cy
    return c * u + s * v, -s * u + c * v


def _coverage(signed_distance: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased inside-ness from a signed distance (negative inside), one pixel wide."""
    return np.clip(0.5 - signed_distance * size / 2, 0, 1)


def _polyline_distance(x, y, points: np.ndarray, reach: float) -> np.ndarray:
    """Distance of every pixel to a densely sampled polyline (points (P, 2)), vectorized over
    the polyline's bounding box grown by `reach` (inf beyond it: callers threshold below reach)."""
    size = x.shape[0]
    lo = np.clip(((points.min(0) - reach + 1) / 2 * size).astype(int), 0, size)
    hi = np.clip(((points.max(0) + reach + 1) / 2 * size).astype(int) + 1, 0, size)
    distance = np.full((size, size), np.inf, np.float32)
    box = (slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    dx = x[box][None] - points[:, 0, None, None]
    dy = y[box][None] - points[:, 1, None, None]
    distance[box] = np.sqrt((dx * dx + dy * dy).min(axis=0))
    return distance


def _blob(rng, x, y, center, radius, size) -> np.ndarray:
    """An irregular blob: a rotated ellipse whose boundary is perturbed by smooth noise."""
    u, v = _rotate(x, y, center[0], center[1], rng.uniform(0, np.pi))
    aspect = rng.uniform(0.5, 1.0)
    r = np.sqrt((u / radius) ** 2 + (v / (radius * aspect)) ** 2)
    return r + 0.45 * (_noise(rng, size, 6) - 0.5) < 1.0


def _light(rng, image: np.ndarray, x, y, strength: float = 0.12) -> np.ndarray:
    """Global lighting variation: gain and a linear gradient in a random direction."""
    angle = rng.uniform(0, 2 * np.pi)
    gradient = 1 + strength * (np.cos(angle) * x + np.sin(angle) * y)
    gain = rng.uniform(1 - strength, 1 + strength)
    return image * (gain * gradient)[..., None]


def _colour(base, rng, jitter=0.04) -> np.ndarray:
    return np.clip(np.asarray(base, np.float32) + rng.normal(0, jitter, 3), 0, 1).astype(
        np.float32
    )


def _paint(image, coverage, colour):
    """Alpha-composite a colour (3,) or image (S, S, 3) where coverage (S, S) is set."""
    return image * (1 - coverage[..., None]) + coverage[..., None] * colour


# ---------------------------------------------------------------------------------------------
# Normal images per class


def _texture(name: str, rng, size: int, x, y) -> np.ndarray:
    if name == "carpet":
        fibres = _fractal(rng, size, max(size // 4, 8), 2)
        weave_freq = rng.uniform(28, 34) * np.pi
        phase = rng.uniform(0, 2 * np.pi, 2)
        weave = np.sin(weave_freq * x + phase[0]) * np.sin(weave_freq * y + phase[1])
        shade = 0.55 + 0.35 * (fibres - 0.5) + 0.06 * weave + 0.1 * (_noise(rng, size, 4) - 0.5)
        return shade[..., None] * _colour([0.95, 0.85, 0.7], rng)
    if name == "leather":
        grain = _fractal(rng, size, max(size // 6, 8), 2)
        folds = _noise(rng, size, 5)
        shade = 0.5 + 0.4 * np.abs(grain - 0.5) + 0.15 * (folds - 0.5)
        return shade[..., None] * _colour([0.75, 0.45, 0.3], rng)
    if name == "tile":
        tiles = rng.uniform(3.5, 4.5)
        offset = rng.uniform(0, 1, 2)
        fu, fv = (x + 1) * tiles / 2 + offset[0], (y + 1) * tiles / 2 + offset[1]
        grout = np.minimum(np.abs(fu - np.round(fu)), np.abs(fv - np.round(fv))) < 0.025
        speckles = (_noise(rng, size, size // 3) > 0.72).astype(np.float32)
        base = 0.75 + 0.08 * (_fractal(rng, size, 12) - 0.5) - 0.25 * speckles
        shade = np.where(grout, 0.45, base)
        return shade[..., None] * _colour([0.9, 0.9, 0.88], rng, 0.02)
    if name == "wood":
        warp = _fractal(rng, size, 6)
        angle = rng.uniform(-0.15, 0.15)
        u, _ = _rotate(x, y, 0, 0, angle)
        rings = np.sin(rng.uniform(18, 26) * np.pi * (u + 0.35 * warp) + rng.uniform(0, 6.3))
        grain = _noise(rng, size, size // 2)
        shade = 0.6 + 0.12 * rings + 0.1 * (grain - 0.5)
        return shade[..., None] * _colour([0.85, 0.6, 0.38], rng)
    raise AssertionError(name)


def _bottle(rng, size: int, x, y, cx: float, cy: float, scale: float, dark) -> tuple:
    """Top view: rim, glass, dark mouth."""
    background = dark
    r = np.hypot(x - cx, y - cy) / scale
    glass = 0.25 + 0.2 * np.cos(np.arctan2(y - cy, x - cx) - rng.uniform(0, 6.3)) * r
    body = _coverage(r - 0.8, size)
    image = _paint(background, body, _colour([0.35, 0.3, 0.2], rng))
    image = _paint(image, _coverage(r - 0.68, size), (glass[..., None] + 0.1) * [1, 0.95, 0.8])
    image = _paint(image, _coverage(r - 0.3, size), _colour([0.05, 0.05, 0.04], rng, 0.01))
    return image, background, body


def _cable(rng, size: int, x, y, cx: float, cy: float, scale: float, dark) -> tuple:
    """Cross-section: sheath and three coloured cores, any rotation."""
    background = 0.55 + 0.1 * _fractal(rng, size, 8)[..., None] * np.ones(3, np.float32)
    r = np.hypot(x - cx, y - cy) / scale
    body = _coverage(r - 0.85, size)
    image = _paint(background, body, _colour([0.25, 0.25, 0.25], rng))
    angle = rng.uniform(0, 2 * np.pi)
    colours = ([0.2, 0.6, 0.2], [0.2, 0.3, 0.75], [0.55, 0.35, 0.15])
    for k, colour in enumerate(colours):  # three cores: a fixed, tiny loop over parts
        a = angle + k * 2 * np.pi / 3
        px, py = cx + 0.4 * scale * np.cos(a), cy + 0.4 * scale * np.sin(a)
        core = _coverage(np.hypot(x - px, y - py) / scale - 0.3, size)
        shading = 0.85 + 0.3 * _noise(rng, size, 5)[..., None]
        image = _paint(image, core, _colour(colour, rng, 0.03) * shading)
    return image, background, body


def _capsule(rng, size: int, x, y, cx: float, cy: float, scale: float, dark) -> tuple:
    """Stadium, two colours, small rotation."""
    background = 0.85 + 0.05 * _fractal(rng, size, 8)[..., None] * np.ones(3, np.float32)
    u, v = _rotate(x, y, cx, cy, rng.uniform(-0.12, 0.12))
    half = 0.62 * scale
    d = np.hypot(np.maximum(np.abs(u) - half, 0), v) - 0.26 * scale
    body = _coverage(d, size)
    colour = np.where((u < 0)[..., None], _colour([0.12, 0.12, 0.12], rng, 0.02),
                      _colour([0.9, 0.55, 0.2], rng, 0.03))
    colour = colour * (1.05 - 0.35 * (v / 0.3) ** 2)[..., None]
    return _paint(background, body, colour), background, body


def _hazelnut(rng, size: int, x, y, cx: float, cy: float, scale: float, dark) -> tuple:
    """Brown oval with streaks, any rotation."""
    background = dark
    u, v = _rotate(x, y, cx, cy, rng.uniform(0, 2 * np.pi))
    d = np.hypot(u / (0.56 * scale), v / (0.66 * scale) * (1 + 0.25 * v)) - 1
    body = _coverage(d * 0.6, size)
    streaks = np.sin(40 * u + 6 * _fractal(rng, size, 8))
    shade = 0.75 + 0.1 * streaks - 0.3 * np.clip(d + 1, 0, 1) ** 2
    colour = shade[..., None] * _colour([0.6, 0.38, 0.2], rng)
    return _paint(background, body, colour), background, body


def _metal_nut(rng, size: int, x, y, cx: float, cy: float, scale: float, dark) -> tuple:
    """Disk with a hole and four tabs, any rotation."""
    background = 0.05 + 0.03 * _fractal(rng, size, 8)[..., None] * np.ones(3, np.float32)
    u, v = _rotate(x, y, cx, cy, rng.uniform(0, 2 * np.pi))
    r, theta = np.hypot(u, v) / scale, np.arctan2(v, u)
    outer = 0.62 + 0.14 * np.clip(np.cos(4 * theta) * 3 - 2, 0, 1)
    body = _coverage(np.maximum(r - outer, 0.3 - r), size)
    shade = 0.55 + 0.25 * np.cos(theta - rng.uniform(0, 6.3)) + 0.1 * _noise(rng, size, 24)
    return _paint(background, body, shade[..., None] * [0.8, 0.82, 0.85]), background, body


def _pill(rng, size: int, x, y, cx: float, cy: float, scale: float, dark) -> tuple:
    """White ellipse with red speckles."""
    background = 0.3 + 0.05 * _fractal(rng, size, 8)[..., None] * np.ones(3, np.float32)
    u, v = _rotate(x, y, cx, cy, rng.uniform(-0.08, 0.08))
    d = np.hypot(u / (0.8 * scale), v / (0.42 * scale)) - 1
    body = _coverage(d * 0.5, size)
    speckle = (_noise(rng, size, size // 4) > 0.8)[..., None]
    colour = np.where(speckle, _colour([0.75, 0.3, 0.25], rng), _colour([0.92, 0.9, 0.85], rng))
    colour = colour * (1 - 0.25 * np.clip(d + 1, 0, 1)[..., None] ** 3)
    return _paint(background, body, colour), background, body


def _toothbrush(rng, size: int, x, y, cx: float, cy: float, scale: float, dark) -> tuple:
    """Head with a grid of bristle tufts, vertical."""
    background = 0.15 + 0.05 * _fractal(rng, size, 8)[..., None] * np.ones(3, np.float32)
    u, v = _rotate(x, y, cx, cy, rng.uniform(-0.06, 0.06))
    head = np.maximum(np.abs(u) - 0.3 * scale, np.abs(v) - 0.8 * scale)
    body = _coverage(head, size)
    image = _paint(background, body, _colour([0.2, 0.35, 0.8], rng))
    fu, fv = u / (0.15 * scale), v / (0.15 * scale)
    tuft = np.hypot(fu - np.round(fu), fv - np.round(fv)) * 0.15 - 0.055
    bristles = _coverage(np.maximum(tuft, head + 0.03), size)
    tone = 0.8 + 0.15 * _noise(rng, size, 40)[..., None]
    image = _paint(image, bristles, tone * _colour([0.95, 0.95, 0.95], rng, 0.02))
    return image, background, body


def _transistor(rng, size: int, x, y, cx: float, cy: float, scale: float, dark) -> tuple:
    """Black body with three leads on a board."""
    background = _colour([0.55, 0.6, 0.45], rng) * (
        0.85 + 0.2 * _fractal(rng, size, 12)[..., None]
    )
    u, v = _rotate(x, y, cx, cy, rng.uniform(-0.07, 0.07))
    case = np.maximum(np.abs(u) - 0.42 * scale, np.abs(v + 0.2) - 0.3 * scale)
    lead_u = np.min(np.stack([np.abs(u - k * 0.3 * scale) for k in (-1, 0, 1)]), axis=0)
    leads = np.maximum(lead_u - 0.04 * scale, np.abs(v - 0.38) - 0.3)
    image = _paint(background, _coverage(leads, size), _colour([0.75, 0.75, 0.72], rng))
    shade = 0.12 + 0.05 * _noise(rng, size, 10)
    image = _paint(image, _coverage(case, size), shade[..., None] * np.ones(3))
    body = np.maximum(_coverage(case, size), _coverage(leads, size))
    return image, background, body


_OBJECTS = {"bottle": _bottle, "cable": _cable, "capsule": _capsule, "hazelnut": _hazelnut, "metal_nut": _metal_nut,
            "pill": _pill, "toothbrush": _toothbrush, "transistor": _transistor}


def _object(name: str, rng, size: int, x, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (image, background, object coverage). The placement and the dark backdrop are drawn for
    every class (the random stream stays the same whichever class is drawn)."""
    shift = rng.uniform(-0.06, 0.06, 2)
    cx, cy = float(shift[0]), float(shift[1])
    scale = rng.uniform(0.94, 1.06)
    dark = 0.08 + 0.04 * _fractal(rng, size, 16)[..., None] * np.ones(3, np.float32)
    return _OBJECTS[name](rng, size, x, y, cx, cy, scale, dark)


def _normal(name: str, rng, size: int) -> _Scene:
    x, y = _grid(size)
    if name in TEXTURE_CLASSES:
        image = _light(rng, _texture(name, rng, size, x, y), x, y, 0.08)
        # The texture itself is what a missing part exposes: a darker backing.
        return _Scene(image.astype(np.float32), image * 0.35, np.ones((size, size), bool))
    image, background, body = _object(name, rng, size, x, y)
    image = _light(rng, image, x, y)
    return _Scene(image.astype(np.float32), background.astype(np.float32), body > 0.5)


# ---------------------------------------------------------------------------------------------
# Defects: each returns (image, mask) and changes pixels only where mask is True


def _random_point(rng, region: np.ndarray, size: int, margin: float = 0.12) -> np.ndarray:
    """A point (in [-1, 1] coords) inside the region, away from the image border."""
    inner = region.copy()
    m = int(margin * size / 2)
    inner[:m], inner[-m:], inner[:, :m], inner[:, -m:] = False, False, False, False
    ys, xs = np.nonzero(inner if inner.any() else region)
    k = rng.integers(len(ys))
    return (np.array([xs[k], ys[k]], np.float32) + 0.5) / size * 2 - 1


def _curve(rng, start, length, jagged: bool) -> np.ndarray:
    """A smooth (scratch) or jagged random-walk (crack) polyline, 96 samples."""
    steps = 96
    heading = rng.uniform(0, 2 * np.pi)
    turn = rng.normal(0, 0.35 if jagged else 0.03, steps).cumsum() + heading
    step = length / steps
    points = start + np.stack([np.cos(turn), np.sin(turn)], 1).cumsum(0) * step
    return points - (points[steps // 2] - start)  # centred on the start point


def _apply_defect(kind: str, rng, scene: _Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _grid(size)
    image = scene.image
    pixel = 2.0 / size
    center = _random_point(rng, scene.region, size)
    if kind in ("scratch", "crack"):
        jagged = kind == "crack"
        points = _curve(rng, center, rng.uniform(0.25, 0.6), jagged)
        width = rng.uniform(1.0, 2.2 if jagged else 1.6) * pixel
        mask = _polyline_distance(x, y, points, width) < width
        factor = rng.uniform(0.45, 0.7) if jagged else rng.choice([rng.uniform(0.7, 0.85),
                                                                   rng.uniform(1.15, 1.3)])
        changed = np.clip(image * factor, 0, 1)
    elif kind == "hole":
        radius = rng.uniform(0.04, 0.09)
        mask = _blob(rng, x, y, center, radius, size)
        depth = np.clip(np.hypot(x - center[0], y - center[1]) / radius, 0, 1)
        changed = image * (0.25 + 0.35 * depth)[..., None]
    elif kind == "stain":
        mask = _blob(rng, x, y, center, rng.uniform(0.06, 0.15), size)
        tint = _colour(rng.choice([[0.35, 0.25, 0.15], [0.5, 0.5, 0.55], [0.55, 0.45, 0.2]]), rng)
        alpha = rng.uniform(0.2, 0.4)
        changed = image * (1 - alpha) + alpha * tint
    elif kind == "missing_part":
        mask = _blob(rng, x, y, center, rng.uniform(0.12, 0.22), size) & scene.region
        changed = scene.background
    elif kind == "contamination":
        mask = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(1, 4))):  # a few particles: tiny fixed loop, not pixels
            spot = center + rng.normal(0, 0.06, 2)
            if rng.random() < 0.5:  # a fibre
                mask |= _polyline_distance(x, y, _curve(rng, spot, 0.15, True), 1.2 * pixel) < 1.2 * pixel
            else:  # a speck
                mask |= _blob(rng, x, y, spot, rng.uniform(0.015, 0.035), size)
        fleck = _colour(rng.choice([[0.2, 0.2, 0.2], [0.8, 0.8, 0.75], [0.45, 0.3, 0.2]]), rng)
        texture = 0.8 + 0.4 * _noise(rng, size, 30)[..., None]
        changed = np.clip(fleck * texture * 0.6 + image * 0.4, 0, 1)
    elif kind == "colour_shift":
        mask = _blob(rng, x, y, center, rng.uniform(0.1, 0.2), size) & scene.region
        gains = np.ones(3, np.float32)
        gains[rng.integers(3)] += rng.choice([-1, 1]) * rng.uniform(0.15, 0.3)
        changed = np.clip(image * gains, 0, 1)
    else:
        raise AssertionError(kind)
    if kind != "contamination":  # foreign particles may fall beside the object; damage may not
        mask &= scene.region
    # Only pixels whose value actually changes are defective: the mask is pixel-exact.
    mask &= np.abs(changed - image).max(-1) > 1.5 / 255
    return np.where(mask[..., None], changed, image), mask


# ---------------------------------------------------------------------------------------------
# Public API


def synthetic_image(
    category: str, split: str, index: int, *, image_size: int = 224, seed: int = 0,
    n_good_test: int = 4,
) -> tuple[np.ndarray, np.ndarray, str]:
    """One image: (uint8 (S, S, 3), bool mask (S, S), defect type), a pure function of its key.

    Test images 0 .. n_good_test-1 are good; the rest cycle through the class's defect types.
    """
    if category not in DEFECT_TYPES:
        raise UserInputError(
            f"unknown synthetic category {category!r}; expected one of {list(SYNTHETIC_CLASSES)}"
        )
    if split not in _SPLIT_IDS:
        raise UserInputError(f"split must be 'train' or 'test', got {split!r}")
    class_id = SYNTHETIC_CLASSES.index(category)
    rng = np.random.default_rng([seed, class_id, _SPLIT_IDS[split], index])
    scene = _normal(category, rng, image_size)
    defect = "good"
    mask = np.zeros((image_size, image_size), bool)
    image = scene.image
    if split == "test" and index >= n_good_test:
        types = DEFECT_TYPES[category]
        defect = types[(index - n_good_test) % len(types)]
        for _ in range(8):  # resample the rare empty defect (e.g. a stain matching its texture)
            image, mask = _apply_defect(defect, rng, scene, image_size)
            if mask.sum() >= 12:
                break
    pixels = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    return pixels, mask, defect


def generate_category(
    category: str, split: str, n: int, *, image_size: int = 224, seed: int = 0,
    n_good_test: int = 4, workers: int | None = None,
) -> CategoryArrays:
    """n images of one class split. One thread by default: a second thread measured 0.7x-1.2x
    on a shared 2-core CPU (benchmarks/data.py); `workers` helps on idle many-core hosts."""
    workers = workers or 1

    def render(index: int):
        return synthetic_image(category, split, index, image_size=image_size, seed=seed,
                               n_good_test=n_good_test)

    if workers == 1:
        results = [render(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(render, range(n)))
    defect_types = [r[2] for r in results]
    return CategoryArrays(
        images=np.stack([r[0] for r in results]) if n else np.zeros((0, image_size, image_size, 3), np.uint8),
        masks=np.stack([r[1] for r in results]) if n else np.zeros((0, image_size, image_size), bool),
        labels=np.asarray([t != "good" for t in defect_types], np.int32),
        defect_types=defect_types,
        paths=[f"synthetic/{category}/{split}/{t}/{i:03d}.png" for i, t in enumerate(defect_types)],
    )


class SyntheticDataset:
    """`open_dataset("synthetic")`: 12 classes, `n_train` good train and `n_test` test images."""

    def __init__(self, *, image_size: int = 224, seed: int = 0, n_train: int = 20,
                 n_test: int = 16, n_good_test: int = 4):
        if n_train < 1 or n_test <= n_good_test or n_good_test < 1:
            raise UserInputError(
                f"synthetic set: need n_train >= 1 and n_test > n_good_test >= 1, got "
                f"n_train={n_train}, n_test={n_test}, n_good_test={n_good_test}"
            )
        self.image_size, self.seed = image_size, seed
        self.sizes = {"train": n_train, "test": n_test}
        self.n_good_test = n_good_test
        self.classes = list(SYNTHETIC_CLASSES)
        self.layout, self.splits = "synthetic", ("train", "test")
        self.notes = [f"generated from seed {seed}: {n_train} train and {n_test} test images per class"]
        self._memory: dict[tuple[str, str], CategoryArrays] = {}

    def counts(self, category: str) -> dict[str, Counter]:
        """{split: Counter(defect type -> images)}, without generating anything."""
        if category not in DEFECT_TYPES:
            raise UserInputError(f"unknown synthetic category {category!r}; expected one of {self.classes}")
        types = DEFECT_TYPES[category]
        test = ["good"] * self.n_good_test + [types[i % len(types)] for i in range(self.sizes["test"] - self.n_good_test)]
        return {"train": Counter(good=self.sizes["train"]), "test": Counter(test)}

    def load(self, category: str, split: str) -> CategoryArrays:
        if split not in self.sizes:
            raise UserInputError(f"split must be 'train' or 'test', got {split!r}")
        key = (category, split)
        if key not in self._memory:
            self._memory[key] = generate_category(
                category, split, self.sizes[split], image_size=self.image_size, seed=self.seed,
                n_good_test=self.n_good_test,
            )
        return self._memory[key]


def save_contact_sheet(dataset, path, *, classes=None, per_class: int = 6) -> None:
    """A PNG grid: per class, test images with their masks beside them (image | mask)."""
    rows = []
    for category in classes or dataset.classes:
        arrays = dataset.load(category, "test")
        order = np.argsort(-arrays.labels, kind="stable")[:per_class]
        tiles = []
        for i in order:
            mask_rgb = np.repeat(arrays.masks[i][..., None], 3, -1).astype(np.uint8) * 255
            tiles += [arrays.images[i], mask_rgb]
        rows.append(np.concatenate(tiles, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main(argv: list[str] | None = None) -> int:
    """`python -m nexvitad_jax.data.synthetic --sheet OUT.png`: look at the set."""
    parser = argparse.ArgumentParser(description="Save a contact sheet of the synthetic set.")
    parser.add_argument("--sheet", required=True, help="output PNG (image | mask pairs)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--seed", type=int, default=0, help="the set's seed (default 0)")
    parser.add_argument("--per-class", type=int, default=6, help="images per class on the sheet (default 6)")
    parser.add_argument("--classes", default="", help="comma-separated (default: all)")
    args = parser.parse_args(argv)
    classes = [c for c in args.classes.split(",") if c] or None
    dataset = SyntheticDataset(image_size=args.image_size, seed=args.seed)
    save_contact_sheet(dataset, args.sheet, classes=classes, per_class=args.per_class)
    print(f"wrote {args.sheet}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
