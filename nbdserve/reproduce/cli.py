"""``nbdserve reproduce SCENARIO [--allocator fixed|qemu-1.1.2] [--json] [--keep]``."""

from __future__ import annotations

import argparse
import logging

from ..qcow2.policy import POLICIES
from .scenarios import SCENARIOS


def add_subcommand(sub) -> None:
    r = sub.add_parser("reproduce", help="reproduce the qemu-1.1.2 qcow2 corruption over NBD with qemu-io")
    r.add_argument("scenario", choices=[*SCENARIOS, "all"], metavar="SCENARIO",
                   help=f"one of: {', '.join(SCENARIOS)}, or all")
    r.add_argument("--allocator", choices=list(POLICIES),
                   help="run one allocator (default: both, side by side)")
    r.add_argument("--json", action="store_true", help="print one JSON object per run")
    r.add_argument("--keep", action="store_true", help="keep the images of each run for inspection")
    r.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    import trio

    from .runner import format_side_by_side, run_scenario

    quiet = logging.getLogger("nbdserve")      # the runs' own server: warnings only
    quiet.addHandler(logging.NullHandler())
    quiet.setLevel(logging.WARNING)
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    allocators = [args.allocator] if args.allocator else list(POLICIES)

    async def main() -> None:
        for i, name in enumerate(names):
            results = [await run_scenario(SCENARIOS[name], a, keep=args.keep) for a in allocators]
            if args.json:
                for r in results:
                    print(r.to_json(), flush=True)
            else:
                if i:
                    print()
                print(SCENARIOS[name].summary)
                print(format_side_by_side(results), flush=True)

    trio.run(main)
    return 0
