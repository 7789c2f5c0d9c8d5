"""``nbdserve reproduce SCENARIO [--allocator NAME] [--json] [--keep]``.

SCENARIO is one of the qemu-io scenarios (iotest-047, race), ``guest`` (a Linux guest
running dpkg on the served overlay, see nbdserve/guest: a real Debian 12 by default,
``--workload synthetic`` for the busybox one), or ``all``: every qemu-io scenario, then the
guest through each client path.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from ..cli.errors import CliError, command
from ..guest.harness import CLIENTS as GUEST_CLIENTS, WORKLOADS as GUEST_WORKLOADS
from ..qcow2.policy import ALLOCATORS
from .scenarios import SCENARIOS

# the A/B of Philipp's bisect: qemu 1.1.2, and qemu 1.1.2 with only b7ab0fea applied
DEFAULT_PAIR = ("qemu-1.1.2", "qemu-1.1.2+b7ab0fea")


def add_arguments(r: argparse.ArgumentParser) -> None:
    """The arguments of nbdserve's ``reproduce`` subparser (nbdserve/cli/parser.py registers it)."""
    r.add_argument("scenario", choices=[*SCENARIOS, "guest", "all"], metavar="SCENARIO",
                   help=f"one of: {', '.join(SCENARIOS)}, guest (a Linux guest running dpkg), "
                        "or all (every one of them, the guest through both client paths)")
    r.add_argument("--allocator", choices=ALLOCATORS,
                   help=f"run one allocator (default: {' and '.join(DEFAULT_PAIR)}, side by side)")
    r.add_argument("--json", action="store_true", help="print one JSON object per run")
    r.add_argument("--keep", action="store_true", help="keep the images of each run for inspection")
    r.add_argument("--client", choices=GUEST_CLIENTS,
                   help="guest: qemu -drive nbd: (virtio) or the kernel's nbd-client "
                        "(default: virtio for guest, both for all)")
    r.add_argument("--runs", type=int, default=1, metavar="N", help="guest: boots per allocator and client")
    r.add_argument("--workload", choices=GUEST_WORKLOADS, default="debian",
                   help="guest: a debootstrapped Debian 12 installing real packages with its own dpkg "
                        "(debian, the default) or the fast busybox initramfs unpacking generated "
                        "packages (synthetic)")
    r.add_argument("--report", metavar="FILE.html",
                   help="also write a page picturing each qemu-io scenario's runs side by side "
                        "(host clusters, guest -> host arrows, the allocation of interest and its COW)")
    r.set_defaults(func=cmd_reproduce)


class Progress:
    """One line per step on stderr, with the time since the start, when stderr is a terminal
    (and not under --json)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.start = time.monotonic()

    def step(self, text: str) -> None:
        if self.enabled:
            elapsed = int(time.monotonic() - self.start)
            print(f"[{elapsed // 60}:{elapsed % 60:02d}] {text}", file=sys.stderr, flush=True)


@command
def cmd_reproduce(args: argparse.Namespace) -> int:
    import trio

    from .runner import format_side_by_side, run_scenario

    quiet = logging.getLogger("nbdserve")      # the runs' own server: warnings only
    quiet.addHandler(logging.NullHandler())
    quiet.setLevel(logging.WARNING)
    names = list(SCENARIOS) if args.scenario == "all" else [n for n in SCENARIOS if n == args.scenario]
    allocators = [args.allocator] if args.allocator else list(DEFAULT_PAIR)
    with_guest = args.scenario in ("guest", "all")
    clients = [args.client] if args.client else (list(GUEST_CLIENTS) if args.scenario == "all" else ["virtio"])

    if args.report and not os.path.isdir(os.path.dirname(os.path.abspath(args.report))):
        raise CliError(f"reproduce --report {args.report}: no such folder")
    missing = None
    if with_guest:
        from ..guest import missing_requirements
        missing = missing_requirements(args.workload)
        if missing and args.scenario == "guest":
            raise CliError(f"reproduce guest: {missing}")

    pictured = []
    guests = []
    progress = Progress(not args.json and sys.stderr.isatty())

    async def run(name: str, allocator: str):
        progress.step(f"{name} under {allocator}")
        return await run_scenario(SCENARIOS[name], allocator, keep=args.keep)

    async def main() -> None:
        for i, name in enumerate(names):
            results = [await run(name, a) for a in allocators]
            pictured.append((SCENARIOS[name], results))
            if args.json:
                for r in results:
                    print(r.to_json(), flush=True)
            else:
                if i:
                    print()
                print(SCENARIOS[name].summary)
                print(format_side_by_side(results), flush=True)
        if not with_guest:
            return
        if missing:   # only with "all": the qemu-io scenarios ran; say why the guest did not
            note = f"guest: skipped: {missing}"
            print(json.dumps({"scenario": "guest", "skipped": missing}) if args.json else f"\n{note}", flush=True)
            return
        from ..guest import format_guest_results, run_guest
        for client in clients:
            for allocator in allocators:
                progress.step(f"guest via {client} under {allocator} ({args.runs} run{'s' if args.runs > 1 else ''})")
                results = await run_guest(allocator, client, args.runs, args.keep, workload=args.workload)
                guests.append(results)
                if args.json:
                    for r in results:
                        print(r.to_json(), flush=True)
                else:
                    if names or client != clients[0] or allocator != allocators[0]:
                        print()
                    print(format_guest_results(results), flush=True)

    trio.run(main)
    progress.step("done")
    if args.report:
        from .report import write_report
        try:
            write_report(args.report, pictured, guests)
        except OSError as e:
            raise CliError(f"reproduce --report {args.report}: {e.strerror}") from None
    return 0
