"""Resumable checkpoints: orbax CheckpointManager holding the train state (params, optimizer state,
BatchNorm statistics, step, RNG), the current pseudo-labels and the data-order metadata. Orbax
writes each step to a temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact.

Saving is synchronous (the state is small: the frozen backbones are not in it) and runs with
SIGINT/SIGTERM held (`nexvitad_jax.signals.deferred`): an interrupt lets the write in flight finish.
A save that fails (no space, read-only, permission denied) removes its temporary directory, keeps
the previous checkpoints, and raises one OSError naming the step's directory and the cause, in
place of orbax's error tracebacks from its writer threads (silenced while a save runs). Temporary
directories of a process killed mid-save are removed when the next run opens the checkpoints.

The state is saved as nested dicts keyed by each leaf's tree path (e.g. trainable / encoder /
adapters / 0 / down / kernel / value), so a checkpoint says what it holds; on restore the tree
structure comes from the live state (which sidesteps orbax's handling of nnx.State keys).
Checkpoints written before that keyed the leaves by their index ("00000", "00001", ...); they are
restored by index when they fit the live state.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from nexvitad_jax.errors import UserInputError
from nexvitad_jax.io import naming
from nexvitad_jax.signals import deferred

TMP_MARK = ".orbax-checkpoint-tmp"


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
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if jax.process_index() == 0:
                _remove_temporaries(self.directory)
        except OSError as error:
            raise naming(error, self.directory) from None
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(save_interval_steps=max(int(every_steps), 1),
                                                                 max_to_keep=keep, create=True,
                                                                 enable_async_checkpointing=False),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "pseudo_labels": ocp.StandardCheckpointHandler(),
                           "metadata": ocp.JsonCheckpointHandler()})

    def save(self, step: int, state: Any, pseudo_labels: Any, metadata: dict[str, Any], *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(leaves_by_path(state)),
                 "pseudo_labels": ocp.args.StandardSave({"labels": pseudo_labels}),
                 "metadata": ocp.args.JsonSave(metadata)}
        try:
            with deferred(), _orbax_quiet():
                return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as error:
            _remove_temporaries(self.directory)
            cause = _os_error(error, self.directory / str(step))
            if cause is None:
                raise
            raise cause from None

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


def _remove_temporaries(directory: Path) -> None:
    """Orbax's temporary directories of steps whose save did not complete."""
    for path in directory.glob(f"*{TMP_MARK}*"):
        shutil.rmtree(path, ignore_errors=True)


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")
_STATUS_ERRNO = {"RESOURCE_EXHAUSTED": errno.ENOSPC, "PERMISSION_DENIED": errno.EACCES}


def _os_error(error: BaseException, path: Path) -> OSError | None:
    """The OSError behind a failed save (orbax and tensorstore wrap it in ValueErrors and their
    status codes) naming `path`, or None if there is none."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return naming(seen, path)
        code = _OS_ERROR_CODE.search(str(seen))
        if code:
            return naming(OSError(int(code.group(1)), os.strerror(int(code.group(1)))), path)
        status = next((errno_ for name, errno_ in _STATUS_ERRNO.items() if str(seen).startswith(name)), None)
        if status is not None:
            return naming(OSError(status, os.strerror(status)), path)
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def _orbax_quiet() -> Iterator[None]:
    """Orbax logs each writer thread's failure with its traceback (absl ERROR): the save's own
    exception says it once."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
