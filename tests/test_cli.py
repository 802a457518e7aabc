"""The `nexvitad` dispatcher: help, unknown commands, and user errors without a traceback."""

from nexvitad_jax import cli
from nexvitad_jax.errors import UserInputError


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    assert "usage: nexvitad" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_user_error_prints_message_not_traceback(capsys, monkeypatch):
    def boom(argv):
        raise UserInputError("bad value 3 for --k: expected >= 5")

    monkeypatch.setitem(cli.COMMANDS, "boom", ("tests.test_cli:_boom", "test"))
    monkeypatch.setattr(__import__("tests.test_cli", fromlist=["_boom"]), "_boom", boom, raising=False)
    assert cli.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert "bad value 3 for --k" in err and "Traceback" not in err


def test_help_lists_library_and_registered_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in (*cli.COMMANDS, "convert"):  # convert: the converters' entry point, not named by the library
        assert f"  {name} " in out
    assert "convert" not in cli.COMMANDS


def test_convert_command_reaches_the_converters(capsys):
    try:
        cli.main(["convert", "--help"])
    except SystemExit as exit_:  # argparse's --help
        assert exit_.code == 0
    assert "--source" in capsys.readouterr().out


def test_version(capsys):
    from nexvitad_jax import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"nexvitad {__version__} ")


def test_convert_help_is_under_its_own_name(capsys):
    from converters.__main__ import build_parser

    try:
        cli.main(["convert", "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out.startswith("usage: nexvitad convert ")
    assert build_parser().format_usage().startswith("usage: python -m converters ")


def test_evaluate_says_a_file_is_not_its_npz(tmp_path, capsys):
    text = tmp_path / "maps.npz"
    text.write_text("scores and masks, honestly\n")
    assert cli.main(["evaluate", str(text)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (f"nexvitad evaluate: error: {text}: not a readable .npz file (not a zip archive of arrays); "
                    "expected an .npz (as `nexvitad run` writes in maps/) with 'scores' and 'masks'")


# add_argument calls without help= in files whose owners have yet to add it: none may be added.
FLAGS_WITHOUT_HELP_PENDING: set[str] = set()


def test_every_flag_of_every_command_has_help():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    missing = set()
    for package in ("nexvitad_jax", "converters", "experiments"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
                        and not any(keyword.arg == "help" for keyword in node.keywords)):
                    flag = node.args[0].value if node.args and isinstance(node.args[0], ast.Constant) else "?"
                    missing.add(f"{path.relative_to(root).as_posix()}: {flag}")
    assert missing <= FLAGS_WITHOUT_HELP_PENDING, sorted(missing - FLAGS_WITHOUT_HELP_PENDING)
