"""qemu-iotests 046 (concurrent cluster allocations) over NBD, its breakpoints through the
control socket.

The fetched 046's own shell functions give the commands: ``backing_io`` fills the backing
file (qemu-io on the file, as 046 does), ``overlay_io``'s command list goes into ONE qemu-io
reading a pipe, over NBD to ``nbdserve serve --control``, its ``break`` / ``wait_break`` /
``resume`` sent to the server (nbdserve/reproduce/piped.py, which also prints blkdebug's
"Suspended request" / "Resuming request" lines where qemu's blkdebug does), and
``verify_io``'s reads go to qemu-io on the image file after the server has stopped.  The
output, through 046's filters (common.filter's ``_filter_qemu_io`` and 046's sed), and
``qemu-img check`` through ``_filter_qemu_img_check``, must equal 046.out from "== Some
concurrent requests" on.

For the qemu-1.1.2 modes the reads of the two clusters 046 discards expect what qemu
1.1.x's discard left there (the backing file, see read_backing_after_1_1_discards), not
qemu >= 1.5's zeros; everything else is 046's own.

One difference from 046, forced by NBD: ``write -c`` (a compressed write, for the case
"the next cluster is compressed") has no NBD equivalent, so for that line the server is
stopped, qemu-io writes it to the file, and a new server (a new qemu-io) takes the rest.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import trio

from conftest import NbdserveProcess, free_port
from nbdserve.qcow2.policy import POLICIES
from nbdserve.reproduce.piped import run_script
from qemu_iotests import qemu_filter
from qemu_source import qemu_iotests_dir

SECTION = "== Some concurrent requests touching the same cluster =="
# 046: overlay_io | $QEMU_IO blkdebug::"$TEST_IMG" | _filter_qemu_io | sed -e ... -e ...
SED_046 = [r"s/[0-9]*\/[0-9]* bytes at offset [0-9]*/XXX\/XXX bytes at offset XXX/g", r"s/^[0-9]* KiB/XXX KiB/g"]


def shell_function(script: str, name: str) -> str:
    m = re.search(rf"^{re.escape(name)}\(\)\s*\{{.*?^\}}$", script, re.MULTILINE | re.DOTALL)
    assert m, f"046 has no {name}()"
    return m.group(0)


def call(script: str, name: str, *args: str, env: dict | None = None) -> list[str]:
    """The lines a shell function of 046 prints (046 pipes them into qemu-io)."""
    p = subprocess.run(["bash", "-c", f"{shell_function(script, name)}\n{name} \"$@\"", "046", *args],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    return [line for line in p.stdout.splitlines() if line.strip()]


def filtered(text: str, sed: list[str] | None = None) -> list[str]:
    """qemu-io's output as 046 filters it (a last prompt without newline joins the next output)."""
    text = qemu_filter(text, "_filter_qemu_io")
    if sed:
        args = ["sed"] + [a for expr in sed for a in ("-e", expr)]
        text = subprocess.run(args, input=text, capture_output=True, text=True, check=True).stdout
    return text.splitlines()


def piped_qemu_io_file(image, commands: list[str]) -> str:
    """``... | $QEMU_IO "$TEST_IMG"``: commands on stdin; its output, prompts and all."""
    p = subprocess.run(["qemu-io", "-f", "qcow2", str(image)], input="".join(c + "\n" for c in commands),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout + p.stderr


def serve(image, sock, allocator: str) -> NbdserveProcess:
    """``nbdserve serve`` of the overlay with a control socket."""
    return NbdserveProcess("serve", "-f", "qcow2", "-x", "t", "-p", str(free_port()), "--allocator", allocator,
                           "--control", str(sock), str(image))


def read_backing_after_1_1_discards(verify: list[str], overlay: list[str], backing: list[str]) -> list[str]:
    """046's verify_io expects a discarded v3 cluster to read zeros (qemu >= 1.5 sets the zero
    flag).  1.1 discard_single_l2() sets the entry to 0 instead, so the cluster reads its
    backing file again, and the COW of a later write into it copies the backing file's bytes:
    there the reads expect the pattern backing_io wrote into that cluster."""
    pattern_of = {}
    for line in backing:                  # write -P PATTERN OFFSETk 64k
        _, _, pattern, offset, _ = line.split()
        pattern_of[int(offset.rstrip("k")) * 1024 // CLUSTER] = pattern
    discarded = set()
    for line in overlay:
        if line.startswith("discard "):
            _, offset, length = line.split()
            first, end = -(-int(offset, 0) // CLUSTER), (int(offset, 0) + int(length, 0)) // CLUSTER
            discarded.update(range(first, end))
    out = []
    for line in verify:
        words = line.split()
        if words[:3] == ["read", "-P", "0"] and int(words[3], 0) // CLUSTER in discarded:
            words[2] = pattern_of[int(words[3], 0) // CLUSTER]
        out.append(" ".join(words))
    return out


CLUSTER = 64 * 1024


# every allocator but the one with the 2012 bug (046 came after 1.1.2; the b7ab0fea twin must pass)
@pytest.mark.parametrize("allocator", [name for name in POLICIES if name != "qemu-1.1.2"])
def test_iotest_046_over_nbd(tmp_path, allocator):
    iotests = qemu_iotests_dir()
    script = (iotests / "046").read_text()
    for needed in ("CLUSTER_SIZE=64k", "size=128M", "_make_test_img $size", '_make_test_img -b "$TEST_IMG.base" -F $IMGFMT 6G',
                   "backing_io 0 32 write | $QEMU_IO \"$TEST_IMG\" | _filter_qemu_io",
                   'overlay_io | $QEMU_IO blkdebug::"$TEST_IMG" | _filter_qemu_io',
                   'verify_io | $QEMU_IO "$TEST_IMG" | _filter_qemu_io', "_check_test_img"):
        assert needed in script, f"{iotests / '046'} no longer has {needed!r}"
    expected = (iotests / "046.out").read_text().splitlines()
    expected = expected[expected.index(SECTION):]
    assert expected[-1] == "*** done"
    expected = expected[:-1]

    base, image, sock = tmp_path / "t.qcow2.base", tmp_path / "t.qcow2", tmp_path / "control.sock"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(base), "128M"], check=True)
    assert "Pattern" not in piped_qemu_io_file(base, call(script, "backing_io", "0", "32", "write"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "-b", str(base),
                    "-F", "qcow2", str(image), "6G"], check=True)

    commands = call(script, "overlay_io")
    compressed = [i for i, c in enumerate(commands) if c.split()[:2] == ["write", "-c"]]
    assert len(compressed) == 1, commands
    at = compressed[0]
    def over_nbd(part: list[str]) -> str:
        run = trio.run(run_script, server.uri, str(sock), part)
        return "".join(line + "\n" for line in run.transcript)

    with serve(image, sock, allocator) as server:
        output = over_nbd(commands[:at])
    output += piped_qemu_io_file(image, [commands[at]])      # no compressed writes over NBD
    with serve(image, sock, allocator) as server:
        output += over_nbd(commands[at + 1:])
    actual = [SECTION] + filtered(output, SED_046) + ["", "== Verify image content =="]
    env = {"QEMU_IMG": "qemu-img", "IMGFMT": "qcow2", "TEST_IMG": str(image), "PATH": "/usr/bin:/bin"}
    verify = call(script, "verify_io", env=env)
    if POLICIES[allocator].follows_1_1:
        verify = read_backing_after_1_1_discards(verify, commands, call(script, "backing_io", "0", "32", "write"))
        assert verify != call(script, "verify_io", env=env)
    output = piped_qemu_io_file(image, verify)
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(image)], capture_output=True, text=True)
    actual += filtered(output + qemu_filter(check.stdout + check.stderr, "_filter_qemu_img_check"))
    assert actual == expected, "\n".join(__import__("difflib").unified_diff(expected, actual, lineterm=""))
