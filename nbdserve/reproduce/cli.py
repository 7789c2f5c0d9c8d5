"""``nbdserve reproduce SCENARIO [--allocator fixed|qemu-1.1.2] [--json] [--keep]``."""

from __future__ import annotations

import argparse
import logging

from ..qcow2.policy import POLICIES
from .scenarios import SCENARIOS


def add_subcommand(sub) -> None:
    r = sub.add_parser("reproduce", help="reproduce the qemu-1.1.2 qcow2 corruption over NBD with qemu-io")
    r.add_argument("scenario", choices=[*SCENARIOS, "guest", "all"], metavar="SCENARIO",
                   help=f"one of: {', '.join(SCENARIOS)}, guest (a Linux guest running dpkg), or all")
    r.add_argument("--allocator", choices=list(POLICIES),
                   help="run one allocator (default: both, side by side)")
    r.add_argument("--json", action="store_true", help="print one JSON object per run")
    r.add_argument("--keep", action="store_true", help="keep the images of each run for inspection")
    r.add_argument("--client", choices=("virtio", "nbd-client"), default="virtio",
                   help="guest: qemu -drive nbd: (virtio) or the kernel's nbd-client")
    r.add_argument("--runs", type=int, default=1, metavar="N", help="guest: boots per allocator")
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
        if args.scenario == "guest":
            from ..guest import format_guest_results, missing_requirements, run_guest
            missing = missing_requirements()
            if missing:
                raise SystemExit(f"nbdserve: error: reproduce guest: {missing}")
            for allocator in allocators:
                results = await run_guest(allocator, args.client, args.runs, args.keep)
                if args.json:
                    for r in results:
                        print(r.to_json(), flush=True)
                else:
                    print(format_guest_results(results), flush=True)
            return
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
