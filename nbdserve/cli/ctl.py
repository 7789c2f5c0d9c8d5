"""``nbdserve ctl SOCKET COMMAND``: one request to a running server's control socket
(serve --control): breakpoints, delays, injected errors, the allocation trace."""

from __future__ import annotations

import argparse
import os

from .errors import PROG, CliError, command
from .parser import Parser

@command
def cmd_ctl(args: argparse.Namespace) -> int:
    """One request to a server's control socket; its refusal is one line and exit 1."""
    from ..control import ControlError, ControlClient
    arguments = {key: getattr(args, key, None) for key in ("event", "tag", "timeout", "seconds", "errno", "state")}
    if getattr(args, "once", None):
        arguments["once"] = True
    if getattr(args, "file", None):
        arguments["file"] = os.path.abspath(args.file)   # the server's working folder may differ
    try:
        with ControlClient(args.socket) as client:
            client.request(args.ctl_command, export=getattr(args, "export", None), **arguments)
    except ControlError as e:
        raise CliError(f"ctl {args.ctl_command}: {e}") from None
    return 0


def add_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("socket", metavar="SOCKET", help="the server's control socket (serve --control)")
    c.add_argument("--export", metavar="NAME", help="the export (needed when the server has several)")
    sub = c.add_subparsers(dest="ctl_command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, prog=f"{PROG} ctl {name}")
        p.add_argument("--export", metavar="NAME", default=argparse.SUPPRESS, help="the export")
        return p

    p = command("break", "stop the next request reaching EVENT (until resume TAG)")
    p.add_argument("event", metavar="EVENT")
    p.add_argument("tag", metavar="TAG")
    p = command("wait-break", "return once a request is suspended at TAG's breakpoint")
    p.add_argument("tag", metavar="TAG")
    p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds (exit 1)")
    p = command("resume", "continue the request suspended at TAG")
    p.add_argument("tag", metavar="TAG")
    p = command("remove-break", "remove TAG's breakpoint, resuming a request suspended there")
    p.add_argument("tag", metavar="TAG")
    p = command("delay", "sleep SECONDS at every firing of EVENT (0 removes the delay)")
    p.add_argument("event", metavar="EVENT")
    p.add_argument("seconds", type=float, metavar="SECONDS")
    p = command("inject-error", "fail requests reaching EVENT with ERRNO (every time, or once)")
    p.add_argument("event", metavar="EVENT")
    p.add_argument("errno", metavar="ERRNO", help="a name like EIO or ENOSPC, or its number")
    p.add_argument("once", nargs="?", choices=["once"], help="only the first request fails")
    command("clear", "remove every breakpoint (resuming what is suspended), delay and injected error")
    p = command("trace", "start or stop the allocation trace (JSON lines into FILE, or serve --trace's)")
    p.add_argument("state", choices=["on", "off"], metavar="on|off")
    p.add_argument("file", nargs="?", metavar="FILE", help="on: trace into this file instead")
    c.set_defaults(func=cmd_ctl)
