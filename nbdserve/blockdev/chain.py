"""Which files an image's backing chain may open, and how names become paths.

A qcow2 image handed over by someone else names its backing file itself: any host path,
or qemu protocol syntax (``json:{...}``, ``nbd://``, ``http://``).  qemu's naming rules
(bdrv_get_full_backing_filename, path_has_protocol) are here once; the operator's limits
(``--backing-root``, ``--no-backing``, ``--force-share``) ride along the chain in a
:class:`ChainPolicy`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

class ChainError(Exception):
    """A backing file the policy refuses: one line naming the file and the rule."""


def protocol_prefix(name: str) -> str | None:
    """qemu path_has_protocol(): a ':' before any '/' makes ``name`` protocol syntax
    (``nbd://``, ``json:{``, ``file:``); returns that protocol, else None."""
    head = name.split("/", 1)[0]
    return head.split(":", 1)[0] if ":" in head else None


def full_backing_filename(overlay: str, name: str) -> str:
    """qemu bdrv_get_full_backing_filename(): a relative name is taken from the overlay's folder."""
    return name if os.path.isabs(name) else os.path.join(os.path.dirname(overlay), name)


def is_inside(path: str, root: str) -> bool:
    """``path`` resolves (symlinks and '..' followed) to ``root`` or below it."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, top]) == top


@dataclass(frozen=True)
class ChainPolicy:
    """The operator's limits on a chain.  ``backing_root``: every backing file must resolve
    inside this folder; ``no_backing``: none at all; ``force_share``: take qemu-img -U's
    locks (read-only, sharing everything)."""

    backing_root: str | None = None
    no_backing: bool = False
    force_share: bool = False

    def backing_path(self, overlay: str, name: str) -> str:
        """The path to open for backing file ``name`` of ``overlay``, or ChainError.
        Under a backing root it is the resolved path, the one that was checked."""
        proto = protocol_prefix(name)
        if proto is not None:
            raise ChainError(f"backing file {name!r} of {overlay} is qemu protocol syntax ({proto}:), "
                             "not a file name; refused")
        if self.no_backing:
            raise ChainError(f"{overlay} has backing file {name!r}; --no-backing refuses backing files")
        full = full_backing_filename(overlay, name)
        if self.backing_root is not None:
            if not is_inside(full, self.backing_root):
                raise ChainError(f"backing file {full} of {overlay} resolves to {os.path.realpath(full)}, "
                                 f"outside --backing-root {os.path.realpath(self.backing_root)}; refused")
            return os.path.realpath(full)
        return full


OPEN_ANY = ChainPolicy()
