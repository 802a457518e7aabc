"""The `nexvitad` command: a thin dispatcher over subcommands that live beside their code.

Each entry maps a subcommand to "module:function"; the function takes argv (the arguments after
the subcommand) and returns an exit status. Modules are imported only when their command runs.
Packages outside the library add commands through the `nexvitad.commands` entry-point group (the
converters register `convert` in pyproject.toml), so the library never names them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

from nexvitad_jax.errors import UserInputError

COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "run": ("nexvitad_jax.run:main", "the main job: train, adapt, memory-bank inference, evaluate, report"),
    "score": ("nexvitad_jax.inference.command:main", "memory-bank anomaly maps and image scores for a folder of images"),
    "evaluate": ("nexvitad_jax.metrics.command:main", "metrics of anomaly maps saved as .npz (scores, masks[, image_scores])"),
    "data": ("nexvitad_jax.data.command:main", "inspect, prepare (decode once into the cache) or look at a dataset"),
}
ENTRY_POINT_GROUP = "nexvitad.commands"


def commands() -> dict[str, tuple[str, str]]:
    """The library's commands and those registered by installed packages (help: the first line of
    the command module's docstring, read when listed)."""
    found = dict(COMMANDS)
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, (entry.value, ""))
    return found


def _help(target: str, help_: str) -> str:
    if help_:
        return help_
    module = importlib.import_module(target.split(":")[0])
    return (module.__doc__ or "").strip().split("\n")[0]


def _usage() -> str:
    lines = ["usage: nexvitad COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {_help(target, help_)}" for name, (target, help_) in commands().items()]
    lines += ["", "`nexvitad COMMAND --help` describes each command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    available = commands()
    if name not in available:
        print(f"nexvitad: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = available[name][0].split(":")
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
