"""tests/qemu_source.py: qemu's source of the installed qemu, fetched from Debian at test time."""

from __future__ import annotations

import subprocess

from qemu_source import deb_src_sources, installed_source_version, qemu_source_tree


def test_deb_src_entries_made_from_deb_stanzas():
    text = ("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n\n"
            "Types: deb-src\nURIs: http://x\nSuites: y\nComponents: main\n\n"
            "# a comment\nTypes: deb\nURIs: http://deb.debian.org/debian-security\n"
            "Suites: bookworm-security\nComponents: main\n")
    out = deb_src_sources(text)
    stanzas = out.strip().split("\n\n")
    assert len(stanzas) == 2
    assert all("Types: deb-src" in s and "Types: deb\n" not in s for s in stanzas)
    assert "debian-security" in stanzas[1] and "# a comment" in stanzas[1]


def test_fetched_tree_is_the_installed_qemu():
    tree = qemu_source_tree()
    iotests = tree / "tests" / "qemu-iotests"
    for name in ("check", "common.filter", "047", "047.out"):
        assert (iotests / name).is_file(), name
    # qemu-img --version: "qemu-img version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)"
    banner = subprocess.run(["qemu-img", "--version"], capture_output=True, text=True, check=True).stdout
    assert f"version {(tree / 'VERSION').read_text().strip()} " in banner
    assert f"(Debian {installed_source_version()}" in banner
    assert qemu_source_tree() == tree      # cached: the same tree again
