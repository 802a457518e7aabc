"""The split protocol and the few-shot choice of normal images."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nexvitad_jax.data import (
    MVTEC_CLASSES,
    PAPER_CLASSES,
    few_shot_indices,
    fixed_split,
    make_split,
    parse_split,
)
from nexvitad_jax.errors import UserInputError


def test_paper_classes_are_mvtec_without_grid_screw_zipper():
    assert sorted(PAPER_CLASSES) == sorted(set(MVTEC_CLASSES) - {"grid", "screw", "zipper"})
    assert len(PAPER_CLASSES) == 12


@pytest.mark.parametrize("text, expected", [("11/1", (11, 1)), ("10/2", (10, 2)), (" 9 / 3 ", (9, 3)), ("8/4", (8, 4))])
def test_parse_split(text, expected):
    assert parse_split(text) == expected


@pytest.mark.parametrize("text", ["11", "11-1", "0/12", "12/0", "a/b", "", "11/1/0"])
def test_parse_split_errors(text):
    with pytest.raises(UserInputError, match="expected SOURCE/TARGET"):
        parse_split(text)


@pytest.mark.parametrize("n_source, n_target", [(11, 1), (10, 2), (9, 3), (8, 4)])
def test_paper_splits_partition_the_classes(n_source, n_target):
    targets = set()
    for seed in range(20):
        source, target = make_split(PAPER_CLASSES, n_target, seed)
        assert len(source) == n_source and len(target) == n_target
        assert sorted(source + target) == sorted(PAPER_CLASSES)
        assert make_split(list(reversed(PAPER_CLASSES)), n_target, seed) == (source, target)
        targets.add(tuple(target))
    assert len(targets) > 5  # seeds draw different classes


def test_split_of_a_folder_with_other_classes():
    source, target = make_split(["hazelnut", "transistor"], 1, seed=3)
    assert sorted(source + target) == ["hazelnut", "transistor"] and len(target) == 1
    with pytest.raises(UserInputError, match="n_target=2: expected 1 <= n_target < 2"):
        make_split(["hazelnut", "transistor"], 2, seed=0)
    with pytest.raises(UserInputError, match="duplicates"):
        make_split(["a", "a", "b"], 1, seed=0)


def test_fixed_split():
    assert fixed_split(["a", "b", "c"], ["c"]) == (["a", "b"], ["c"])
    with pytest.raises(UserInputError, match=r"\['z'\] are not in"):
        fixed_split(["a", "b"], ["z"])
    with pytest.raises(UserInputError, match="one source class"):
        fixed_split(["a", "b"], ["a", "b"])


def _reference_few_shot(files, m, seed):
    """The protocol as written: sorted(files)[seed*M:(seed+1)*M], wrapping around the end."""
    ordered = sorted(files)
    doubled = ordered * (2 + (seed * m + m) // len(ordered))
    return doubled[seed * m: seed * m + m]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.text("abc0123/", min_size=1, max_size=6), min_size=1, max_size=40, unique=True),
    st.integers(1, 12),
    st.integers(0, 9),
)
def test_few_shot_indices_match_the_protocol(files, m, seed):
    rng = np.random.default_rng(len(files))
    shuffled = list(rng.permutation(files))
    indices = few_shot_indices(shuffled, m, seed)
    assert [shuffled[i] for i in indices] == _reference_few_shot(files, m, seed)
    assert len(indices) == m and len(set(indices.tolist())) == min(m, len(files))


def test_few_shot_plain_slice_and_errors():
    files = [f"{i:03d}.png" for i in range(25)][::-1]
    assert [files[i] for i in few_shot_indices(files, 10, 1)] == [f"{i:03d}.png" for i in range(10, 20)]
    assert [files[i] for i in few_shot_indices(files, 10, 2)] == [f"{i:03d}.png" for i in [20, 21, 22, 23, 24, 0, 1, 2, 3, 4]]
    with pytest.raises(UserInputError, match="no normal images"):
        few_shot_indices([], 10, 0)
    with pytest.raises(UserInputError, match="M=0"):
        few_shot_indices(files, 0, 0)
    with pytest.raises(UserInputError, match="seed=-1"):
        few_shot_indices(files, 3, -1)
