"""load_config: the TOML file's keys, relative paths, and every refusal."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from nbdserve.config import ConfigError, load_config
from nbdserve.server.settings import ExportSettings, ServerSettings, TlsSettings

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "nbdserve.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_full_config(tmp_path):
    sub = tmp_path / "etc"
    sub.mkdir()
    path = write(sub, """
        [server]
        bind = "0.0.0.0"
        port = 10999
        socket = "run/nbd.sock"
        verbose = true
        handshake_timeout = 2.5
        max_connections = 7
        extended_headers = false

        [[export]]
        name = "disk"
        image = "images/disk.qcow2"
        format = "qcow2"
        read_only = true
        description = "a disk"
        allocator = "qemu-1.1.2"
        delay = { cow_read = 0.5, cow_write = 1 }
        bitmaps = ["b0", "backup-1"]

        [[export]]
        name = "abs"
        image = "/srv/raw.img"
        """)
    config = load_config(path)
    assert config == ServerSettings(
        exports=[
            ExportSettings(name="disk", image=str(sub / "images" / "disk.qcow2"), format="qcow2",
                         read_only=True, description="a disk", allocator="qemu-1.1.2",
                         delays={"cow_read": 0.5, "cow_write": 1.0}, bitmaps=("b0", "backup-1")),
            ExportSettings(name="abs", image="/srv/raw.img"),
        ],
        bind="0.0.0.0", port=10999, unix_socket=str(sub / "run" / "nbd.sock"),
        verbose=True, handshake_timeout=2.5, max_connections=7, extended_headers=False,
    )


def test_defaults_and_relative_path_from_config_folder(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf", """
        [[export]]
        image = "../disk.raw"
        """)
    monkeypatch.chdir("/")  # the config's folder counts, not the working directory
    config = load_config(os.path.relpath(path, "/"))
    assert config == ServerSettings(exports=[ExportSettings(name="", image=str(tmp_path / "disk.raw"))])
    assert config.bind == "127.0.0.1" and config.port == 10809


def test_socket_alone_means_no_tcp(tmp_path):
    path = write(tmp_path, """
        [server]
        socket = "s.sock"
        [[export]]
        image = "a.raw"
        """)
    config = load_config(path)
    assert config.bind is None
    assert config.unix_socket == str(tmp_path / "s.sock")


def test_socket_with_port_keeps_tcp(tmp_path):
    path = write(tmp_path, """
        [server]
        socket = "s.sock"
        port = 10810
        [[export]]
        image = "a.raw"
        """)
    config = load_config(path)
    assert (config.bind, config.port, config.unix_socket) == ("127.0.0.1", 10810, str(tmp_path / "s.sock"))


def test_tls_table(tmp_path):
    path = write(tmp_path, """
        [server]
        tls = { cert = "pki/server-cert.pem", key = "/etc/key.pem", ca = "pki/ca-cert.pem", mode = "on" }
        [[export]]
        image = "a.raw"
        """)
    assert load_config(path).tls == TlsSettings(cert=str(tmp_path / "pki" / "server-cert.pem"), key="/etc/key.pem",
                                              ca=str(tmp_path / "pki" / "ca-cert.pem"), mode="on")


def test_tls_identity(tmp_path):
    path = write(tmp_path, """
        [server.tls]
        cert = "c.pem"
        key = "k.pem"
        ca = "ca.pem"
        identity = 'C=GB,O=Org\\, Inc.,CN=client'
        [[export]]
        image = "a.raw"
        """)
    assert load_config(path).tls.identity == "C=GB,O=Org\\, Inc.,CN=client"


def test_tls_subtable_defaults_to_required_without_client_verification(tmp_path):
    path = write(tmp_path, """
        [server.tls]
        cert = "c.pem"
        key = "k.pem"
        [[export]]
        image = "a.raw"
        """)
    assert load_config(path).tls == TlsSettings(cert=str(tmp_path / "c.pem"), key=str(tmp_path / "k.pem"),
                                              ca=None, mode="require")


def test_shipped_configs_load():
    demo = load_config(REPO / "conf" / "demo.toml")
    assert [(e.name, e.read_only) for e in demo.exports] == [("base", True), ("top", False)]
    assert demo.exports[1].image == str(REPO / "conf" / "demo" / "top.qcow2")
    example = load_config(REPO / "conf" / "nbdserve.example.toml")
    assert len(example.exports) == 1


GOOD_EXPORT = '[[export]]\nname = "a"\nimage = "a.raw"\n'

REFUSALS = [
    # (toml text, key named first in the message, a fragment of the message)
    ('bogus = 1\n' + GOOD_EXPORT, "bogus", "unknown key"),
    ('[server]\nbogus = 1\n' + GOOD_EXPORT, "server.bogus", "unknown key"),
    ('[server]\nport = 65536\n' + GOOD_EXPORT, "server.port", "out of range"),
    ('[server]\nport = -1\n' + GOOD_EXPORT, "server.port", "out of range"),
    ('[server]\nport = "10809"\n' + GOOD_EXPORT, "server.port", 'expected an integer, got "10809"'),
    ('[server]\nport = true\n' + GOOD_EXPORT, "server.port", "expected an integer, got true"),
    ('[server]\nport = 10809.0\n' + GOOD_EXPORT, "server.port", "expected an integer"),
    ('[server]\nbind = 127\n' + GOOD_EXPORT, "server.bind", "expected a string"),
    ('[server]\nbind = ""\n' + GOOD_EXPORT, "server.bind", "must not be empty"),
    ('[server]\nsocket = 1\n' + GOOD_EXPORT, "server.socket", "expected a string"),
    ('[server]\nverbose = "yes"\n' + GOOD_EXPORT, "server.verbose", "expected true or false"),
    ('[server]\nhandshake_timeout = 0\n' + GOOD_EXPORT, "server.handshake_timeout", "positive"),
    ('[server]\nhandshake_timeout = -1\n' + GOOD_EXPORT, "server.handshake_timeout", "positive"),
    ('[server]\nhandshake_timeout = "10"\n' + GOOD_EXPORT, "server.handshake_timeout", "number of seconds"),
    ('[server]\nmax_connections = 0\n' + GOOD_EXPORT, "server.max_connections", "out of range"),
    ('[server]\nmax_connections = 1.5\n' + GOOD_EXPORT, "server.max_connections", "expected an integer"),
    ('server = 1\n' + GOOD_EXPORT, "server", "expected a table"),
    ('[server]\n', "export", "no exports"),
    ('export = 1\n', "export", "expected an array of tables"),
    ('[[export]]\nname = "a"\n', "export[0].image", "missing"),
    (GOOD_EXPORT + '[[export]]\nname = "b"\n', "export[1].image", "missing"),
    ('[[export]]\nimage = 3\n', "export[0].image", "expected a string"),
    ('[[export]]\nimage = ""\n', "export[0].image", "must not be empty"),
    ('[[export]]\nimage = "a"\nname = 5\n', "export[0].name", "expected a string, got 5"),
    (GOOD_EXPORT + '[[export]]\nname = "a"\nimage = "b.raw"\n', "export[1].name",
     'duplicate export name "a" (also export[0])'),
    ('[[export]]\nimage = "a"\n[[export]]\nimage = "b"\n', "export[1].name", 'duplicate export name ""'),
    (GOOD_EXPORT + '[[export]]\nname = "b"\nimage = "b"\nallocator = "foo"\n', "export[1].allocator",
     'expected "fixed" or "qemu-1.1.2" or "qemu-1.1.2+b7ab0fea", got "foo"'),
    ('[[export]]\nimage = "a"\nallocator = 1\n', "export[0].allocator", 'expected "fixed" or "qemu-1.1.2" or "qemu-1.1.2+b7ab0fea", got 1'),
    ('[[export]]\nimage = "a"\nformat = "vmdk"\n', "export[0].format", 'expected "qcow2" or "raw", got "vmdk"'),
    ('[[export]]\nimage = "a"\nread_only = 1\n', "export[0].read_only", "expected true or false, got 1"),
    ('[[export]]\nimage = "a"\ndescription = []\n', "export[0].description", "expected a string, got an array"),
    ('[[export]]\nimage = "a"\ndelay = 1\n', "export[0].delay", "expected a table"),
    ('[[export]]\nimage = "a"\ndelay = { cow_read = -0.5 }\n', "export[0].delay.cow_read",
     "non-negative number of seconds, got -0.5"),
    ('[[export]]\nimage = "a"\ndelay = { cow_read = "1" }\n', "export[0].delay.cow_read", "number of seconds"),
    ('[[export]]\nimage = "a"\ndelay = { cow_read = inf }\n', "export[0].delay.cow_read", "finite"),
    ('[[export]]\nimage = "a"\ndelay = { "" = 1 }\n', "export[0].delay", "event name must not be empty"),
    ('[[export]]\nimage = "a"\nreadonly = true\n', "export[0].readonly", "unknown key"),
    ('[server]\nextended_headers = 1\n' + GOOD_EXPORT, "server.extended_headers", "expected true or false, got 1"),
    ('[[export]]\nimage = "a"\nbitmaps = "b0"\n', "export[0].bitmaps", 'expected an array of bitmap names, got "b0"'),
    ('[[export]]\nimage = "a"\nbitmaps = ["b0", 1]\n', "export[0].bitmaps[1]", "expected a string, got 1"),
    ('[[export]]\nimage = "a"\nbitmaps = [""]\n', "export[0].bitmaps[0]", "must not be empty"),
    ('[[export]]\nimage = "a"\nbitmaps = ["b0", "b0"]\n', "export[0].bitmaps[1]", 'bitmap "b0" named twice'),
    ('[server]\ntls = "yes"\n' + GOOD_EXPORT, "server.tls", "expected a table"),
    ('[server]\ntls = { key = "k.pem" }\n' + GOOD_EXPORT, "server.tls.cert", "missing"),
    ('[server]\ntls = { cert = "c.pem" }\n' + GOOD_EXPORT, "server.tls.key", "missing"),
    ('[server]\ntls = { cert = "", key = "k.pem" }\n' + GOOD_EXPORT, "server.tls.cert", "must not be empty"),
    ('[server]\ntls = { cert = "c.pem", key = 1 }\n' + GOOD_EXPORT, "server.tls.key", "expected a string"),
    ('[server]\ntls = { cert = "c.pem", key = "k.pem", ca = false }\n' + GOOD_EXPORT, "server.tls.ca",
     "expected a string"),
    ('[server]\ntls = { cert = "c.pem", key = "k.pem", identity = "CN=x" }\n' + GOOD_EXPORT, "server.tls.identity",
     "needs ca"),
    ('[server]\ntls = { cert = "c.pem", key = "k.pem", ca = "ca.pem", identity = "" }\n' + GOOD_EXPORT,
     "server.tls.identity", "must not be empty"),
    ('[server]\ntls = { cert = "c.pem", key = "k.pem", mode = "forced" }\n' + GOOD_EXPORT, "server.tls.mode",
     'expected "require" or "on" or "off", got "forced"'),
    ('[server]\ntls = { cert = "c.pem", key = "k.pem", verify = true }\n' + GOOD_EXPORT, "server.tls.verify",
     "unknown key"),
]


@pytest.mark.parametrize("text, key, fragment", REFUSALS, ids=[r[1] + ":" + r[2] for r in REFUSALS])
def test_refusals(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_allocator_message_exactly(tmp_path):
    path = write(tmp_path, GOOD_EXPORT + '[[export]]\nname = "b"\nimage = "b.raw"\nallocator = "foo"\n')
    with pytest.raises(ConfigError, match=r'^export\[1\]\.allocator: expected "fixed" or "qemu-1\.1\.2" or "qemu-1\.1\.2\+b7ab0fea", got "foo"$'):
        load_config(path)


def test_invalid_toml(tmp_path):
    path = write(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file: No such file or directory"):
        load_config(tmp_path / "absent.toml")
