"""Resumable checkpoints: orbax CheckpointManager holding the train state (params, optimizer state,
BatchNorm statistics, step, RNG), the current pseudo-labels and the data-order metadata. Orbax
writes each step to a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str | Path, *, every_steps: int, keep: int = 2):
        self.directory = Path(directory).resolve()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(save_interval_steps=max(int(every_steps), 1),
                                                                 max_to_keep=keep, create=True))

    @staticmethod
    def _leaves(tree: Any) -> dict[str, Any]:
        # Saved as a flat dict of leaves: the tree structure comes from the live state on restore,
        # which sidesteps orbax's handling of nnx.State keys.
        return {f"{index:05d}": leaf for index, leaf in enumerate(jax.tree.leaves(tree))}

    def save(self, step: int, state: Any, pseudo_labels: Any, metadata: dict[str, Any], *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(self._leaves(state)),
                 "pseudo_labels": ocp.args.StandardSave({"labels": pseudo_labels}),
                 "metadata": ocp.args.JsonSave(metadata)}
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, state_like: Any, pseudo_labels_like: Any) -> tuple[Any, Any, dict[str, Any]]:
        """Restore onto the structure and shardings of `state_like` / `pseudo_labels_like`."""
        def abstract(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

        leaves, treedef = jax.tree.flatten(state_like)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({f"{i:05d}": abstract(x) for i, x in enumerate(leaves)}),
            pseudo_labels=ocp.args.StandardRestore({"labels": abstract(pseudo_labels_like)}),
            metadata=ocp.args.JsonRestore()))
        state = jax.tree.unflatten(treedef, [restored["state"][f"{i:05d}"] for i in range(len(leaves))])
        return state, restored["pseudo_labels"]["labels"], dict(restored["metadata"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)
