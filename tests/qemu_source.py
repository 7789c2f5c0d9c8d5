"""qemu's source tree, of the qemu installed here, fetched at test time from Debian.

    tree = qemu_source_tree()          # e.g. ~/.cache/nbdserve-qemu-source/1_7.2+dfsg-7+deb12u18/qemu
    iotests = tree / "tests" / "qemu-iotests"

Debian's source package of the installed qemu-utils (``${source:Version}``) is downloaded
with a private apt configuration: deb-src entries made from the machine's own
``/etc/apt/sources.list.d/debian.sources``, a private source list, source-parts folder, list
state and package cache, so the machine's apt state is left alone.  ``dpkg-source
--no-check -x`` unpacks it (dpkg-dev; scripts/test installs it).  The unpacked tree is
cached per version and reused.  Nothing of qemu's is committed to this repository.

Any failure raises :class:`QemuSourceError` with the command and its output: tests that
need qemu's source fail loudly, they never skip.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from pathlib import Path

DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nbdserve-qemu-source"
PACKAGE = "qemu-utils"      # the binary package whose source version is fetched


class QemuSourceError(RuntimeError):
    """qemu's source could not be fetched or unpacked."""


def _run(args: list[str], *, cwd: Path | None = None, timeout: float = 1800) -> str:
    try:
        p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QemuSourceError(f"{' '.join(args)}: {e}") from e
    if p.returncode != 0:
        raise QemuSourceError(f"{' '.join(args)} exited {p.returncode}\n"
                              f"stdout: {p.stdout[-3000:]}\nstderr: {p.stderr[-3000:]}")
    return p.stdout


def installed_source_version(package: str = PACKAGE) -> str:
    """``dpkg-query -W -f='${source:Version}' PACKAGE``: the version of its source package."""
    version = _run(["dpkg-query", "-W", "-f=${source:Version}", package]).strip()
    if not version:
        raise QemuSourceError(f"dpkg-query gives no source version for {package} (is it installed?)")
    return version


def deb_src_sources(text: str) -> str:
    """The deb822 stanzas of a ``.sources`` file with ``Types: deb`` turned into ``deb-src``."""
    stanzas = [s for s in re.split(r"\n\s*\n", text) if s.strip()]
    out = []
    for stanza in stanzas:
        lines = stanza.splitlines()
        types = [ln for ln in lines if ln.lower().startswith("types:")]
        if not types or "deb" not in types[0].split(":", 1)[1].split():
            continue
        out.append("\n".join("Types: deb-src" if ln in types else ln for ln in lines))
    if not out:
        raise QemuSourceError(f"{DEBIAN_SOURCES} has no 'Types: deb' stanza to make deb-src entries from")
    return "\n\n".join(out) + "\n"


def _apt_options(apt_dir: Path) -> list[str]:
    """apt-get options for a configuration of its own under ``apt_dir``."""
    return ["-o", f"Dir::Etc::SourceList={apt_dir / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={apt_dir / 'sources.list.d'}",
            "-o", f"Dir::State::Lists={apt_dir / 'lists'}",
            "-o", f"Dir::Cache={apt_dir / 'cache'}",
            "-o", "APT::Get::List-Cleanup=false"]


def _fetch(version: str, dest: Path) -> Path:
    """Download and unpack qemu=VERSION's source package under ``dest``; returns the tree."""
    apt_dir = dest / "apt"
    (apt_dir / "sources.list.d").mkdir(parents=True)
    (apt_dir / "lists" / "partial").mkdir(parents=True)
    (apt_dir / "cache" / "archives" / "partial").mkdir(parents=True)
    (apt_dir / "sources.list").write_text("")
    try:
        sources = DEBIAN_SOURCES.read_text()
    except OSError as e:
        raise QemuSourceError(f"cannot read {DEBIAN_SOURCES}: {e}") from e
    (apt_dir / "sources.list.d" / "deb-src.sources").write_text(deb_src_sources(sources))
    options = _apt_options(apt_dir)
    _run(["apt-get", *options, "update"])
    download = dest / "download"
    download.mkdir()
    _run(["apt-get", *options, "source", "--download-only", f"qemu={version}"], cwd=download)
    dscs = sorted(download.glob("qemu_*.dsc"))
    if len(dscs) != 1:
        raise QemuSourceError(f"apt-get source gave {[p.name for p in download.iterdir()]}, not one qemu .dsc")
    _run(["dpkg-source", "--no-check", "-x", dscs[0].name, "qemu"], cwd=download)
    tree = dest / "qemu"
    (download / "qemu").rename(tree)
    shutil.rmtree(download)
    shutil.rmtree(apt_dir)
    return tree


def qemu_source_tree(version: str | None = None) -> Path:
    """The unpacked source tree of qemu ``version`` (default: the installed qemu-utils'),
    fetched on first use into ``~/.cache/nbdserve-qemu-source/VERSION/qemu`` (the epoch's
    ':' written '_') and reused."""
    version = version or installed_source_version()
    # No ':' (the epoch's) in the path: qemu's check puts the tree in PYTHONPATH, which ':' splits.
    where = CACHE / version.replace(":", "_")
    tree = where / "qemu"
    done = where / "complete"
    where.mkdir(parents=True, exist_ok=True)
    with open(where / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)      # one fetch at a time; the others wait and reuse it
        if done.exists() and (tree / "tests" / "qemu-iotests" / "check").exists():
            return tree
        for stale in ("apt", "download", "qemu"):
            shutil.rmtree(where / stale, ignore_errors=True)
        tree = _fetch(version, where)
        if not (tree / "tests" / "qemu-iotests" / "check").exists():
            raise QemuSourceError(f"{tree} has no tests/qemu-iotests/check")
        done.write_text(version + "\n")
    return tree


def qemu_iotests_dir() -> Path:
    """``tests/qemu-iotests`` of the installed qemu's source."""
    return qemu_source_tree() / "tests" / "qemu-iotests"


if __name__ == "__main__":
    print(qemu_source_tree())
