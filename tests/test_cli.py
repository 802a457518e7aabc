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
