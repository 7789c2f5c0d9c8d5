"""nbdserve's parser and ``main``: each subcommand's arguments are added only when it is
parsed or its help shown, so that a command imports only what it runs."""

from __future__ import annotations

import argparse

from .errors import EXIT_USAGE, PROG, CliError, report


class Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2 (CliError).

    ``populate(parser)`` adds a subcommand's arguments when that subcommand is parsed or its
    help shown, so that parsing one command never imports what the others' flags need.
    """

    def __init__(self, *args, populate=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _add_arguments(self) -> None:
        populate, self._populate = self._populate, None
        if populate is not None:
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._add_arguments()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._add_arguments()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_arguments()
        return super().format_help()

    def error(self, message: str):  # type: ignore[override]
        sub = self.prog.removeprefix(PROG).strip()
        raise CliError(f"{sub}: {message}" if sub else message, EXIT_USAGE)


def _reproduce_arguments(r: argparse.ArgumentParser) -> None:
    from ..reproduce.cli import add_arguments

    add_arguments(r)


def build_parser() -> argparse.ArgumentParser:
    """nbdserve's parser; each subcommand's arguments are added when it is used (Parser)."""
    from . import create, ctl, demo, image, serve

    parser = Parser(prog=PROG, description="NBD server for qcow2 and raw images.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    sub.add_parser("serve", help="serve an image (or the exports of a config file) over NBD",
                   populate=serve.add_arguments)
    sub.add_parser("demo", help="create the demo backing chain under conf/demo/ and serve it",
                   populate=demo.add_arguments)
    sub.add_parser("create", help="create a raw or qcow2 image", populate=create.add_arguments)
    image.add_subcommands(sub)
    sub.add_parser("ctl", help="breakpoints, delays and injected errors of a running server "
                               "(serve --control SOCKET)", populate=ctl.add_arguments)
    sub.add_parser("reproduce",
                   help="reproduce the qemu-1.1.2 qcow2 corruption: qemu-io scenarios and a Linux guest",
                   populate=_reproduce_arguments)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a CliError (bad usage, or the command's) is reported, its status returned."""
    try:
        args = build_parser().parse_args(argv)
    except CliError as e:
        return report(e)
    return args.func(args)   # @command: reports the command's CliError
