"""The Debian guest: a debootstrapped Debian 12 on an old DOS-partitioned disk, and its workload.

The base image (built once per machine, cached under ``~/.cache/nbdserve-guest/debian/``
keyed by a hash of its recipe):

* ``debootstrap --variant=minbase bookworm`` from the host's Debian mirror (dpkg, apt,
  bash, coreutils: what the workload runs); the tree is cached as a tarball;
* real packages from Debian's archive, fetched on the host with ``apt-get download``
  through a private apt configuration whose only source is the mirror and suite the tree
  was made from and whose dpkg status is the tree's, so each package installs on that
  tree alone (:data:`PACKAGES`: a few dozen, libraries, fonts, documentation and headers,
  some of them several MiB); they sit in ``/srv/nbdserve/pool`` with their stanzas of
  Debian's Packages index (``/srv/nbdserve/Packages``), as a local mirror would;
* ``/sbin/init`` replaced by the harness script (:func:`init_script`);
* an ext4 (or ext3) file system made with ``mkfs -d`` inside an MBR partition that starts
  at sector 63, the DOS layout of 2012: each 4 KiB block of the file system straddles a
  512-byte offset of the disk, so guest writes rarely start or end on a cluster boundary;
* the disk converted to ``base.qcow2``.

What the guest does (:func:`init_script`, as ``/sbin/init`` after the initramfs mounted
the served partition and ran ``switch_root``), the way a user ran ``apt-get install``:

1. little room for dirty pages (``vm.dirty_background_bytes`` 64 KiB, ``vm.dirty_bytes``
   256 KiB) in a guest of 192 MiB: files are written back in pieces while written;
2. per generation: *download*, i.e. copy the generation's ``.deb`` files from the pool
   into ``/var/cache/apt/archives`` (where apt writes what it fetched); ``sync`` and drop
   the page cache, so what follows reads the archives from the disk; check the archives'
   SHA256 against the Packages index (as apt does after a download); ``dpkg -i`` them;
   from the second generation on, ``dpkg --purge`` every other workload package installed
   before (the oldest first), then ``fstrim /`` and ``sync``, which leave free host
   clusters between clusters in use in the overlay;
3. at the end: ``sync``, drop the page cache, ``dpkg --verify`` of every installed package
   (the base system's as well) and every archive's SHA256 against the index once more.

Everything the host parses is on the serial console after ``@@`` markers: dpkg's own
output (``@@DPKG``), ``dpkg --verify``'s lines (``@@VERIFY``), the archive checks
(``@@ARCHIVE name: OK|FAILED``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass

SUITE = "bookworm"
VARIANT = "minbase"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
POOL = "srv/nbdserve/pool"
INDEX = "srv/nbdserve/Packages"
SECTOR = 512

# Packages that install on the minbase tree alone (their dependencies are all in it), so
# any of them can be removed and installed again: 28 archives, 56 MB (three of 8 to 10 MB),
# 160 MB installed.  Libraries (large shared objects), fonts (a few big files each),
# documentation and kernel headers (many small files).
PACKAGES = (
    "fonts-noto-color-emoji", "fonts-arphic-ukai", "libcodec2-1.0", "libasan8", "libtsan2",
    "fonts-droid-fallback", "linux-libc-dev", "fonts-freefont-ttf", "libsvtav1enc1",
    "fonts-roboto-unhinted", "libssl3", "libaom3", "fonts-wqy-microhei", "fonts-mathjax",
    "fonts-liberation2", "libprotobuf32", "libvpx7", "fonts-dejavu-core", "liblsan0", "librav1e0",
    "libubsan1", "libisl23", "git-man", "zstd", "libsqlite3-0", "manpages", "xz-utils", "libmpfr6",
)


@dataclass(frozen=True)
class DebianSpec:
    packages: tuple[str, ...] = PACKAGES
    generations: int = 6                 # the packages are split into this many groups
    fs_type: str = "ext4"                # or "ext3", as in 2012
    partition_start_sector: int = 63
    disk_size: int = 1 << 30
    mirror: str | None = None            # default: the host's Debian mirror


def cache_dir() -> str:
    from .initramfs import cache_dir as guest_cache
    return os.path.join(guest_cache(), "debian")


def host_debian_mirror() -> str:
    """The first Debian URI of the host's apt sources (as scripts/container-image picks it)."""
    uris = []
    folder = "/etc/apt/sources.list.d"
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".sources"):
            with open(os.path.join(folder, name)) as f:
                uris += [line.split()[1] for line in f if line.startswith("URIs:") and len(line.split()) > 1]
    for path in ["/etc/apt/sources.list"] + [os.path.join(folder, n) for n in
                                              (sorted(os.listdir(folder)) if os.path.isdir(folder) else [])
                                              if n.endswith(".list")]:
        if os.path.exists(path):
            with open(path) as f:
                uris += [w[1] for w in (line.split() for line in f) if len(w) > 2 and w[0] == "deb"
                         and w[2] == SUITE]
    for uri in uris:
        if re.search(r"/debian/?$", uri):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def _run(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {tail}")
    return r


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def rootfs_tarball(mirror: str, cache: str) -> str:
    """``debootstrap --variant=minbase bookworm`` as a tarball (made once per mirror)."""
    target = os.path.join(cache, f"rootfs-{SUITE}-{VARIANT}-{_key(SUITE, VARIANT, mirror)}.tar")
    if os.path.exists(target):
        return target
    if shutil.which("debootstrap") is None and not os.path.exists("/usr/sbin/debootstrap"):
        raise RuntimeError("debootstrap not found (scripts/guest-deps installs it)")
    os.makedirs(cache, exist_ok=True)
    tree = tempfile.mkdtemp(prefix="rootfs.", dir=cache)
    try:
        _run(["debootstrap", f"--variant={VARIANT}", SUITE, tree, mirror], "debootstrap")
        with tarfile.open(target + ".part", "w") as tar:
            tar.add(tree, arcname=".")
        os.replace(target + ".part", target)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    return target


def _apt_config(mirror: str, status: str, cache: str) -> dict:
    """Environment for apt-get/apt-cache with a private configuration: the one source the
    tree was made from, its own lists, the tree's dpkg status."""
    root = os.path.join(cache, f"apt-{_key(SUITE, mirror)}")
    for d in ("lists/partial", "archives/partial", "sources.list.d", "preferences.d"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    with open(os.path.join(root, "sources.list"), "w") as f:
        f.write(f"deb {mirror} {SUITE} main\n")
    conf = os.path.join(root, "apt.conf")
    with open(conf, "w") as f:
        f.write(f'Dir::Etc::SourceList "{root}/sources.list";\n'
                f'Dir::Etc::SourceParts "{root}/sources.list.d";\n'
                f'Dir::Etc::Preferences "{root}/preferences";\n'
                f'Dir::Etc::PreferencesParts "{root}/preferences.d";\n'
                f'Dir::State::Lists "{root}/lists";\n'
                f'Dir::State::status "{status}";\n'
                f'Dir::Cache "{root}";\n'
                f'Dir::Cache::archives "{root}/archives";\n'
                'APT::Install-Recommends "false";\n')
    env = {**os.environ, "APT_CONFIG": conf, "LC_ALL": "C"}
    if not os.listdir(os.path.join(root, "lists")) or not any(
            n.endswith("InRelease") for n in os.listdir(os.path.join(root, "lists"))):
        _run(["apt-get", "-q", "update"], f"apt-get update ({mirror} {SUITE})", env=env)
    return env


def _stanzas(text: str) -> list[dict[str, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line[:1] not in (" ", "\t") and ":" in line:
                k, v = line.split(":", 1)
                fields[k] = v.strip()
        if fields:
            out.append(fields)
    return out


def archive_name(stanza: dict[str, str]) -> str:
    """The file name apt gives an archive it fetched (the epoch's colon quoted as %3a)."""
    version = stanza["Version"].replace(":", "%3a")
    return f"{stanza['Package']}_{version}_{stanza['Architecture']}.deb"


def download_packages(packages: tuple[str, ...], mirror: str, tree: str, cache: str) -> tuple[list[str], str]:
    """The ``.deb`` files of ``packages`` (``apt-get download``, cached) and their stanzas of
    the Packages index.  Each must install on ``tree`` alone: apt's simulation against the
    tree's status may install nothing else."""
    env = _apt_config(mirror, os.path.join(tree, "var/lib/dpkg/status"), cache)
    for p in packages:
        sim = _run(["apt-get", "-s", "install", p], f"apt-get -s install {p}", env=env).stdout
        extra = sorted({m for m in re.findall(r"^Inst (\S+)", sim, re.M)} - {p})
        if extra:
            raise RuntimeError(f"package {p} does not install alone on the {VARIANT} tree (needs {', '.join(extra)})")
    shown = _run(["apt-cache", "show", "--no-all-versions", *packages], "apt-cache show", env=env).stdout
    stanzas = {s["Package"]: s for s in _stanzas(shown)}
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    missing = [p for p in packages if not os.path.exists(os.path.join(debs, archive_name(stanzas[p])))]
    if missing:
        _run(["apt-get", "-q", "download", *missing], "apt-get download", env=env, cwd=debs)
    files = []
    for p in packages:
        path = os.path.join(debs, archive_name(stanzas[p]))
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != stanzas[p]["SHA256"]:
            os.unlink(path)
            raise RuntimeError(f"{os.path.basename(path)}: SHA256 differs from the Packages index")
        files.append(path)
    index = "\n\n".join(block for block in shown.strip().split("\n\n")) + "\n"
    return files, index


def write_mbr(disk, start: int, sectors: int, heads: int = 255, per_track: int = 63) -> None:
    """A DOS partition table with one Linux partition (type 0x83) at ``start``."""
    def chs(lba: int) -> bytes:
        c, rest = divmod(lba, heads * per_track)
        if c > 1023:
            return b"\xfe\xff\xff"
        h, s = divmod(rest, per_track)
        return bytes([h, ((c >> 2) & 0xC0) | (s + 1), c & 0xFF])
    entry = b"\x00" + chs(start) + b"\x83" + chs(start + sectors - 1) + struct.pack("<II", start, sectors)
    disk.seek(446)
    disk.write(entry + bytes(48) + b"\x55\xaa")


# ------------------------------------------------------------------ the guest's /sbin/init
INIT = r"""#!/bin/bash
# nbdserve harness: /sbin/init of the Debian guest (generated by nbdserve.guest.debian)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C DEBIAN_FRONTEND=noninteractive
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
mount -o remount,rw / || echo "@@ERROR remount rw"
exec < /dev/null
P=/__POOL__; INDEX=/__INDEX__; A=/var/cache/apt/archives
finish() {
  sync
  mount -o remount,ro / || echo "@@ERROR remount ro"
  sync
  echo "@@POWEROFF"
  echo o > /proc/sysrq-trigger
  sleep 60
}
echo "@@USERLAND debian $(cat /etc/debian_version) dpkg $(dpkg-query -W -f '${Version}' dpkg)"
echo "@@PARTITION $(cat /sys/class/block/$(basename $(findmnt -n -o SOURCE / 2>/dev/null || echo x))/start 2>/dev/null)"
# sha256sum -c lines from the Packages index: "<sha256>  <file name>"
# (the archive's name as apt gives it: package_version_architecture.deb, ":" as %3a)
awk '/^Package:/ {p = $2} /^Version:/ {v = $2; gsub(":", "%3a", v)} /^Architecture:/ {a = $2}
     /^SHA256:/ {s = $2} /^$/ {print s "  " p "_" v "_" a ".deb"} END {print s "  " p "_" v "_" a ".deb"}' \
  $INDEX | sort -u > /tmp/sha256sums
# little memory for dirty pages, as on the small VMs of 2012: files are written back in
# pieces while they are being written
echo 65536 > /proc/sys/vm/dirty_background_bytes
echo 262144 > /proc/sys/vm/dirty_bytes
# the disk's I/O counters at each phase (/sys/block/DEV/stat: reads, merges, sectors, ms, writes, ...)
DISK=$(basename $(readlink -f /sys/class/block/$(basename $(findmnt -n -o SOURCE /))/..))
phase() { echo "@@PHASE $* $(cut -d' ' -f1 /proc/uptime)"; echo "@@IO $(cat /sys/block/$DISK/stat)"; }
dropcaches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
dpkg_() {  # dpkg with its words on the console
  dpkg "$@" 2>&1 | sed -u 's/^/@@DPKG /'
}
archives() {  # $@ = archive file names: their SHA256 against the Packages index
  printf '  %s\n' "$@" > /tmp/names
  (cd $A && grep -F -f /tmp/names /tmp/sha256sums | sha256sum -c 2>&1) | sed 's/^/@@ARCHIVE /'
}
download() {  # copy archives $@ from the pool, as apt writes a download into its cache
  for f in "$@"; do cp "$P/$f" "$A/$f.partial" && mv "$A/$f.partial" "$A/$f"; done
}
generation() {  # $1 = number; $2 = archives to install; $3 = packages to purge first
  g=$1
  if [ -n "$3" ]; then
    phase remove $g
    dpkg_ --purge $3
    phase fstrim $g
    sync
    fstrim / || echo "@@ERROR fstrim"
    sync
  fi
  phase download $g
  download $2
  phase dropcaches $g
  dropcaches
  phase sha256 $g
  archives $2
  phase install $g
  dpkg_ -i $(for f in $2; do echo $A/$f; done)
}
echo "@@BEGIN"
__GENERATIONS__
phase verify
dropcaches
echo "@@FILES $(cat /var/lib/dpkg/info/*.md5sums | wc -l)"
dpkg --verify 2>&1 | sed 's/^/@@VERIFY /'
for f in $(awk '{print $2}' /tmp/sha256sums); do [ -f $A/$f ] && echo $f; done > /tmp/downloaded
phase archives
archives $(cat /tmp/downloaded)
for p in __PACKAGES__; do
  [ "$(dpkg-query -W -f '${Status}' $p 2>/dev/null)" = "install ok installed" ] && echo "@@INSTALLED $p"
done
phase end
echo "@@END"
finish
"""


def generations(packages: tuple[str, ...], count: int) -> list[list[str]]:
    """``packages`` dealt into ``count`` groups (round robin: big and small in each)."""
    return [list(packages[g::count]) for g in range(count) if packages[g::count]]


def _plan(spec: DebianSpec) -> list[tuple[list[str], list[str]]]:
    """Per generation: the packages installed and those purged before.  From the second
    generation on, every other workload package installed (the oldest first) is purged."""
    plan, installed = [], []
    for g, group in enumerate(generations(spec.packages, spec.generations)):
        gone = installed[::2] if g else []
        installed = [p for p in installed if p not in gone] + group
        plan.append((group, gone))
    return plan


def installed_at_end(spec: DebianSpec) -> list[str]:
    installed: list[str] = []
    for group, gone in _plan(spec):
        installed = [p for p in installed if p not in gone] + group
    return installed


def init_script(spec: DebianSpec, archive_of: dict[str, str]) -> str:
    """The guest's /sbin/init for ``spec``, the archives named by ``archive_of``."""
    lines = [f'generation {g} "{" ".join(archive_of[p] for p in group)}" "{" ".join(gone)}"'
             for g, (group, gone) in enumerate(_plan(spec))]
    return (INIT.replace("__POOL__", POOL).replace("__INDEX__", INDEX)
            .replace("__GENERATIONS__", "\n".join(lines)).replace("__PACKAGES__", " ".join(spec.packages)))


KEEP_BASES = 3          # base images kept in the cache (the most recently used)


def _base_path(spec: DebianSpec, cache: str) -> tuple[str, str]:
    mirror = spec.mirror or host_debian_mirror()
    return os.path.join(cache, f"base-{_key(SUITE, VARIANT, spec, mirror, INIT)}.qcow2"), mirror


def base_cached(spec: DebianSpec | None = None, cache: str | None = None) -> bool:
    return os.path.exists(_base_path(spec or DebianSpec(), cache or cache_dir())[0])


def _prune(cache: str, keep: str) -> None:
    bases = sorted((os.path.join(cache, n) for n in os.listdir(cache)
                    if n.startswith("base-") and n.endswith(".qcow2")), key=os.path.getmtime, reverse=True)
    for path in [b for b in bases if b != keep][KEEP_BASES - 1:]:
        os.unlink(path)


def build_base(spec: DebianSpec | None = None, cache: str | None = None) -> dict:
    """The cached Debian base image for ``spec`` (built when missing, keyed by a hash of the
    recipe: suite, variant, mirror, the spec, the init script): ``{"path", "installed",
    "partition_start_sector", "packages"}``."""
    spec = spec or DebianSpec()
    if spec.fs_type not in ("ext4", "ext3"):
        raise ValueError(f"fs_type must be ext4 or ext3, not {spec.fs_type!r}")
    cache = cache or cache_dir()
    os.makedirs(cache, exist_ok=True)
    target, mirror = _base_path(spec, cache)
    result = {"path": target, "installed": installed_at_end(spec),
              "partition_start_sector": spec.partition_start_sector, "packages": list(spec.packages)}
    if os.path.exists(target):
        os.utime(target)           # most recently used: kept by _prune
        return result
    tarball = rootfs_tarball(mirror, cache)
    work = tempfile.mkdtemp(prefix="base.", dir=cache)
    try:
        tree = os.path.join(work, "tree")
        os.makedirs(tree)
        with tarfile.open(tarball) as tar:
            tar.extractall(tree, numeric_owner=True)
        debs, index = download_packages(spec.packages, mirror, tree, cache)
        script = init_script(spec, {p: os.path.basename(d) for p, d in zip(spec.packages, debs)})
        pool = os.path.join(tree, POOL)
        os.makedirs(pool)
        for d in debs:
            shutil.copy(d, pool)
        with open(os.path.join(tree, INDEX), "w") as f:
            f.write(index)
        init = os.path.join(tree, "sbin/init")
        if os.path.lexists(init):
            os.unlink(init)
        with open(init, "w") as f:
            f.write(script)
        os.chmod(init, 0o755)
        with open(os.path.join(tree, "etc/fstab"), "w") as f:
            f.write(f"/dev/root / {spec.fs_type} defaults 0 1\n")
        with open(os.path.join(tree, "etc/hostname"), "w") as f:
            f.write("nbdserve-guest\n")
        raw = os.path.join(work, "disk.raw")
        start = spec.partition_start_sector * SECTOR
        sectors = spec.disk_size // SECTOR - spec.partition_start_sector
        with open(raw, "wb") as f:
            f.truncate(spec.disk_size)
            write_mbr(f, spec.partition_start_sector, sectors)
        _run([f"mkfs.{spec.fs_type}", "-q", "-F", "-b", "4096", "-E", f"offset={start}", "-d", tree, raw,
              str(sectors * SECTOR // 4096)], f"mkfs.{spec.fs_type}")
        _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, target + ".part"], "qemu-img convert")
        os.replace(target + ".part", target)
        _prune(cache, target)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ what the guest printed
# dpkg's own words about damage: its errors (and those of dpkg-deb, tar, the decompressors
# it runs), each with the indented lines that continue it
DPKG_ERROR = re.compile(r"error|corrupt|unexpected end|md5sum|mismatch|checksum|truncated|"
                        r"Errors were encountered", re.I)
# dpkg --verify: "??5?????? c /path" (the third column: the md5sum differs), "missing   /path"
VERIFY_LINE = re.compile(r"^(\S{9}|missing)\s+(?:c\s+)?(/.*)$")
ARCHIVE_LINE = re.compile(r"^(\S+\.deb): (OK|FAILED.*)$")
ARCHIVE_SUMMARY = re.compile(r"^sha256sum: WARNING: \d+ computed checksums? did NOT match$")


def parse_console(text: str) -> dict:
    """The @@ lines of the Debian guest's serial console."""
    out = {"files": 0, "corrupted": [], "errors": [], "phases": [], "dpkg_messages": [],
           "archives_damaged": [], "installed": [], "partition_start_sector": None, "userland": None,
           "completed": False, "archives_checked": 0}
    damaged: dict[str, None] = {}
    continues = False
    for line in text.splitlines():
        line = line.rstrip("\r\n")
        marker, _, rest = line.lstrip().partition(" ")
        if marker == "@@DPKG":
            if DPKG_ERROR.search(rest) or (continues and rest[:1].isspace()):
                out["dpkg_messages"].append(rest)
                continues = True
            else:
                continues = False
            continue
        elif marker == "@@VERIFY":
            out["dpkg_messages"].append(rest)
            m = VERIFY_LINE.match(rest.strip())
            if m and (m.group(1) == "missing" or m.group(1)[2] == "5"):
                out["corrupted"].append(m.group(2))
        elif marker == "@@ARCHIVE":
            m = ARCHIVE_LINE.match(rest.strip())
            if m:
                out["archives_checked"] += 1
                if m.group(2) != "OK":
                    damaged[m.group(1)] = None
            elif not ARCHIVE_SUMMARY.match(rest.strip()):
                out["errors"].append(f"sha256sum: {rest.strip()}")
        elif marker == "@@FILES":
            out["files"] = int(rest) if rest.strip().isdigit() else 0
        elif marker == "@@INSTALLED":
            out["installed"].append(rest.strip())
        elif marker == "@@PARTITION":
            out["partition_start_sector"] = int(rest) if rest.strip().isdigit() else None
        elif marker == "@@USERLAND":
            out["userland"] = rest.strip()
        elif marker == "@@PHASE":
            out["phases"].append(rest.strip())
        elif marker == "@@ERROR":
            out["errors"].append(rest.strip())
        elif marker == "@@END":
            out["completed"] = True
    out["archives_damaged"] = list(damaged)
    return out
