"""Compiling for compile speed, for programs where compile time matters more than run time.

`fast_compile_options()`: XLA's LLVM optimization level 0 and, on CPU, the classic elemental
emitters instead of the MLIR fusion emitters. Programs compile several times faster and run
slower, which pays where compilation dominates: tests, the tiny config, runs of a few hundred steps.
Options the running XLA does not know are left out (they are probed once), so a newer XLA
degrades to the default compilation, never to an error.

`initialize(create)`: an nnx module built with all of its initializers in one such program.
Eagerly, every initializer call of a new shape compiles an XLA program of its own, which makes
building even the tiny NexViTAD model compile-bound. jax.random is deterministic under jit; the
values differ from eager ones by float rounding only.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

Module = TypeVar("Module", bound=nnx.Module)

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


@functools.cache
def fast_compile_options() -> dict[str, Any]:
    """The options of `_FAST_COMPILE` that the running XLA accepts, for jax.jit(compiler_options=...)."""
    accepted = {}
    for name, value in _FAST_COMPILE.items():
        try:
            jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(compiler_options={name: value})
        except Exception:  # an unknown option: XLA raises its own error types
            continue
        accepted[name] = value
    return accepted


def initialize(create: Callable[[], Module], *, placeholders: nnx.filterlib.Filter = nnx.Nothing) -> Module:
    """`create()` with its variables computed by one fast-compiled program (it runs once). Variables
    matching `placeholders` stay abstract (jax.ShapeDtypeStruct) for the caller to replace, e.g. by
    loaded backbone weights; XLA never computes them. Inside a jax transformation (jit, eval_shape)
    it is plain `create()`: the enclosing program holds the initializers."""
    if isinstance(jnp.zeros(()), jax.core.Tracer):  # staged out: we are being traced
        return create()
    graphdef, abstract_placeholders, _ = nnx.split(nnx.eval_shape(create), placeholders, ...)
    initialized = jax.jit(lambda: nnx.split(create(), placeholders, ...)[2],
                          compiler_options=fast_compile_options())()
    return nnx.merge(graphdef, abstract_placeholders, initialized)
