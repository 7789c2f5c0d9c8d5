"""Consistency check and repair of a qcow2 image, like ``qemu-img check [-r leaks|all]``.

- checker.py: the check itself (qemu: qcow2_check_refcounts), one pass over the image;
- computed.py: the refcounts the metadata says, one byte per cluster;
- stored.py: the stored refcounts as the check reads and a repair writes them;
- copied.py: the COPIED flags against the stored refcounts (qemu: check_oflag_copied);
- fastpaths.py: the loops that run without a Python loop over table entries;
- rebuild.py: ``-r all``'s new refcount structures (qemu: rebuild_refcount_structure);
- result.py: ``CheckResult``, printed as qemu-img check prints it.

As qemu-img does, a repair is followed by a fresh check whose result is reported, with
the numbers of fixed corruptions and leaks.
"""

from __future__ import annotations

from .checker import Checker
from .result import FIX_ERRORS, FIX_LEAKS, CheckResult

__all__ = ["CheckResult", "check_image"]

_REPAIR_MODES = {None: 0, "leaks": FIX_LEAKS, "all": FIX_LEAKS | FIX_ERRORS}


def _run(path: str, fix: int) -> CheckResult:
    checker = Checker(path, writable=bool(fix))
    try:
        return checker.run(fix)
    finally:
        checker.close()


def check_image(path: str, repair: str | None = None) -> CheckResult:
    """Check (and with ``repair`` "leaks" or "all", repair) the qcow2 image at ``path``.

    Raises Qcow2Error or OSError if the image cannot be opened at all.  After a
    repair the image is checked again and that result is returned, carrying
    the numbers of fixed corruptions and leaks (like qemu-img check -r).
    """
    if repair not in _REPAIR_MODES:
        raise ValueError(f"repair must be None, 'leaks' or 'all', not {repair!r}")
    res = _run(path, _REPAIR_MODES[repair])
    if res.failed or not (res.corruptions_fixed or res.leaks_fixed):
        return res
    again = _run(path, 0)
    again.corruptions_fixed = res.corruptions_fixed
    again.leaks_fixed = res.leaks_fixed
    again.messages = res.messages + again.messages
    return again
