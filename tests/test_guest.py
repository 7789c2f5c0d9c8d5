"""A Linux guest on an nbdserve overlay runs dpkg's workload (nbdserve.guest).

Two workloads: ``debian`` (a debootstrapped Debian 12 on a partition at sector 63 installs
real packages with its own dpkg; 2 to 3 minutes per boot) and ``synthetic`` (the busybox
initramfs unpacking generated packages; about 25 s).  Slow (TCG boots): ``-m 'not slow'``
leaves them out.  CI boots the Debian guest once per client path for each of the A/B pair
(qemu-1.1.2, qemu-1.1.2+b7ab0fea), and the synthetic one twice (fixed through virtio,
qemu-1.1.2 through nbd-client).  A machine without a kernel in /boot or qemu-system-x86_64
fails them (``scripts/guest-deps`` installs both).
"""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import trio



CLIENTS = ("virtio", "nbd-client")
BUGGY_RUNS = int(os.environ.get("NBDSERVE_GUEST_RUNS", "1"))


def _require_guest(workload="synthetic"):
    assert glob.glob("/boot/vmlinuz-*"), "no /boot/vmlinuz-* (scripts/guest-deps installs linux-image-amd64)"
    assert shutil.which("qemu-system-x86_64"), "no qemu-system-x86_64 (scripts/guest-deps installs qemu-system-x86)"
    from nbdserve.guest import missing_requirements
    missing = missing_requirements(workload)
    assert missing is None, missing


def _run(allocator, client, runs, tmp_path, workload="synthetic"):
    from nbdserve.guest import format_guest_results, run_guest
    results = trio.run(lambda: run_guest(allocator, client, runs, False, workdir=str(tmp_path),
                                         workload=workload))
    print(format_guest_results(results))
    return results


# ------------------------------------------------------------------ the Debian guest
@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_debian_b7ab0fea_partner_dpkg_finds_nothing(client, tmp_path):
    """The A/B partner: qemu 1.1.2's model with only b7ab0fea; nothing else differs."""
    _require_guest("debian")
    from nbdserve.guest.debian import DebianSpec, installed_at_end
    spec = DebianSpec()
    [r] = _run("qemu-1.1.2+b7ab0fea", client, 1, tmp_path, workload="debian")
    log = open(r.console_log).read()
    assert r.completed, (r.errors, log[-3000:])
    assert not r.errors, r.errors
    assert r.userland == "debian"
    assert r.partition_start_sector == spec.partition_start_sector == 63
    assert sorted(r.packages_installed) == sorted(installed_at_end(spec)), log[-3000:]
    assert r.files_checked > 3000            # dpkg --verify: every file of every package
    assert log.count("@@ARCHIVE ") >= 2 * len(spec.packages)   # after each download, and at the end
    assert r.dpkg_messages == [] and r.files_corrupted == 0, r.dpkg_messages
    assert r.archives_damaged == []
    assert not r.corrupted
    assert r.check_clean, r.qemu_img_check


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
def test_debian_qemu_112_allocator_damage_found_by_dpkg_or_sha256(client, tmp_path):
    _require_guest("debian")
    results = _run("qemu-1.1.2", client, BUGGY_RUNS, tmp_path, workload="debian")
    for r in results:
        log = open(r.console_log).read()
        assert r.completed, (r.errors, log[-3000:])
        assert r.userland == "debian" and r.partition_start_sector == 63
        assert r.files_checked > 3000
        assert r.archives_damaged or r.files_corrupted or r.dpkg_messages, f"run {r.run}: nothing found ({r.console_log})"
        for path in r.corrupted_files:         # what --verify named is among dpkg's words
            assert any(path in m for m in r.dpkg_messages), (path, r.dpkg_messages)
        assert r.check_clean, r.qemu_img_check   # the data is damaged, not the metadata


# ------------------------------------------------------------------ the synthetic guest
@pytest.mark.slow
@pytest.mark.parametrize("client", ["virtio"])
def test_fixed_allocator_keeps_every_file(client, tmp_path):
    _require_guest()
    [r] = _run("fixed", client, 1, tmp_path)
    assert r.completed, (r.errors, open(r.console_log).read()[-3000:])
    assert not r.errors, r.errors
    assert r.files_checked > 50
    assert r.files_corrupted == 0, r.corrupted_files
    assert r.check_clean, r.qemu_img_check
    assert os.path.getsize(r.console_log) > 0


@pytest.mark.slow
@pytest.mark.parametrize("client", ["nbd-client"])
def test_qemu_112_allocator_corrupts_files_in_every_run(client, tmp_path):
    _require_guest()
    results = _run("qemu-1.1.2", client, BUGGY_RUNS, tmp_path)
    assert len(results) == BUGGY_RUNS
    for r in results:
        assert r.files_checked > 50, (r.errors, open(r.console_log).read()[-3000:])
        assert r.files_corrupted >= 1, f"run {r.run}: no file corrupted ({r.console_log})"


def test_parse_console_counts_files_and_failures():
    from nbdserve.guest import parse_console
    text = ("noise\n@@PHASE install\n@@FILE libnew0 usr/share/libnew0/data-0.bin: OK\r\n"
            "@@FILE libnew1 usr/lib/libnew1/liblibnew1-1.so: FAILED\n@@ERROR fstrim\n"
            "@@SUMMARY checked=2 failed=1\n")
    p = parse_console(text)
    assert p["files"] == 2
    assert p["corrupted"] == ["libnew1 usr/lib/libnew1/liblibnew1-1.so"]
    assert p["errors"] == ["fstrim"]
    assert p["phases"] == ["install"]
    assert p["summary"] == {"checked": "2", "failed": "1"}


def test_parse_debian_console_quotes_dpkg():
    from nbdserve.guest.debian import parse_console
    text = "\n".join([
        "@@USERLAND debian 12.15 dpkg 1.21.23", "@@PARTITION 63", "@@BEGIN",
        "@@PHASE install 0 9.7",
        "@@DPKG Selecting previously unselected package zstd.",
        "@@DPKG Unpacking zstd (1.5.4+dfsg2-5) ...",
        "@@DPKG dpkg-deb (subprocess): decompressing archive '/var/cache/apt/archives/zstd_1.5.4+dfsg2-5_amd64.deb'"
        " (size=700412) member 'data.tar': lzma error: compressed data is corrupt",
        "@@DPKG dpkg-deb: error: <decompress> subprocess returned error exit status 2",
        "@@DPKG dpkg: error processing archive /var/cache/apt/archives/zstd_1.5.4+dfsg2-5_amd64.deb (--install):",
        "@@DPKG  cannot copy extracted data for './usr/bin/zstd' to '/usr/bin/zstd.dpkg-new': unexpected end of file or stream",
        "@@DPKG Setting up xz-utils (5.4.1-1+deb12u1) ...",
        "@@DPKG update-alternatives: using /usr/bin/xz to provide /usr/bin/lzma (lzma) in auto mode",
        "@@ARCHIVE zstd_1.5.4+dfsg2-5_amd64.deb: FAILED",
        "@@ARCHIVE xz-utils_5.4.1-1+deb12u1_amd64.deb: OK",
        "@@ARCHIVE sha256sum: WARNING: 1 computed checksum did NOT match",
        "@@FILES 4711",
        "@@VERIFY ??5??????   /usr/share/fonts/truetype/arphic/ukai.ttc",
        "@@INSTALLED xz-utils", "@@END"])
    p = parse_console(text)
    assert p["completed"] and p["userland"].startswith("debian 12") and p["partition_start_sector"] == 63
    assert p["files"] == 4711
    assert p["corrupted"] == ["/usr/share/fonts/truetype/arphic/ukai.ttc"]
    assert p["archives_damaged"] == ["zstd_1.5.4+dfsg2-5_amd64.deb"] and p["archives_checked"] == 2
    assert p["installed"] == ["xz-utils"]
    assert p["errors"] == []
    assert len(p["dpkg_messages"]) == 5        # the four error lines, --verify's line
    assert p["dpkg_messages"][3].startswith(" cannot copy extracted data")
    assert p["dpkg_messages"][4].startswith("??5??????")
    assert parse_console("@@ARCHIVE sha256sum: 'standard input': no properly formatted checksum lines found"
                         )["errors"]
