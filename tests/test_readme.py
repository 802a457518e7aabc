"""The README's shell commands, in order, as a new user types them one after another (in a fresh
folder): those that need no pretrained weights, no full dataset and no network. The others are
listed below with the reason they are skipped.

The fast test plans each `nexvitad run` as written (its config checked whole, its dataset and split,
its workdir's identity) and checks that no command would be refused by a workdir holding another
run, and that each `nexvitad evaluate` reads maps an earlier command writes. The slow test runs
every command, with overrides appended that make each run short (the demo pipeline at 64 px, one
training step).
"""

import re
import shlex
from pathlib import Path, PurePosixPath

import pytest

from nexvitad_jax import cli
from nexvitad_jax.run import parse_args, plan_run, spec_from_args

README = Path(__file__).resolve().parents[1] / "README.md"

# What a command starts with -> why it is not run here (by design, not by accident).
SKIPPED_BY_DESIGN = {
    "python3 -m venv": "creates the environment these tests run in",
    ". .venv/bin/activate": "activates that environment",
    "pip install": "installs packages (network)",
    "pytest": "runs this test suite",
    "python -m converters": "needs the pretrained weights (the model hub or local copies)",
    "nexvitad run --config paper": "needs the converted Hiera-Huge and DINOv2 weights",
    "nexvitad run --data path/to/": "needs the full MVTec AD dataset",
}
# Appended to each `nexvitad run`: the demo pipeline at 64 px, one training step.
SHORT_RUN = ["--no-progress", "--set", "data.image_size=64", "--set", "model.hiera.image_size=[64, 64]",
             "--set", "train.epochs=1", "--set", "train.phase1_epochs=1", "--set", "train.steps_per_epoch=1",
             "--set", "train.fast_compile=True"]


def readme_commands() -> list[str]:
    """Every command of the README's bash blocks, in order (`&&` chains split, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def skip_reason(command: str) -> str | None:
    return next((reason for prefix, reason in SKIPPED_BY_DESIGN.items() if command.startswith(prefix)), None)


def test_every_readme_command_is_run_or_skipped_by_design():
    commands = readme_commands()
    assert any(c.startswith("nexvitad run") for c in commands) and any(c.startswith("pip install") for c in commands)
    unknown = [c for c in commands if skip_reason(c) is None and not c.startswith("nexvitad ")]
    assert not unknown, f"README commands this test neither runs nor skips by design: {unknown}"


def runnable_commands() -> list[list[str]]:
    """The `nexvitad` commands this test runs, as argv after `nexvitad`."""
    return [shlex.split(c)[1:] for c in readme_commands() if skip_reason(c) is None]


def test_readme_commands_follow_one_another(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    workdirs: dict[str, tuple[str, list[str]]] = {}  # workdir -> (the key of its run, its target classes)
    for argv in runnable_commands():
        command = "nexvitad " + shlex.join(argv)
        if argv[0] == "run":
            args = parse_args(argv[1:])
            plan = plan_run(spec_from_args(args))  # the config checked whole, the split drawn
            assert not args.rescore or args.workdir in workdirs, f"`{command}`: no earlier run to re-score"
            held = workdirs.setdefault(args.workdir, (plan.key, plan.target))
            assert held[0] == plan.key, f"`{command}` would be refused: {args.workdir} holds another run"
        elif argv[0] == "evaluate":
            path = PurePosixPath(argv[1])
            workdir, category = str(path.parent.parent), path.name.split(".")[0]
            assert path.parent.name == "maps" and workdir in workdirs, f"`{command}`: no earlier run writes it"
            assert category in workdirs[workdir][1], f"`{command}`: {category} is not a target class of {workdir}"
        else:
            assert cli.main(argv) == 0, command
    assert "runs/default" in workdirs and len(workdirs) >= 2


@pytest.mark.slow
def test_readme_commands_run_as_written_one_after_another(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # runs/default and friends, as a new user's first commands
    ran = []
    for argv in runnable_commands():
        command = "nexvitad " + shlex.join(argv)
        status = cli.main(argv + (SHORT_RUN if argv[0] == "run" else []))
        captured = capsys.readouterr()
        assert status == 0, f"`{command}` exited with {status}:\n{captured.err[-2000:]}"
        ran.append((command, captured))
    commands = [command for command, _ in ran]
    assert commands[0] == "nexvitad run" and "finished earlier" not in ran[0][1].err  # the quick start trains
    for command, captured in ran[1:]:  # the quick start's run again: reported, or re-scored with --rescore
        if command == "nexvitad run":
            assert "nexvitad run: finished earlier (" in captured.err
        if command == "nexvitad run --rescore":
            assert "--rescore: " in captured.err and "finished earlier" not in captured.err
    assert "nexvitad run --rescore" in commands and any(c.startswith("nexvitad evaluate") for c in commands)
    assert (tmp_path / "runs" / "default" / "metrics.json").is_file()
    assert (tmp_path / "runs" / "epochs10-k20" / "metrics.json").is_file()
