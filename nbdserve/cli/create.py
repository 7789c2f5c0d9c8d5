"""``nbdserve create``: a raw or qcow2 image, with qemu-img create's sizes and -o options."""

from __future__ import annotations

import argparse
import os
import re

from .errors import EXIT_USAGE, CliError, command

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``"64k"``, ``"1M"``, ``"2G"``, ``"1T"``, ``"4096"``: binary suffixes, like qemu-img."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtT]?)\s*", text)
    if not m:
        raise ValueError(f"invalid size {text!r} (expected a number with an optional K/M/G/T suffix)")
    number, suffix = m.groups()
    value = float(number) * _SUFFIXES[suffix.lower()]
    if value != int(value):
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


QCOW2_OPTIONS = ("cluster_size", "compat", "refcount_bits", "lazy_refcounts", "extended_l2", "compression_type")


def parse_create_options(texts: list[str]) -> dict[str, object]:
    """``-o cluster_size=64k,compat=1.1,refcount_bits=16,lazy_refcounts=on,extended_l2=off,
    compression_type=zlib`` (qemu-img's names) -> create_image keyword arguments."""
    opts: dict[str, object] = {}
    for text in texts:
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"-o {item!r}: expected KEY=VALUE")
            if key == "cluster_size":
                size = parse_size(value)
                if size < 512 or size > (2 << 20) or size & (size - 1):
                    raise ValueError(f"-o cluster_size: expected a power of two from 512 to 2M, got {value}")
                opts["cluster_size"] = size
            elif key == "compat":
                compat = {"0.10": "0.10", "v2": "0.10", "1.1": "1.1", "v3": "1.1"}.get(value)
                if compat is None:
                    raise ValueError(f"-o compat: expected 0.10 or 1.1, got {value!r}")
                opts["compat"] = compat
            elif key == "refcount_bits":
                if not value.isdigit() or int(value) not in (1, 2, 4, 8, 16, 32, 64):
                    raise ValueError(f"-o refcount_bits: expected a power of two from 1 to 64, got {value!r}")
                opts["refcount_bits"] = int(value)
            elif key in ("lazy_refcounts", "extended_l2"):
                if value not in ("on", "off"):
                    raise ValueError(f"-o {key}: expected on or off, got {value!r}")
                opts[key] = value == "on"
            elif key == "compression_type":
                if value not in ("zlib", "zstd"):
                    raise ValueError(f"-o compression_type: expected zlib or zstd, got {value!r}")
                opts["compression_type"] = value
            else:
                raise ValueError(f"-o {key}: unknown option (expected one of: {', '.join(QCOW2_OPTIONS)})")
    return opts


@command
def cmd_create(args: argparse.Namespace) -> int:
    fmt = args.format
    try:
        size = parse_size(args.size) if args.size is not None else None
        opts = parse_create_options(args.options or [])
    except ValueError as e:
        raise CliError(f"create: {e}", EXIT_USAGE) from None
    if args.backing_format is not None and args.backing is None:
        raise CliError("create: -F needs -b BACKING", EXIT_USAGE)
    if fmt == "raw":
        if args.backing is not None:
            raise CliError("create: raw images have no backing file (use -f qcow2)", EXIT_USAGE)
        if opts:
            raise CliError("create: -o options apply to qcow2 only", EXIT_USAGE)
        if size is None:
            raise CliError("create: SIZE is required", EXIT_USAGE)
        try:
            with open(args.file, "wb") as f:
                f.truncate(size)
        except OSError as e:
            raise CliError(f"{args.file}: {e.strerror}") from None
        print(f"Formatting '{args.file}', fmt=raw size={size}", flush=True)
        return 0

    backing = args.backing
    if size is None:
        if backing is None:
            raise CliError("create: SIZE is required without -b BACKING", EXIT_USAGE)
        from ..blockdev.chain import full_backing_filename
        from ..blockdev.probe import virtual_size
        resolved = full_backing_filename(os.path.abspath(args.file), backing)
        try:
            size = virtual_size(resolved, args.backing_format)
        except OSError as e:
            raise CliError(f"{resolved}: {e.strerror}") from None
    try:
        from ..qcow2.create import create_image
    except ImportError as e:
        raise CliError(f"create: qcow2 creation is not available in this build ({e})") from None
    try:
        create_image(args.file, size, backing=backing, backing_format=args.backing_format, **opts)
    except OSError as e:
        raise CliError(f"{args.file}: {e.strerror or e}") from None
    except Exception as e:  # the engine's own refusal (Qcow2Error, ValueError)
        raise CliError(f"create: {e}") from None
    print(f"Formatting '{args.file}', fmt=qcow2 size={size}", flush=True)
    return 0


def add_arguments(c: argparse.ArgumentParser) -> None:
    from ..blockdev.probe import FORMATS

    c.add_argument("-f", dest="format", choices=FORMATS, default="raw", help="format (default: raw)")
    c.add_argument("-b", dest="backing", metavar="BACKING", help="backing file (qcow2)")
    c.add_argument("-F", dest="backing_format", choices=FORMATS, metavar="FMT", help="backing file format")
    c.add_argument("-o", dest="options", action="append", metavar="OPTIONS",
                   help="cluster_size=N,compat=0.10|1.1,refcount_bits=N,lazy_refcounts=on|off,"
                        "extended_l2=on|off,compression_type=zlib|zstd")
    c.add_argument("file", metavar="FILE")
    c.add_argument("size", nargs="?", metavar="SIZE", help="size with an optional K/M/G/T suffix")
    c.set_defaults(func=cmd_create)
