"""``python -m nbdserve.guest [--client C] [--allocator A] [--workload W] [--runs N] [--json] [--keep]``.

The same runs as ``nbdserve reproduce guest``, for use before (or without) the CLI wiring.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from ..qcow2.policy import ALLOCATORS
from .harness import CLIENTS, WORKLOADS, format_guest_results, missing_requirements, run_guest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nbdserve.guest", description=__doc__.splitlines()[0])
    ap.add_argument("--client", choices=CLIENTS, default="virtio")
    ap.add_argument("--allocator", choices=ALLOCATORS, action="append",
                    help="default: both, fixed first")
    ap.add_argument("--workload", choices=WORKLOADS, default="debian")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="one JSON object per run")
    ap.add_argument("--keep", action="store_true", help="keep the images beside the console logs")
    args = ap.parse_args(argv)
    missing = missing_requirements(args.workload)
    if missing:
        print(f"nbdserve guest: {missing}", file=sys.stderr)
        return 2
    results = []
    for allocator in args.allocator or list(ALLOCATORS):
        results += trio.run(lambda: run_guest(allocator, args.client, args.runs, args.keep,
                                                    workload=args.workload))
    if args.json:
        for r in results:
            print(json.dumps(r.to_dict()))
    else:
        print(format_guest_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
