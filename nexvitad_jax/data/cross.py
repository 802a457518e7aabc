"""Cross-dataset runs: the source classes from one dataset, the target classes from another
(`nexvitad run --data SOURCE --target-data TARGET [--target CLASSES] [--split a/b]`).

`CrossDataset(source, target)` is one dataset whose classes are both sets: a name the two share is
prefixed ("source.bottle", "target.bottle"), every other name is kept. `split_classes` is the
split of any dataset: for a cross dataset the source classes come from the source only and the
target classes from the target only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from nexvitad_jax.data.decode import CategoryArrays
from nexvitad_jax.data.splits import parse_split, protocol_classes, resolve_split
from nexvitad_jax.errors import UserInputError

ROLES = ("source", "target")


class CrossDataset:
    """Two datasets as one: `classes` = source classes + target classes (clashing names prefixed)."""

    layout = "cross-dataset"

    def __init__(self, source, target):
        if getattr(source, "image_size", None) != getattr(target, "image_size", None):
            raise UserInputError(f"cross-dataset: source and target image sizes differ "
                                 f"({getattr(source, 'image_size', None)} vs {getattr(target, 'image_size', None)})")
        self.source, self.target, self.image_size = source, target, source.image_size
        clash = set(source.classes) & set(target.classes)
        self._origin: dict[str, tuple[object, str]] = {}
        self.role_classes: dict[str, list[str]] = {}
        for role, dataset in zip(ROLES, (source, target)):
            names = [f"{role}.{c}" if c in clash else c for c in dataset.classes]
            self._origin.update({name: (dataset, c) for name, c in zip(names, dataset.classes)})
            self.role_classes[role] = sorted(names)
        self.classes = sorted(self._origin)
        self.splits = tuple(s for s in source.splits if s in target.splits)
        self.notes = [f"source: {source.layout} ({len(source.classes)} classes); target: {target.layout} "
                      f"({len(target.classes)} classes)"
                      + (f"; classes in both prefixed source./target.: {sorted(clash)}" if clash else ""),
                      *(f"{role}: {note}" for role, d in zip(ROLES, (source, target)) for note in d.notes)]

    def origin(self, category: str) -> tuple[object, str]:
        """(the dataset that holds `category`, the class's name there)."""
        if category not in self._origin:
            raise UserInputError(f"unknown category {category!r} in the cross-dataset; it holds {self.classes}")
        return self._origin[category]

    def load(self, category: str, split: str) -> CategoryArrays:
        dataset, name = self.origin(category)
        return dataset.load(name, split)

    def counts(self, category: str) -> dict[str, Counter]:
        dataset, name = self.origin(category)
        return dataset.counts(name)

    def original_name(self, category: str) -> str:
        """The class's name in its own dataset ("target.bottle" -> "bottle")."""
        return self.origin(category)[1]

    def role_of(self, category: str) -> str:
        return next(role for role in ROLES if category in self.role_classes[role])

    def target_names(self, names: Sequence[str]) -> list[str]:
        """Target classes as named by the user (the target's own name or the prefixed one) -> names
        in this dataset."""
        by_name = {self.original_name(c): c for c in self.role_classes["target"]}
        by_name.update({c: c for c in self.role_classes["target"]})
        unknown = sorted(set(names) - set(by_name))
        if unknown:
            raise UserInputError(f"--target {unknown}: not classes of the target data (it holds "
                                 f"{sorted(self.target.classes)})")
        return sorted({by_name[n] for n in names})


def _names(target: str | Sequence[str] | None) -> list[str]:
    if not target:
        return []
    names = target.split(",") if isinstance(target, str) else list(target)
    return [n.strip() for n in names if n.strip()]


def cross_split(dataset: CrossDataset, split: str | None, target: str | Sequence[str] | None,
                seed: int) -> tuple[list[str], list[str]]:
    """(source, target) of a cross-dataset run, both sorted.

    Source: the source data's protocol classes (the paper's 12 for full MVTec AD, else all it holds),
    or `a` of them drawn by seed with `--split a/b`. Target: `--target` (the target data's names),
    else `b` classes (1 without --split) drawn by seed from the target data."""
    protocol = set(protocol_classes(dataset.source.classes))
    pool = [c for c in dataset.role_classes["source"] if dataset.original_name(c) in protocol]
    targets = dataset.target_names(_names(target)) if _names(target) else []
    n_source, n_target = parse_split(split) if split is not None else (len(pool), len(targets) or 1)
    if targets and n_target != len(targets):
        raise UserInputError(f"--split {split} does not fit --target {','.join(targets)}")
    if n_source > len(pool) or n_target > len(dataset.role_classes["target"]):
        raise UserInputError(f"split {n_source}/{n_target}: the source data holds {len(pool)} classes {pool}, "
                             f"the target data {len(dataset.role_classes['target'])}")
    source = sorted(np.random.default_rng(seed).permutation(pool)[:n_source].tolist())
    if not targets:
        targets = sorted(np.random.default_rng([seed, 2]).permutation(dataset.role_classes["target"])[:n_target]
                         .tolist())
    return source, targets


def split_classes(dataset, split: str | None, target: str | Sequence[str] | None,
                  seed: int) -> tuple[list[str], list[str]]:
    """The (source, target) classes of a run on any dataset: `cross_split` for a cross dataset, else
    `resolve_split` over the dataset's protocol classes."""
    if isinstance(dataset, CrossDataset):
        return cross_split(dataset, split, target, seed)
    return resolve_split(protocol_classes(dataset.classes), split, target, seed)
