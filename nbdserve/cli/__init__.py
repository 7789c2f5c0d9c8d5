"""The ``nbdserve`` command line: ``serve``, ``demo``, ``create``, ``check``, ``info``, ``map``,
``ctl`` and ``reproduce`` (parser.py: the parser and ``main``; one module per command).

Errors are one line on stderr, ``nbdserve: error: ...``; exit status 2 for bad
usage (flags, config file), 1 for failures at run time (images, sockets): every command
raises CliError (errors.py), which ``main`` alone prints.

A command imports what it runs, when it runs: ``nbdserve check`` loads neither the
config module (tomllib, dataclasses) nor logging, Trio or the reproduce scenarios.
"""

from .errors import EXIT_RUNTIME, EXIT_USAGE, PROG, CliError
from .parser import build_parser, main

__all__ = ["EXIT_RUNTIME", "EXIT_USAGE", "PROG", "CliError", "build_parser", "main"]
