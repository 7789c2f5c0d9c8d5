"""dpkg's workload: .deb packages built at run time, a base file system, the guest script.

The base image is an ext4 file system with a small Debian-like tree (``/etc``,
``/usr/share/doc``, ``/var/lib/dpkg``) plus the workload itself: the packages in
``/var/cache/apt/archives`` and ``/var/lib/nbdserve-workload/`` holding
``workload.sh`` and the md5sums of the base tree.  The guest writes only to the
overlay served by nbdserve; the base stays untouched.

What the guest does (``workload.sh``), the way years of ``apt-get upgrade`` shape a disk:

1. little room for dirty pages (``vm.dirty_background_bytes`` 64 KiB, ``vm.dirty_bytes``
   256 KiB, as on the small VMs of 2012): the flusher writes files back in pieces while
   they are unpacked, so many writes start inside a cluster an earlier piece allocated;
2. *install* generation 0 of the packages (one ``dpkg-deb -x`` each, all in parallel, the
   dpkg status file rewritten meanwhile), ``sync``;
3. per later generation: *remove* every other installed package (its files deleted),
   ``sync``, ``fstrim``, ``sync`` (the flush makes the overlay reuse the discarded host
   clusters: holes between clusters still in use), then *upgrade*: install the generation
   like generation 0;
4. ``echo 3 > /proc/sys/vm/drop_caches``, umount, mount, and check every file of every
   installed package against the package's ``md5sums`` and the base tree against its
   own list; ``@@FILE <pkg> <path>: OK|FAILED`` per file, ``@@SUMMARY`` at the end.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from dataclasses import dataclass

WORKLOAD_DIR = "var/lib/nbdserve-workload"
ARCHIVES = "var/cache/apt/archives"


@dataclass(frozen=True)
class WorkloadSpec:
    generations: int = 8           # generation 0 installed, each later one after a removal
    packages_per_generation: int = 6
    files_per_package: int = 5
    min_file: int = 96 << 10
    max_file: int = 640 << 10
    seed: int = 2012
    fs_size: int = 256 << 20


def _content(rng: random.Random, size: int) -> bytes:
    """Varied data: random runs, text-like lines and a few zero runs (no sector is blank)."""
    out = bytearray()
    words = [b"qcow2", b"cluster", b"allocation", b"debian", b"package", b"md5sum", b"copy", b"write"]
    while len(out) < size:
        kind = rng.random()
        n = rng.randrange(512, 32 << 10)
        if kind < 0.5:
            out += rng.randbytes(n)
        elif kind < 0.9:
            line = b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
            out += (line * (n // len(line) + 1))[:n]
        else:
            out += bytes(min(n, 2048))
        out += b"%08x" % len(out)
    return bytes(out[:size])


def _file_size(rng: random.Random, spec: WorkloadSpec) -> int:
    # never a multiple of the 64 KiB cluster: every file's writeback ends mid-cluster
    size = rng.randrange(spec.min_file, spec.max_file)
    if size % (64 << 10) == 0:
        size += 4096 + 123
    return size


def build_package(folder: str, name: str, version: str, rng: random.Random, spec: WorkloadSpec) -> str:
    """A .deb built with ``dpkg-deb --build`` (gzip members, as in 2012) with its md5sums."""
    root = os.path.join(folder, f"{name}_{version}")
    os.makedirs(os.path.join(root, "DEBIAN"))
    sums = []
    for i in range(spec.files_per_package):
        rel = (f"usr/lib/{name}/lib{name}-{i}.so" if i % 2 else f"usr/share/{name}/data-{i}.bin")
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _content(rng, _file_size(rng, spec))
        with open(path, "wb") as f:
            f.write(data)
        sums.append(f"{hashlib.md5(data).hexdigest()}  {rel}\n")
    with open(os.path.join(root, "DEBIAN", "md5sums"), "w") as f:
        f.writelines(sums)
    with open(os.path.join(root, "DEBIAN", "control"), "w") as f:
        f.write(f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n"
                f"Maintainer: nbdserve <nbdserve@localhost>\nDescription: generated for the guest workload\n")
    deb = os.path.join(folder, f"{name}_{version}_amd64.deb")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", root, deb],
                   check=True, capture_output=True)
    shutil.rmtree(root)
    return deb


SCRIPT_HEAD = r"""#!/bin/sh
# nbdserve guest workload (generated); $1 = block device, $2 = mount point
dev="$1"; mnt="$2"
W="$mnt/__WORKLOAD_DIR__"; A="$mnt/__ARCHIVES__"
cp "$W/base.md5sums" /tmp/base.md5sums
mkdir -p /tmp/debs; cp "$A"/*.deb /tmp/debs/
for d in /tmp/debs/*.deb; do p=$(basename $d); p=${p%%_*}; mkdir -p /tmp/ctl/$p; dpkg-deb -e $d /tmp/ctl/$p; done
# little memory for dirty pages, as on the small VMs of 2012: the flusher writes files
# back in pieces while they are being unpacked, so writes start in clusters written before
echo 65536 > /proc/sys/vm/dirty_background_bytes
echo 262144 > /proc/sys/vm/dirty_bytes
install() {  # unpack packages "$@" all at once, with the dpkg status file rewritten meanwhile
  for p in "$@"; do dpkg-deb -x /tmp/debs/${p}_*.deb "$mnt" & done
  for i in 1 2 3; do
    cat "$mnt/var/lib/dpkg/status" /tmp/ctl/$1/control > "$mnt/var/lib/dpkg/status-new"
    mv "$mnt/var/lib/dpkg/status-new" "$mnt/var/lib/dpkg/status"
  done
  wait
  sync
}
remove() {  # delete the files of packages "$@", then discard the freed blocks
  for p in "$@"; do
    sed 's/^[0-9a-f]*  //' /tmp/ctl/$p/md5sums | while read f; do rm -f "$mnt/$f"; done
    rm -rf "$mnt/usr/share/$p" "$mnt/usr/lib/$p"
  done
  sync
  fstrim "$mnt" || echo "@@ERROR fstrim"
  sync   # the flush lets the overlay reuse the discarded clusters
}
check() {  # $1 = package name (or "base"), $2 = md5sums file
  cd "$mnt"
  md5sum -c "$2" 2>&1 | while read line; do echo "@@FILE $1 $line"; done
  cd /
}
verify() {  # from the disk, not the page cache: every file of packages "$@" and the base tree
  sync
  echo 3 > /proc/sys/vm/drop_caches
  umount "$mnt" || echo "@@ERROR umount"
  mount -t ext4 "$dev" "$mnt" || { echo "@@ERROR remount"; exit 1; }
  for p in "$@"; do check $p /tmp/ctl/$p/md5sums; done > /tmp/results
  check base /tmp/base.md5sums >> /tmp/results
  grep -E ': (OK|FAILED.*)$' /tmp/results | tee -a /tmp/all-results
}
"""

SCRIPT_TAIL = r"""echo "@@PHASE verify"
verify $INSTALLED
checked=$(sort -u /tmp/all-results | sed 's/: [A-Z].*//' | sort -u | wc -l)
failed=$(grep ': FAILED' /tmp/all-results | sed 's/: [A-Z].*//' | sort -u | wc -l)
echo "@@SUMMARY checked=$checked failed=$failed"
"""


def workload_script(generations: list[list[str]]) -> tuple[str, list[str]]:
    """The guest script for ``generations`` of packages, and the packages installed at the end.

    Generation 0 is installed; then per later generation: every other installed package
    (the oldest first) is removed and its blocks discarded, and the generation installed.
    After each generation the installed files are checked from the disk (as dpkg's users
    did between upgrades), so a file damaged and removed later is still counted."""
    lines = [SCRIPT_HEAD, 'echo "@@PHASE install 0"', "install " + " ".join(generations[0])]
    installed = list(generations[0])
    for g, packages in enumerate(generations[1:], 1):
        gone = installed[::2]
        installed = [p for p in installed if p not in gone]
        installed += packages
        lines += [f'echo "@@PHASE remove {g}"', "remove " + " ".join(gone),
                  f'echo "@@PHASE upgrade {g}"', "install " + " ".join(packages),
                  f'echo "@@PHASE check {g}"', "verify " + " ".join(installed)]
    lines += [f'INSTALLED="{" ".join(installed)}"', SCRIPT_TAIL]
    return "\n".join(lines), installed


def _base_tree(tree: str, rng: random.Random) -> None:
    """A small Debian-like tree: a few config files, docs and a dpkg status file."""
    for rel, size in (("etc/hostname", 0), ("etc/debian_version", 0), ("etc/fstab", 0)):
        os.makedirs(os.path.join(tree, os.path.dirname(rel)), exist_ok=True)
    with open(os.path.join(tree, "etc/hostname"), "w") as f:
        f.write("guest\n")
    with open(os.path.join(tree, "etc/debian_version"), "w") as f:
        f.write("7.0\n")
    with open(os.path.join(tree, "etc/fstab"), "w") as f:
        f.write("/dev/vda / ext4 defaults 0 1\n")
    for i in range(12):
        doc = os.path.join(tree, f"usr/share/doc/base-pkg{i}")
        os.makedirs(doc, exist_ok=True)
        with open(os.path.join(doc, "copyright"), "wb") as f:
            f.write(_content(rng, rng.randrange(2000, 40000)))
    for d in ("usr/bin", "usr/lib", "usr/share", "var/log", "var/lib/dpkg", "tmp", "root", "home"):
        os.makedirs(os.path.join(tree, d), exist_ok=True)
    for i in range(6):
        with open(os.path.join(tree, f"usr/bin/tool{i}"), "wb") as f:
            f.write(_content(rng, rng.randrange(50 << 10, 300 << 10)))
    with open(os.path.join(tree, "var/lib/dpkg/status"), "w") as f:
        for i in range(12):
            f.write(f"Package: base-pkg{i}\nStatus: install ok installed\nVersion: 1.0\n\n")


def build_base_tree(tree: str, spec: WorkloadSpec) -> dict:
    """Populate ``tree``; returns the plan (package names per phase)."""
    rng = random.Random(spec.seed)
    _base_tree(tree, rng)
    # md5sums of the base tree (checked in the guest too: the overlay must not damage it)
    sums = []
    for dirpath, _, files in os.walk(tree):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, tree)
            if rel.startswith("var/lib/dpkg/"):
                continue            # rewritten by the workload
            with open(path, "rb") as f:
                sums.append(f"{hashlib.md5(f.read()).hexdigest()}  {rel}\n")
    archives = os.path.join(tree, ARCHIVES)
    os.makedirs(archives, exist_ok=True)
    build = os.path.join(tree, "..", "debbuild")
    os.makedirs(build, exist_ok=True)
    generations = [[f"lib{chr(ord('a') + g)}{i}" for i in range(spec.packages_per_generation)]
                   for g in range(spec.generations)]
    for name in (p for gen in generations for p in gen):
        deb = build_package(build, name, "1.0", rng, spec)
        shutil.move(deb, archives)
    shutil.rmtree(build)
    wdir = os.path.join(tree, WORKLOAD_DIR)
    os.makedirs(wdir, exist_ok=True)
    with open(os.path.join(wdir, "base.md5sums"), "w") as f:
        f.writelines(sums)
    script, installed = workload_script(generations)
    script = script.replace("__WORKLOAD_DIR__", WORKLOAD_DIR).replace("__ARCHIVES__", ARCHIVES)
    with open(os.path.join(wdir, "workload.sh"), "w") as f:
        f.write(script)
    return {"generations": generations, "installed": installed}


def build_base_image(workdir: str, spec: WorkloadSpec) -> tuple[str, dict]:
    """``base.qcow2`` in ``workdir`` (ext4 made with ``mkfs.ext4 -d``), and the plan."""
    tree = os.path.join(workdir, "tree")
    os.makedirs(tree)
    plan = build_base_tree(tree, spec)
    raw = os.path.join(workdir, "base.raw")
    with open(raw, "wb") as f:
        f.truncate(spec.fs_size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", tree, raw], check=True, capture_output=True)
    base = os.path.join(workdir, "base.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, base], check=True,
                   capture_output=True)
    os.unlink(raw)
    shutil.rmtree(tree)
    return base, plan
