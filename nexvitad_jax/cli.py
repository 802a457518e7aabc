"""The `nexvitad` command: a thin dispatcher over subcommands that live beside their code.

Each entry maps a subcommand to "module:function"; the function takes argv (the arguments after
the subcommand) and returns an exit status. Modules are imported only when their command runs.
"""

from __future__ import annotations

import importlib
import sys

from nexvitad_jax.errors import UserInputError

COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "run": ("nexvitad_jax.pipeline:main", "the main job: train, adapt, memory-bank inference, evaluate, report"),
    "score": ("nexvitad_jax.inference.command:main", "memory-bank anomaly maps and image scores for a folder of images"),
    "evaluate": ("nexvitad_jax.metrics.command:main", "metrics of anomaly maps saved as .npz (scores, masks[, image_scores])"),
    "data": ("nexvitad_jax.data.command:main", "inspect, prepare (decode once into the cache) or look at a dataset"),
    "convert": ("converters.__main__:main", "convert PyTorch Hiera/DINOv2 checkpoints to Flax (orbax + config.json)"),
}


def _usage() -> str:
    lines = ["usage: nexvitad COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`nexvitad COMMAND --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"nexvitad: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except UserInputError as err:
        print(f"nexvitad {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nexvitad {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
