"""``nbdserve demo``: create the demo backing chain (nbdserve/demo.py) and serve it."""

from __future__ import annotations

import argparse

from .errors import EXIT_USAGE, CliError, command, one_line

TYPE_CHECKING = False    # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from pathlib import Path


def find_demo_config(explicit: str | None) -> Path:
    from pathlib import Path
    if explicit is not None:
        return Path(explicit)
    for candidate in (Path.cwd() / "conf" / "demo.toml",
                      Path(__file__).resolve().parents[2] / "conf" / "demo.toml"):
        if candidate.exists():
            return candidate
    raise CliError("demo: conf/demo.toml not found; run from the nbdserve checkout or pass --config",
                   EXIT_USAGE)


@command
def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..config import ConfigError, load_config
    from ..demo import make_demo_chain
    from ..qcow2 import Qcow2Error
    from .serve import run
    path = find_demo_config(args.config)
    try:
        config = load_config(path)
    except ConfigError as e:
        raise CliError(f"{path}: {e}", EXIT_USAGE) from None
    if args.port is not None:
        if not 1 <= args.port <= 65535:
            raise CliError(f"demo: --port: out of range: expected 1 to 65535, got {args.port}", EXIT_USAGE)
        config.port = args.port
    for folder in sorted({Path(e.image).parent for e in config.exports}):
        try:
            make_demo_chain(folder)
        except (OSError, Qcow2Error) as e:
            raise CliError(f"demo: cannot create the demo images in {folder}: {one_line(e)}") from None
    return run(config)


def add_arguments(d: argparse.ArgumentParser) -> None:
    d.add_argument("--port", "-p", type=int, metavar="PORT", help="TCP port (default: the config's)")
    d.add_argument("--config", metavar="FILE", help="demo config (default: conf/demo.toml)")
    d.set_defaults(func=cmd_demo)
