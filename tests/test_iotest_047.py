"""qemu-iotests 047 (Kevin Wolf's regression test for the qemu 1.1.2 corruption) over NBD.

As 047 runs it: its own command list (read from the fetched 047, not copied here) in ONE
qemu-io process, here against ``nbdserve serve`` over NBD on a fresh ``qemu-img create -f
qcow2`` image of 047's size; the output goes through 047's filter (``_filter_qemu_io`` of the
fetched common.filter) and ``qemu-img check`` through ``_check_test_img``'s filters, and the
result is compared with 047.out.  qemu 1.1.2 fails 047 exactly at ``read -P 0x55 1M 128k``
(the tail COW of the 0x77 write lands in the host cluster of guest 1M), so that run's
expected output is 047.out with qemu-io's ``Pattern verification failed`` line
(qemu-io-cmds.c read_f) before that read's report.
"""

from __future__ import annotations

import subprocess

import pytest

from qemu_iotests import iotest_047, qemu_filter

PATTERN_FAILED_AT = "read -P 0x55 1M 128k"


def qemu_io_output_047(t, port: int, pattern_fails: bool) -> list[str]:
    args = ["qemu-io", "-f", "raw", f"nbd://127.0.0.1:{port}/t"]
    for command in t.commands:
        args += ["-c", command]
    p = subprocess.run(args, capture_output=True, text=True, timeout=120)
    # qemu-io exits 1 when a command failed, here the pattern check
    assert p.returncode == (1 if pattern_fails else 0), (p.returncode, p.stdout, p.stderr)
    return qemu_filter(p.stdout + p.stderr, "_filter_qemu_io").splitlines()


def expected_047(t, allocator: str) -> list[str]:
    """047.out after its header and Formatting line, up to (without) "*** done"."""
    lines = t.expected
    assert lines[0] == "QA output created by 047" and lines[-1] == "*** done", lines
    assert lines[1].startswith("Formatting ") and f" size={t.size}" in lines[1], lines[1]
    body = lines[2:-1]
    if allocator != "qemu-1.1.2":
        return body
    # The report of the last command, read -P 0x55 1M 128k: "read 131072/131072 bytes at offset 1048576".
    assert t.commands[-1] == PATTERN_FAILED_AT, t.commands
    report = "read 131072/131072 bytes at offset 1048576"
    at = body.index(report)
    return body[:at] + ["Pattern verification failed at offset 1048576, 131072 bytes"] + body[at:]


@pytest.mark.parametrize("allocator", ["fixed", "qemu-1.1.2", "qemu-1.1.2+b7ab0fea"])
def test_iotest_047_one_qemu_io_over_nbd(nbdserve, tmp_path, allocator):
    t = iotest_047()
    image = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(t.size)], check=True)
    server = nbdserve("serve", "-f", "qcow2", "-x", "t", "--allocator", allocator, str(image))
    port = int(server.uri.rsplit(":", 1)[1].split("/")[0])
    actual = qemu_io_output_047(t, port, pattern_fails=allocator == "qemu-1.1.2")
    assert server.stop() == 0, server.stderr
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(image)], capture_output=True, text=True)
    actual += qemu_filter(check.stdout + check.stderr, "_filter_qemu_img_check").splitlines()
    assert actual == expected_047(t, allocator)
