"""The data a run will use, checked before any training: `run_data_problems(dataset, source, target)`.

It loads what the run loads (every image and mask of the source classes, the target classes' train
and test sets), so the decode cache is filled and training later reads it back. Where a split fails
to decode, its files are decoded one by one to list every unreadable image, mis-sized mask or
missing file, not only the first.
"""

from __future__ import annotations

from typing import Sequence

from nexvitad_jax.data.decode import decode_example
from nexvitad_jax.errors import UserInputError

SPLITS = ("train", "test")


def run_data_problems(dataset, source: Sequence[str], target: Sequence[str]) -> list[str]:
    """Every problem of the splits a run reads: source classes (train and test: the images and
    masks it trains on) and target classes (train: the few-shot images; test: what it scores).
    An empty list: the data is good to run."""
    problems = []
    for category in [*source, *target]:
        for split in SPLITS:
            try:
                dataset.load(category, split)
            except (UserInputError, OSError) as error:
                found = _entry_problems(dataset, category, split)
                if not found and isinstance(error, OSError):
                    raise  # not the data's fault (the cache, say): its own error, not a data problem
                problems += found or [f"{category}/{split}: {error}"]
    return problems


def _origin(dataset, category: str):
    """(the dataset that holds `category`, its name there): a cross-dataset's part, else itself."""
    resolve = getattr(dataset, "origin", None)  # CrossDataset
    return resolve(category) if resolve is not None else (dataset, category)


def _entry_problems(dataset, category: str, split: str) -> list[str]:
    """Each file of a (class, split) of a file-based dataset decoded alone: its problems (empty
    for a dataset without files, or when every file decodes)."""
    holder, name = _origin(dataset, category)
    index = getattr(holder, "index", None)
    if not isinstance(index, dict) or name not in index or not index[name].get(split):
        return []
    read = holder.reader(name)
    problems = []
    for entry in index[name][split]:
        try:
            decode_example(entry, read, holder.image_size)
        except UserInputError as error:
            problems.append(str(error))
        except OSError as error:
            problems.append(f"{entry.display_path}: not readable ({error.strerror or error})")
    return problems
