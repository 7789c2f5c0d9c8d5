"""A busybox initramfs built at run time from the host's Debian packages.

Contents: Debian's ``busybox-static`` (every applet as a symlink), the Debian
kernel's own modules for virtio block/net, ext4 and nbd, Debian's ``nbd-client`` and
iproute2's ``ip`` with the shared libraries ``ldd`` names, and ``/init`` (:data:`INIT`).  The
archive is a gzip'd cpio "newc" written here, cached under
``~/.cache/nbdserve-guest/<kernel version>/`` keyed by a hash of its inputs.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import os
import re
import stat
import subprocess

# load order matters: insmod does not resolve dependencies
BLOCK_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
                 "virtio_blk", "crc16", "mbcache", "jbd2", "crc32c_generic", "ext4")
NBD_MODULES = ("failover", "net_failover", "virtio_net", "nbd")
MODULES = BLOCK_MODULES + NBD_MODULES

BUSYBOX = "/bin/busybox"
NBD_CLIENT = "/usr/sbin/nbd-client"
IPROUTE = "/usr/sbin/ip"          # iproute2: busybox's ip has no route "quickack"
BINARIES = (NBD_CLIENT, IPROUTE)   # Debian's own, with the shared libraries ldd names

# /init: mount the pseudo file systems, load the modules, attach the disk for the
# client path named on the kernel command line (nbdserve.client=virtio|nbd-client),
# then run the workload script that the disk itself carries.  Everything the host
# parses is on the serial console between @@ markers.
INIT = r"""#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /mnt /run
echo 4 > /proc/sys/kernel/printk
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko || echo "@@ERROR insmod $m"; done
client=virtio
for arg in $(cat /proc/cmdline); do
  case "$arg" in nbdserve.client=*) client="${arg#nbdserve.client=}";; esac
done
echo "@@BOOTED client=$client"
finish() { sync; echo "@@POWEROFF"; poweroff -f; sleep 60; }
if [ "$client" = nbd-client ]; then
  ip link set lo up
  ip addr add 10.0.2.15/24 dev eth0
  ip link set eth0 up
  # ACK at once what the server sends (tcp(7) TCP_QUICKACK, as a route attribute): with
  # delayed ACKs each read reply slirp sends in segments stalls (a read took 110 ms, 4 ms now)
  /usr/sbin/ip route change 10.0.2.0/24 dev eth0 proto kernel scope link src 10.0.2.15 quickack 1 \
    || echo "@@ERROR ip route quickack"
  nbd-client 10.0.2.100 10809 /dev/nbd0 -N top || { echo "@@ERROR nbd-client failed"; finish; }
  dev=/dev/nbd0
else
  dev=/dev/vda
fi
case "$(cat /proc/cmdline)" in *nbdserve.root=partition*)
  # a Debian system on the disk's first partition: boot it, its /sbin/init is the harness
  disk=$dev
  case $disk in /dev/nbd*) dev=${disk}p1;; *) dev=${disk}1;; esac
  # (the kernel's NBD driver does not read the partition table of a device attached over
  # netlink until asked: BLKRRPART; the mount is retried while the partition appears)
  [ "$client" = nbd-client ] && blockdev --rereadpt $disk
  mkdir -p /root
  i=0
  until mount -t ext4 -o rw $dev /root 2>/dev/null; do
    i=$((i+1)); [ $i -lt 50 ] || { echo "@@ERROR mount $dev failed"; finish; }
    sleep 0.2
  done
  umount /proc /sys
  mount -o move /dev /root/dev
  exec switch_root /root /sbin/init
esac
i=0
while [ ! -b $dev ] && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done
mount -t ext4 $dev /mnt || { echo "@@ERROR mount $dev failed"; finish; }
if [ ! -f /mnt/var/lib/nbdserve-workload/workload.sh ]; then
  echo "@@ERROR no workload on $dev"; umount /mnt; finish
fi
cp /mnt/var/lib/nbdserve-workload/workload.sh /tmp/workload.sh
echo "@@BEGIN"
sh /tmp/workload.sh "$dev" /mnt 2>&1
echo "@@END rc=$?"
umount /mnt 2>/dev/null
[ "$client" = nbd-client ] && nbd-client -d /dev/nbd0
finish
"""


def kernel_image() -> str | None:
    """The newest /boot/vmlinuz-* that has its modules installed, or None."""
    for path in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        if os.path.isdir(f"/lib/modules/{kernel_version(path)}/kernel"):
            return path
    return None


def kernel_version(vmlinuz: str) -> str:
    return os.path.basename(vmlinuz)[len("vmlinuz-"):]


def _module_path(version: str, name: str) -> str:
    out = subprocess.run(["modinfo", "-k", version, "-F", "filename", name],
                         capture_output=True, text=True, check=True).stdout.strip()
    if not out or not os.path.exists(out):
        raise FileNotFoundError(f"kernel module {name} for {version} not found")
    return out


def _shared_libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


class _Cpio:
    """cpio "newc" (SVR4 without CRC), the format the kernel unpacks."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name = name.lstrip("/")
        if name in self.seen:
            return
        self.seen.add(name)
        parent = os.path.dirname(name)
        if parent and parent not in self.seen:
            self.dir(parent)
        self.ino += 1
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(header + name.encode() + b"\0")
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "nbdserve-guest")


def build_initramfs(vmlinuz: str, cache: str | None = None) -> str:
    """Path of the gzip'd initramfs for ``vmlinuz`` (built once, then taken from the cache)."""
    version = kernel_version(vmlinuz)
    modules = [(name, _module_path(version, name)) for name in MODULES]
    libs = sorted({lib for binary in BINARIES for lib in _shared_libraries(binary)})
    inputs = [BUSYBOX, *BINARIES] + [p for _, p in modules] + libs
    h = hashlib.sha256(INIT.encode())
    for path in inputs:
        st = os.stat(path)
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    folder = os.path.join(cache or cache_dir(), version)
    target = os.path.join(folder, f"initramfs-{h.hexdigest()[:16]}.cpio.gz")
    if os.path.exists(target):
        return target
    os.makedirs(folder, exist_ok=True)

    cpio = _Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "mnt", "run", "etc",
              "lib/modules", "lib64", "lib/x86_64-linux-gnu"):
        cpio.dir(d)
    with open(BUSYBOX, "rb") as f:
        cpio.file("bin/busybox", f.read(), 0o755)
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in applets:
        if applet not in ("bin/busybox",):
            cpio.symlink(applet, "/bin/busybox")
    for binary in BINARIES:
        with open(binary, "rb") as f:
            cpio.file(binary, f.read(), 0o755)
    for lib in libs:
        real = os.path.realpath(lib)
        with open(real, "rb") as f:
            cpio.file(lib, f.read(), 0o755)
    for name, path in modules:
        with open(path, "rb") as f:
            cpio.file(f"lib/modules/{name}.ko", f.read())
    cpio.file("modules.order", "\n".join(MODULES).encode() + b"\n")
    cpio.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n")
    cpio.file("init", INIT.encode(), 0o755)
    tmp = target + f".{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.compress(cpio.finish(), compresslevel=6))
    os.replace(tmp, target)
    return target
