"""What makes two runs or two detectors the same: short keys of JSON identities, weight
fingerprints, and readable lists of the fields where two identities differ."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import numpy as np

# Where a checkpoint lives says nothing about what it computes (its weights fingerprint does).
_IGNORED_IN_COMPARISON = {"directory"}


def identity_key(identity: Any) -> str:
    """A 16-hex-digit key of a JSON-able identity (key order does not matter)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_fingerprint(params: Any) -> str:
    """A short digest of every parameter's shape and float64 sums: tells different weights apart."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        array = np.asarray(leaf, np.float64)
        digest.update(f"{jax.tree_util.keystr(path)}{array.shape}{array.sum():.6e}{np.abs(array).sum():.6e}".encode())
    return digest.hexdigest()[:16]


def describe_differences(saved: Any, current: Any, prefix: str = "", *, what: str = "saved detector") -> list[str]:
    """Human-readable list of the fields where two identities differ (locations ignored); `what`
    names the saved side."""
    if isinstance(saved, dict) and isinstance(current, dict):
        lines = []
        for key in sorted((set(saved) | set(current)) - _IGNORED_IN_COMPARISON, key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in current:
                lines.append(f"{name}: saved {saved[key]!r}, missing now")
            elif key not in saved:
                lines.append(f"{name}: not in the {what}, now {current[key]!r}")
            else:
                lines += describe_differences(saved[key], current[key], name, what=what)
        return lines
    return [] if saved == current else [f"{prefix}: saved {saved!r}, now {current!r}"]
