"""``nbdserve check|info|map``: qemu-img's check, info and map for qcow2 images.

``add_subcommands(subparsers)`` registers the three subcommands on the
subparsers of nbdserve's parser; each handler returns the exit status
(check: 0 clean, 1 check errors or a file that cannot be checked, 2
corruptions, 3 leaks only, like qemu-img check); a file that cannot be read at all is a
CliError (exit 1).
"""

from __future__ import annotations

import argparse
import sys

from .errors import PROG, command, file_error


@command
def cmd_check(args: argparse.Namespace) -> int:
    from ..qcow2.check import check_image
    from ..qcow2.errors import Qcow2Error
    try:
        res = check_image(args.file, repair=args.repair)
    except (Qcow2Error, OSError) as e:
        raise file_error(args.file, e) from None
    for line in res.messages:
        print(line, file=sys.stderr)
    sys.stderr.flush()
    if res.failed:
        # like qemu-img: a check that stopped prints no summary
        print(f"{PROG}: Check failed: {res.failed}", file=sys.stderr, flush=True)
        return res.exit_code
    if args.output == "json":
        import json
        print(json.dumps(res.to_json(), indent=4))
    else:
        if res.corruptions_fixed or res.leaks_fixed:
            print("The following inconsistencies were found and repaired:\n\n"
                  f"    {res.leaks_fixed} leaked clusters\n"
                  f"    {res.corruptions_fixed} corruptions\n\n"
                  "Double checking the fixed image now...")
        sys.stdout.write(res.human())
    sys.stdout.flush()
    if res.check_errors:
        print(f"{PROG}: Check failed", file=sys.stderr, flush=True)
    return res.exit_code


@command
def cmd_info(args: argparse.Namespace) -> int:
    from ..blockdev.chain import ChainError, ChainPolicy
    from ..qcow2.errors import Qcow2Error
    from ..qcow2.inspect import chain_info, format_info_human, image_info
    policy = ChainPolicy(backing_root=args.backing_root, no_backing=args.no_backing)
    try:
        if args.backing_chain:
            info = chain_info(args.file, chain=policy)
        else:
            info = image_info(args.file)
            if info.get("backing-filename") is not None:   # the policy's verdict on the name
                policy.backing_path(args.file, info["backing-filename"])
    except (Qcow2Error, ChainError, OSError) as e:
        raise file_error(args.file, e) from None
    if args.output == "json":
        import json
        print(json.dumps(info, indent=4))
    elif args.backing_chain:
        sys.stdout.write("\n".join(map(format_info_human, info)))   # qemu-img.c dump_human_image_info_list
    else:
        sys.stdout.write(format_info_human(info))
    sys.stdout.flush()
    return 0


@command
def cmd_map(args: argparse.Namespace) -> int:
    from ..qcow2.errors import Qcow2Error
    from ..qcow2.inspect import format_map_human, format_map_json, image_map
    try:
        if args.output == "json":
            sys.stdout.write(format_map_json(image_map(args.file)))
            error = None
        else:
            text, error = format_map_human(args.file)
            sys.stdout.write(text)
    except (Qcow2Error, OSError) as e:
        raise file_error(args.file, e) from None
    sys.stdout.flush()
    if error:
        print(f"{PROG}: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def add_subcommands(subparsers) -> None:
    """Register check, info and map on nbdserve's subparsers (``set_defaults(func=...)``)."""
    c = subparsers.add_parser("check", help="check (and repair) a qcow2 image, like qemu-img check")
    c.add_argument("-r", dest="repair", choices=("leaks", "all"),
                   help="repair leaked clusters, or all inconsistencies")
    c.add_argument("--output", choices=("human", "json"), default="human", help="output format")
    c.add_argument("file", metavar="FILE")
    c.set_defaults(func=cmd_check)

    i = subparsers.add_parser("info", help="show a qcow2 image's header facts, like qemu-img info")
    i.add_argument("--output", choices=("human", "json"), default="human", help="output format")
    i.add_argument("--backing-chain", action="store_true",
                   help="every layer of the backing chain, as nbdserve resolves it")
    i.add_argument("--backing-root", metavar="DIR",
                   help="refuse backing files that do not resolve inside DIR (as serve does)")
    i.add_argument("--no-backing", action="store_true", help="refuse an image with a backing file")
    i.add_argument("file", metavar="FILE")
    i.set_defaults(func=cmd_info)

    m = subparsers.add_parser("map", help="show where the guest data of a qcow2 chain lies, like qemu-img map")
    m.add_argument("--output", choices=("human", "json"), default="human", help="output format")
    m.add_argument("file", metavar="FILE")
    m.set_defaults(func=cmd_map)
