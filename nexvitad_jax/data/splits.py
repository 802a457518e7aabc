"""The paper's cross-domain split protocol and the few-shot choice of normal images.

The paper evaluates 12 MVTec AD classes (all but grid, screw, zipper) as C_s source / C_t target
splits 11/1, 10/2, 9/3 and 8/4, drawing the target classes at random per seed; the memory bank
and target adaptation use M normal images chosen as `sorted(files)[seed*M:(seed+1)*M]`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from nexvitad_jax.errors import UserInputError

PAPER_CLASSES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "hazelnut", "leather",
    "metal_nut", "pill", "tile", "toothbrush", "transistor", "wood",
)  # fmt: skip
PAPER_SPLITS: tuple[tuple[int, int], ...] = ((11, 1), (10, 2), (9, 3), (8, 4))


def parse_split(text: str) -> tuple[int, int]:
    """"11/1" -> (11, 1): C_s source classes / C_t target classes, both >= 1."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise UserInputError(
            f"split {text!r}: expected SOURCE/TARGET class counts such as 11/1, 10/2, 9/3 or 8/4"
        )
    return int(match[1]), int(match[2])


def make_split(classes: Sequence[str], n_target: int, seed: int) -> tuple[list[str], list[str]]:
    """Draw `n_target` target classes from `classes` (the rest are the source), by seed.

    Deterministic: the same (set of classes, n_target, seed) gives the same split whatever the
    order `classes` comes in. Both lists are returned sorted.
    """
    pool = sorted(set(classes))
    if len(pool) != len(list(classes)):
        raise UserInputError(f"classes contain duplicates: {list(classes)}")
    if not isinstance(n_target, (int, np.integer)) or not 1 <= n_target < len(pool):
        raise UserInputError(
            f"n_target={n_target!r}: expected 1 <= n_target < {len(pool)} (the number of "
            f"classes available: {pool}), leaving at least one source class"
        )
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(pool), size=int(n_target), replace=False).tolist())
    target = [c for i, c in enumerate(pool) if i in chosen]
    source = [c for i, c in enumerate(pool) if i not in chosen]
    return source, target


def fixed_split(classes: Sequence[str], target: Sequence[str]) -> tuple[list[str], list[str]]:
    """`--target CLASS[,CLASS]`: the given targets, every other class as source."""
    pool = sorted(set(classes))
    unknown = sorted(set(target) - set(pool))
    if unknown:
        raise UserInputError(f"target classes {unknown} are not in the dataset's classes {pool}")
    if not target or len(set(target)) >= len(pool):
        raise UserInputError(
            f"target {list(target)}: expected at least one target class and one source class "
            f"left among {pool}"
        )
    return [c for c in pool if c not in set(target)], sorted(set(target))


def few_shot_indices(paths: Sequence[str], m: int, seed: int) -> np.ndarray:
    """Indices into `paths` of `sorted(paths)[seed*M:(seed+1)*M]`, wrapping around the end.

    Always M indices (callers stack classes): with fewer than M files the wrap repeats files.
    """
    n = len(paths)
    if n == 0:
        raise UserInputError("few-shot selection: no normal images to choose from")
    if not isinstance(m, (int, np.integer)) or m < 1:
        raise UserInputError(f"few-shot M={m!r}: expected a positive integer")
    if seed < 0:
        raise UserInputError(f"few-shot seed={seed!r}: expected a non-negative integer")
    order = np.argsort(np.asarray(paths, dtype=str), kind="stable")
    return order[(seed * int(m) + np.arange(int(m))) % n]


def protocol_classes(held: Sequence[str]) -> list[str]:
    """The classes a split draws from: the paper's 12 when the dataset holds them all (full MVTec
    AD), else every class it holds."""
    held = sorted(held)
    return list(PAPER_CLASSES) if set(PAPER_CLASSES) <= set(held) else held


def resolve_split(classes: Sequence[str], split: str | None, target: str | Sequence[str] | None,
                  seed: int) -> tuple[list[str], list[str]]:
    """(source, target) classes of a run: `target` fixes the targets (`--target a,b`), else the
    split (default all-but-one / 1) draws them by seed. A split using fewer classes than available
    (e.g. 1/1 on a larger set) first draws its classes."""
    if target:
        names = [t.strip() for t in target.split(",")] if isinstance(target, str) else list(target)
        source, chosen = fixed_split(classes, [n for n in names if n])
        if split is not None:
            n_source, n_target = parse_split(split)
            if n_target != len(chosen) or n_source > len(source):
                raise UserInputError(f"--split {split} does not fit --target {','.join(chosen)} with "
                                     f"{len(source)} other classes available")
            source = sorted(np.random.default_rng(seed).permutation(source)[:n_source].tolist())
        return source, chosen
    n_source, n_target = parse_split(split) if split is not None else (len(classes) - 1, 1)
    if n_source + n_target > len(classes):
        raise UserInputError(f"split {n_source}/{n_target} needs {n_source + n_target} classes; the dataset "
                             f"holds {len(classes)}: {list(classes)}")
    pool = sorted(classes)
    if n_source + n_target < len(pool):
        pool = sorted(np.random.default_rng([seed, 1]).permutation(pool)[:n_source + n_target].tolist())
    return make_split(pool, n_target, seed)


def few_shot_images(dataset, category: str, m: int, seed: int) -> np.ndarray:
    """The M few-shot normal images of a class (uint8, (M, H, W, 3)): its train/good images at
    `few_shot_indices`, for target adaptation and the memory bank alike."""
    train = dataset.load(category, "train")
    return train.images[few_shot_indices(train.paths, m, seed)]
