"""A Linux guest on an nbdserve overlay runs dpkg's workload (nbdserve.guest).

Slow (a TCG boot and a few dozen MiB of guest writes per run): ``-m 'not slow'`` skips
them.  Skipped when the machine has no kernel in /boot or no qemu-system-x86_64
(``scripts/guest-deps`` installs both).
"""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import trio



CLIENTS = ("virtio", "nbd-client")
BUGGY_RUNS = int(os.environ.get("NBDSERVE_GUEST_RUNS", "1"))


def _require_guest():
    if not glob.glob("/boot/vmlinuz-*"):
        pytest.skip("no /boot/vmlinuz-* (scripts/guest-deps installs linux-image-amd64)")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("no qemu-system-x86_64 (scripts/guest-deps installs qemu-system-x86)")
    from nbdserve.guest import missing_requirements
    missing = missing_requirements()
    assert missing is None, missing


def _run(allocator, client, runs, tmp_path):
    from nbdserve.guest import format_guest_results, run_guest
    results = trio.run(lambda: run_guest(allocator, client, runs, False, workdir=str(tmp_path)))
    print(format_guest_results(results))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("client", CLIENTS)
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
@pytest.mark.parametrize("client", CLIENTS)
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
