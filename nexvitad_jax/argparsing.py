"""The argument parser of a `nexvitad` subcommand, its help made from the module's docstring."""

from __future__ import annotations

import argparse


def command_parser(prog: str, doc: str, *, epilog_paragraphs: slice = slice(1, None)) -> argparse.ArgumentParser:
    """A parser for `prog` (e.g. "nexvitad run"): the docstring's first paragraph as its description,
    the paragraphs `epilog_paragraphs` after it as the epilog, line breaks kept."""
    paragraphs = doc.split("\n\n")
    return argparse.ArgumentParser(prog=prog, description=paragraphs[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n\n".join(paragraphs[epilog_paragraphs]))
