"""The `nexvitad` command: a thin dispatcher over subcommands that live beside their code.

Each entry maps a subcommand to "module:function"; the function takes argv (the arguments after
the subcommand) and returns an exit status. Modules are imported only when their command runs.
Packages outside the library add commands through the `nexvitad.commands` entry-point group (the
converters register `convert` in pyproject.toml), so the library never names them.
"""

from __future__ import annotations

import errno
import importlib
import importlib.metadata
import sys

from nexvitad_jax import signals
from nexvitad_jax.errors import UserInputError
from nexvitad_jax.io import WriteFailed

COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", one-line help)
    "run": ("nexvitad_jax.run:main", "the main job: train, adapt, memory-bank inference, evaluate, report"),
    "fit": ("nexvitad_jax.inference.fitted:main", "fit and calibrate a detector on normal images (or a run's class); save it as a folder"),
    "score": ("nexvitad_jax.inference.command:main", "anomaly maps, scores and decisions of a detector for a folder of images"),
    "export": ("nexvitad_jax.inference.export:main", "export a fitted detector as StableHLO (nexvitad_jax.deploy) or ONNX"),
    "evaluate": ("nexvitad_jax.metrics.command:main", "metrics of anomaly maps saved as .npz (scores, masks[, image_scores])"),
    "data": ("nexvitad_jax.data.command:main", "inspect, prepare (decode once into the cache) or look at a dataset"),
    "report": ("nexvitad_jax.report_html:main", "rebuild a run's report.html (tables, heatmaps, curves, config)"),
}
ENTRY_POINT_GROUP = "nexvitad.commands"
WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}  # said as "cannot write PATH: ..."


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
    """Run a command; its exit status: 0, 1 (an OSError on a file: one line), 2 (a user's mistake),
    130/143 (SIGINT/SIGTERM)."""
    standalone = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from nexvitad_jax import __version__

        print(f"nexvitad {__version__} (Python {sys.version.split()[0]})")
        return 0
    name, rest = argv[0], argv[1:]
    available = commands()
    if name not in available:
        print(f"nexvitad: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    handlers = signals.install()
    try:
        module_name, func_name = available[name][0].split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except UserInputError as err:
        return _failed(name, str(err), 2, standalone)
    except OSError as err:
        return _failed(name, describe_os_error(err), 1, standalone)
    except KeyboardInterrupt as err:
        signals.ignore_further()
        return _failed(name, f"interrupted ({signal_name(err)}); run the same command again to resume",
                       signals.exit_status(err), standalone, prefix="")
    finally:
        if not standalone:  # called in-process (tests, notebooks): the caller's handlers come back
            signals.restore(handlers)


def _failed(name: str, message: str, status: int, standalone: bool, prefix: str = "error: ") -> int:
    """Say it in one line; the console script then exits at once (`signals.exit_now`: no
    interpreter teardown under JAX's threads, which could crash after an interrupt)."""
    print(f"nexvitad {name}: {prefix}{message}", file=sys.stderr)
    if standalone:
        signals.exit_now(status)
    return status


def describe_os_error(error: OSError) -> str:
    """"cannot write PATH: No space left on device": the path and the cause, one line (the cause
    alone when the error names no file)."""
    if error.filename is None:
        return error.strerror or str(error)
    where = f"{error.filename}" + (f" -> {error.filename2}" if error.filename2 else "")
    writing = isinstance(error, WriteFailed) or error.errno in WRITE_ERRORS
    return f"{'cannot write ' if writing else ''}{where}: {error.strerror or error}"


def signal_name(error: BaseException) -> str:
    return "SIGTERM" if getattr(error, "signum", None) == signals.signal.SIGTERM else "SIGINT"


if __name__ == "__main__":
    sys.exit(main())
