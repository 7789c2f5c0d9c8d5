"""nbdserve as a library (nbdserve/api.py): the README's example, Trio's nursery form,
clean stops and start-up errors, driven by python3-libnbd and qemu-img."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio

import nbdserve
from conftest import REPO, import_libnbd
from qemu_tools import check, create, qemu_io


def test_readme_example(tmp_path):
    """The README's "As a library" example, run as written there."""
    import_libnbd()                            # Debian's python3-libnbd on sys.path
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### As a library"):]
    code = section[section.index("```python\n") + 10:section.index("```\n", section.index("```python"))]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    namespace["test_disk"](tmp_path)
    image = tmp_path / "disk.qcow2"
    check(image)                               # flushed and closed by the with block
    qemu_io(image, "read -P 0x5a 1M 64k")


async def test_serve_in_a_nursery_with_several_exports(tmp_path):
    a = create(tmp_path / "a.qcow2", "8M")
    b = tmp_path / "b.raw"
    b.write_bytes(b"\x11" * (1 << 20))
    async with trio.open_nursery() as nursery:
        serving = await nursery.start(nbdserve.serve, [nbdserve.Export(a, name="a"),
                                                       nbdserve.Export(str(b), name="b", format="raw",
                                                                       read_only=True)])
        assert serving.port != 0 and set(serving.uris) == {"a", "b"}
        await trio.run_process(["qemu-io", "-f", "raw", serving.uris["a"], "-c", "write -P 0x22 0 64k"],
                               capture_stdout=True)
        out = await trio.run_process(["qemu-img", "compare", "-f", "raw", serving.uris["b"], "-F", "raw", str(b)],
                                     capture_stdout=True, check=False)
        assert out.returncode == 0
        serving.stop()
    check(a)
    qemu_io(a, "read -P 0x22 0 64k")


def test_a_bad_image_raises_at_start(tmp_path):
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + bytes(508))
    from nbdserve.blockdev.images import ImageError
    with pytest.raises(ImageError, match=r"bad\.qcow2: Unsupported qcow2 version 0"):
        with nbdserve.Server(bad, format="qcow2"):
            pass


def test_import_is_light():
    """``import nbdserve`` (what the CLI imports first) loads neither Trio nor the engine."""
    code = "import sys, nbdserve; print(any(m == 'trio' or m.startswith('nbdserve.qcow2') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
