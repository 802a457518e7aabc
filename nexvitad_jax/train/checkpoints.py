"""Resumable checkpoints: orbax CheckpointManager holding the train state (params, optimizer state,
BatchNorm statistics, step, RNG), the current pseudo-labels and the data-order metadata. Orbax
writes each step to a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact.

The state is saved as nested dicts keyed by each leaf's tree path (e.g. trainable / encoder /
adapters / 0 / down / kernel / value), so a checkpoint says what it holds; on restore the tree
structure comes from the live state (which sidesteps orbax's handling of nnx.State keys).
Checkpoints written before that keyed the leaves by their index ("00000", "00001", ...); they are
restored by index when they fit the live state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from nexvitad_jax.errors import UserInputError


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A leaf's tree path as names: dict keys, sequence indices and attribute names, as strings."""
    names = []
    for key in path:
        for attribute in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
            if hasattr(key, attribute):
                names.append(str(getattr(key, attribute)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def leaves_by_path(tree: Any) -> dict[str, Any]:
    """The leaves of `tree` in nested dicts keyed by their path's names."""
    nested: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        *parents, name = path_names(path)
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = leaf
    return nested


def _abstract(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {path_names(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpoints:
    def __init__(self, directory: str | Path, *, every_steps: int, keep: int = 2):
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(save_interval_steps=max(int(every_steps), 1),
                                                                 max_to_keep=keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "pseudo_labels": ocp.StandardCheckpointHandler(),
                           "metadata": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, pseudo_labels: Any, metadata: dict[str, Any], *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(leaves_by_path(state)),
                 "pseudo_labels": ocp.args.StandardSave({"labels": pseudo_labels}),
                 "metadata": ocp.args.JsonSave(metadata)}
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` would write (the save interval)."""
        return self.manager.should_save(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, state_like: Any, pseudo_labels_like: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Restore onto the structure and shardings of `state_like` / `pseudo_labels_like`."""
        flat, treedef = jax.tree_util.tree_flatten_with_path(jax.tree.map(_abstract, state_like))
        saved = _shapes(self.manager.item_metadata(step)["state"].tree)
        if saved and all(len(names) == 1 and names[0].isdigit() for names in saved):  # the earlier index format
            keys = [(f"{index:05d}",) for index in range(len(flat))]
            target = {key: leaf for (key,), (_, leaf) in zip(keys, flat)}
        else:
            keys = [path_names(path) for path, _ in flat]
            target = leaves_by_path(jax.tree.unflatten(treedef, [leaf for _, leaf in flat]))
        self._check_fits(step, saved, _shapes(target))
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            pseudo_labels=ocp.args.StandardRestore({"labels": _abstract(pseudo_labels_like)}),
            metadata=ocp.args.JsonRestore()))
        by_key = {path_names(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(restored["state"])[0]}
        state = jax.tree.unflatten(treedef, [by_key[key] for key in keys])
        return state, restored["pseudo_labels"]["labels"], dict(restored["metadata"])

    def _check_fits(self, step: int, saved: dict, expected: dict) -> None:
        """A clear error for a checkpoint of another train state (another config, split or version)."""
        differing = sorted(set(saved) ^ set(expected)) or sorted(k for k in expected if saved[k] != expected[k])
        if differing:
            shown = ", ".join("/".join(names) for names in differing[:5])
            raise UserInputError(
                f"checkpoint {self.directory / str(step)} does not fit this run's train state ({len(differing)} "
                f"entries differ in name or shape, e.g. {shown}): it was written by another config, split or "
                f"version of nexvitad. Re-create it by training again: delete {self.directory} or use a new workdir")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
