"""nbdserve-qemu-nbd against Debian's qemu-nbd: the same command line must give the same
behaviour (lifetime, --fork, export flags and contexts, --offset, -s, --discard,
--detect-zeroes, -l, TLS with --object tls-creds-x509/authz-simple, --image-opts), and
what it cannot do is refused by name.  Every expectation is what
qemu-nbd itself does in the same run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, import_libnbd

DROPIN = str(Path(sys.executable).parent / "nbdserve-qemu-nbd")
QEMU_NBD = shutil.which("qemu-nbd") or "qemu-nbd"
SERVERS = {"qemu-nbd": QEMU_NBD, "nbdserve": DROPIN}
MiB = 1 << 20


def run(*args, check=True, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert p.returncode == 0, (args, p.returncode, p.stdout, p.stderr)
    return p


class Forked:
    """``SERVER --fork --pid-file F ARGS``: listening once the parent has exited 0."""

    def __init__(self, server: str, tmp: Path, *args):
        self.pid_file = tmp / f"{server}-{time.monotonic_ns()}.pid"
        p = run(SERVERS[server], "--fork", "--pid-file", self.pid_file, *args)
        assert p.stdout == "" and p.stderr == "", p    # qemu-nbd prints nothing when it starts
        self.pid = int(self.pid_file.read_text())

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{self.pid}").exists() and "zombie" not in Path(f"/proc/{self.pid}/status").read_text()

    def wait_gone(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.alive():
            assert time.monotonic() < deadline, f"pid {self.pid} still running"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            self.wait_gone()


@pytest.fixture
def servers(tmp_path):
    started: list[Forked] = []

    def start(server: str, *args) -> Forked:
        f = Forked(server, tmp_path, *args)
        started.append(f)
        return f

    yield start
    for f in started:
        f.stop()


def make_image(path: Path, size: str = "64M") -> Path:
    run("qemu-img", "create", "-q", "-f", "qcow2", path, size)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 3M 64k", path)
    return path


def nbdinfo_json(uri: str) -> dict:
    return json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]


def tcp_args(port: int) -> list[str]:
    return ["-b", "127.0.0.1", "-p", str(port)]


@pytest.mark.parametrize("server", list(SERVERS))
def test_without_persistent_exits_after_last_client_and_removes_socket(servers, tmp_path, server):
    image = make_image(tmp_path / "a.qcow2")
    sock = tmp_path / "s.sock"
    s = servers(server, "-k", sock, "-f", "qcow2", image)
    assert sock.exists() and s.alive()
    run("nbdinfo", "--size", f"nbd+unix:///?socket={sock}")
    s.wait_gone()
    assert not sock.exists()


@pytest.mark.parametrize("server", list(SERVERS))
def test_persistent_outlives_clients(servers, tmp_path, server):
    image = make_image(tmp_path / "a.qcow2")
    sock = tmp_path / "s.sock"
    s = servers(server, "-t", "-k", sock, "-f", "qcow2", image)
    for _ in range(3):
        assert run("nbdinfo", "--size", f"nbd+unix:///?socket={sock}").stdout.strip() == str(64 * MiB)
    assert s.alive()
    s.stop()
    assert not sock.exists()


@pytest.mark.parametrize("server", list(SERVERS))
def test_fork_reports_open_errors_and_exits_nonzero(tmp_path, server):
    p = run(SERVERS[server], "--fork", "-k", tmp_path / "s.sock", "-f", "qcow2", tmp_path / "missing.qcow2",
            check=False)
    assert p.returncode != 0 and "missing.qcow2" in p.stderr and len(p.stderr.splitlines()) == 1, p


FLAG_CASES = [[], ["-r"], ["-A"], ["-r", "-A"], ["-e", "2"], ["-e", "0"], ["-D", "a disk"], ["-x", "exp"]]
COMPARED = ("export-name", "export-size", "is_read_only", "can_multi_conn", "can_trim", "can_zero",
            "can_fast_zero", "can_flush", "can_cache", "can_df", "contexts", "description")


@pytest.mark.parametrize("flags", FLAG_CASES, ids=lambda f: " ".join(f) or "defaults")
def test_export_as_qemu_nbd_advertises_it(servers, tmp_path, flags):
    seen = {}
    for server in SERVERS:
        image = make_image(tmp_path / f"{server}.qcow2")   # one each: both lock their image as qemu does
        port = free_port()
        servers(server, "-t", *tcp_args(port), "-f", "qcow2", *flags, image)
        name = flags[flags.index("-x") + 1] if "-x" in flags else ""
        info = nbdinfo_json(f"nbd://127.0.0.1:{port}/{name}")
        seen[server] = {k: info.get(k) for k in COMPARED}
    assert seen["nbdserve"] == seen["qemu-nbd"]


def guest_view(uri: str, out: Path, fmt: str = "raw") -> bytes:
    run("qemu-img", "convert", "-f", fmt, "-O", "raw", uri, out)
    return out.read_bytes()


def test_offset_serves_the_image_from_there(servers, tmp_path):
    raw = tmp_path / "a.raw"
    raw.write_bytes(os.urandom(3 * MiB))
    views = {}
    for server in SERVERS:
        port = free_port()
        s = servers(server, "-t", *tcp_args(port), "-f", "raw", "--offset", str(MiB + 512), raw)
        views[server] = guest_view(f"nbd://127.0.0.1:{port}/", tmp_path / f"{server}.raw")
        s.stop()    # the image's write lock, for the next server
    assert views["nbdserve"] == views["qemu-nbd"] == raw.read_bytes()[MiB + 512:]


@pytest.mark.parametrize("server", list(SERVERS))
def test_snapshot_drops_writes_at_exit(servers, tmp_path, server):
    image = make_image(tmp_path / "a.qcow2")
    before = guest_view(str(image), tmp_path / "before.raw", "qcow2")
    port = free_port()
    s = servers(server, "-t", "-s", *tcp_args(port), "-f", "qcow2", image)
    uri = f"nbd://127.0.0.1:{port}/"
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 2M", "-c", "read -P 0x77 0 2M", uri).stdout
    assert "Pattern verification failed" not in out, out
    s.stop()
    assert guest_view(str(image), tmp_path / "after.raw", "qcow2") == before
    run("qemu-img", "check", image)


def image_map(path: Path) -> list:
    return json.loads(run("qemu-img", "map", "--output=json", "-f", "qcow2", path).stdout)


@pytest.mark.parametrize("flags", [[], ["--discard", "ignore"], ["--discard", "unmap"],
                                   ["--detect-zeroes", "on"], ["--discard", "unmap", "--detect-zeroes", "unmap"]],
                         ids=lambda f: " ".join(f) or "defaults")
def test_discard_and_detect_zeroes_leave_the_image_as_qemu_nbd_does(servers, tmp_path, flags):
    maps = {}
    for server in SERVERS:
        image = make_image(tmp_path / f"{server}.qcow2")
        port = free_port()
        s = servers(server, "-t", *tcp_args(port), "-f", "qcow2", *flags, image)
        run("qemu-io", "-f", "raw", "-c", "discard 0 512k", "-c", "write -z 3M 64k",
            "-c", "write -P 0 8M 1M", f"nbd://127.0.0.1:{port}/")
        s.stop()
        maps[server] = image_map(image)
    assert maps["nbdserve"] == maps["qemu-nbd"]


@pytest.mark.parametrize("cache", ["none", "writeback", "writethrough", "directsync", "unsafe"])
def test_cache_modes_serve_the_same_data(servers, tmp_path, cache):
    image = make_image(tmp_path / "a.qcow2")
    port = free_port()
    s = servers("nbdserve", "-t", *tcp_args(port), "-f", "qcow2", "--cache", cache, "--aio", "threads", image)
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x33 5M 64k", "-c", "flush",
              f"nbd://127.0.0.1:{port}/").stdout
    assert "wrote 65536/65536" in out
    s.stop()
    run("qemu-io", "-f", "qcow2", "-c", "read -P 0x33 5M 64k", "-c", "read -P 0x11 0 1M", image)


@pytest.mark.parametrize("flags, named", [
    (["-c", "/dev/nbd0"], "-c/--connect"), (["-d"], "-d/--disconnect"), (["-L"], "-L/--list"),
    (["--tls-hostname", "h"], "--tls-hostname"),
    (["--aio", "native"], "--aio native"),
    (["--aio", "io_uring"], "--aio io_uring"), (["-f", "vmdk"], "-f vmdk"), (["-k", "rel.sock"], "-k"),
    (["--detect-zeroes", "unmap"], "--detect-zeroes unmap"), (["-n", "--cache", "none"], "-n and --cache"),
    (["-T", "nbd_*"], "-T/--trace"),
])
def test_unsupported_flags_are_refused_by_name(tmp_path, flags, named):
    image = make_image(tmp_path / "a.qcow2")
    p = run(DROPIN, *flags, image, check=False)
    assert p.returncode != 0 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("nbdserve-qemu-nbd: error: ") and named in p.stderr, p


@pytest.mark.parametrize("command", [["nbdserve", "serve", "-f", "qcow2"], ["nbdserve-qemu-nbd", "-f", "qcow2"]])
def test_socket_activation(tmp_path, command):
    image = make_image(tmp_path / "a.qcow2")
    exe = [str(Path(sys.executable).parent / command[0]), *command[1:], str(image)]
    p = run("nbdinfo", "--size", "--", "[", *exe, "]")
    assert p.stdout == f"{64 * MiB}\n"
    p = run("nbdcopy", "--", "[", *exe, "]", tmp_path / "copy.raw")
    assert (tmp_path / "copy.raw").read_bytes() == guest_view(str(image), tmp_path / "view.raw", "qcow2")
    nbd = import_libnbd()
    h = nbd.NBD()
    h.connect_systemd_socket_activation(exe)
    assert h.pread(64 << 10, 3 * MiB) == b"\x22" * (64 << 10)
    h.shutdown()


def test_socket_activation_refuses_an_address(tmp_path):
    image = make_image(tmp_path / "a.qcow2")
    exe = [str(Path(sys.executable).parent / "nbdserve"), "serve", "-p", str(free_port()), str(image)]
    p = run("nbdinfo", "--size", "--", "[", *exe, "]", check=False)
    assert p.returncode != 0 and "-p cannot be used with socket activation" in p.stderr


def unit_value(path: Path, key: str) -> str:
    [line] = [ln for ln in path.read_text().splitlines() if ln.startswith(f"{key}=")]
    return line.split("=", 1)[1]


def test_conf_socket_and_service_pair_under_systemd_socket_activate(tmp_path):
    """conf/nbdserve.socket's ListenStream and conf/nbdserve.service's ExecStart, run by
    systemd's own activator (systemd-socket-activate, Accept=no as in the .socket)."""
    conf = Path(__file__).resolve().parent.parent / "conf"
    listen = unit_value(conf / "nbdserve.socket", "ListenStream")
    assert unit_value(conf / "nbdserve.socket", "Accept") == "no"
    host, _ = listen.rsplit(":", 1)
    argv = unit_value(conf / "nbdserve.service", "ExecStart").split()
    assert argv[0].endswith("/nbdserve") and argv[1] == "serve"
    name = argv[argv.index("-x") + 1]
    image = make_image(tmp_path / "disk.qcow2")
    argv = [str(Path(sys.executable).parent / "nbdserve"), *argv[1:-1], str(image)]
    port = free_port()
    activator = subprocess.Popen(["systemd-socket-activate", "-l", f"{host}:{port}", *argv],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        uri = f"nbd://{host}:{port}/{name}"
        deadline = time.monotonic() + 20
        while (p := run("nbdinfo", "--size", uri, check=False)).returncode != 0:
            assert time.monotonic() < deadline and activator.poll() is None, (p.stderr, activator.poll())
            time.sleep(0.1)
        assert p.stdout == f"{64 * MiB}\n"
        out = run("qemu-io", "-f", "raw", "-c", "read -P 0x22 3M 64k", uri).stdout
        assert "Pattern verification failed" not in out
    finally:
        activator.send_signal(signal.SIGTERM)
        _, err = activator.communicate(timeout=30)
    assert activator.returncode == 0, err


def snapshot_image(path: Path) -> Path:
    """Two internal snapshots (qemu-img snapshot -c), then a change and a resize after them."""
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 9M 64k", path)
    run("qemu-img", "snapshot", "-c", "one", path)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 512k 1M", "-c", "discard 9M 64k", path)
    run("qemu-img", "snapshot", "-c", "two", path)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x33 0 64k", path)
    run("qemu-img", "resize", "-q", "-f", "qcow2", path, "48M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x44 40M 64k", path)
    return path


@pytest.mark.parametrize("spec", ["one", "1", "two", "2", "snapshot.name=one", "snapshot.id=2",
                                  "snapshot.id=1,snapshot.name=one"])
def test_load_snapshot_serves_what_qemu_nbd_l_serves(servers, tmp_path, spec):
    image = snapshot_image(tmp_path / "sn.qcow2")
    views, infos = {}, {}
    for server in SERVERS:
        sock = tmp_path / f"{server}.sock"
        servers(server, "-t", "-k", sock, "-l", spec, image)
        uri = f"nbd+unix:///?socket={sock}"
        views[server] = guest_view(uri, tmp_path / f"{server}.raw")
        info = nbdinfo_json(uri)
        infos[server] = {k: info.get(k) for k in COMPARED}
        maps = run("nbdinfo", "--map", "--json", uri).stdout
        infos[server]["map"] = json.loads(maps)
    assert views["nbdserve"] == views["qemu-nbd"]
    assert infos["nbdserve"] == infos["qemu-nbd"] and infos["nbdserve"]["is_read_only"] is True
    assert views["nbdserve"] != guest_view(str(image), tmp_path / "active.raw", "qcow2")


@pytest.mark.parametrize("server", list(SERVERS))
@pytest.mark.parametrize("spec", ["three", "snapshot.id=1,snapshot.name=two"])
def test_load_snapshot_that_is_not_there_fails(tmp_path, server, spec):
    image = snapshot_image(tmp_path / "sn.qcow2")
    p = run(SERVERS[server], "--fork", "-k", tmp_path / "s.sock", "-l", spec, image, check=False)
    assert p.returncode == 1 and "Can't find snapshot" in p.stderr and len(p.stderr.splitlines()) == 1, p


# -- TLS: --object tls-creds-x509 / authz-simple, --tls-creds, --tls-authz ---------------------------

# Client certificate subjects (openssl -subj, -multivalue-rdn) whose distinguished names
# qemu-nbd prints when it denies them; nbdserve must let in exactly that identity.
SUBJECTS = {
    "plain": "/C=GB/ST=London/L=R'lyeh/O=Cthulhu Dark Lord Enterprises/CN=localhost",
    "escapes": '/DC=org/DC=example/O=Org, Inc./OU=a\\+b;c<d>"e\\\\f/CN= lead#x trail /emailAddress=a@b.c',
    "multi-valued": "/O=Example/CN=client+UID=42/title=#1",
    "utf-8": "/C=DE/O=Grüße GmbH/CN=Jürgen Größ",
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from tlscerts import folder, make_leaf, make_pki
    root = tmp_path_factory.mktemp("pki")
    made = make_pki(root)
    work = root / "work"
    made.subjects = {}
    for serial, (name, subject) in enumerate(SUBJECTS.items(), start=10):
        make_leaf(work, "ca", name, serial, "clientAuth", subject=subject)
        made.subjects[name] = folder(root, f"subject-{name}", {
            "ca-cert.pem": work / "ca-cert.pem", "client-cert.pem": work / f"{name}-cert.pem",
            "client-key.pem": work / f"{name}-key.pem"})
    # a server folder whose certificate another CA signed (qemu's sanity check refuses it)
    make_leaf(work, "other-ca", "foreign-server", 5, "serverAuth", "IP:127.0.0.1")
    made.foreign_server = folder(root, "foreign-server", {
        "ca-cert.pem": work / "ca-cert.pem", "server-cert.pem": work / "foreign-server-cert.pem",
        "server-key.pem": work / "foreign-server-key.pem"})
    return made


def x509(pki_dir: Path, *extra: str, id: str = "tls0") -> list[str]:
    return ["--object", ",".join([f"tls-creds-x509,id={id},dir={pki_dir},endpoint=server", *extra]),
            "--tls-creds", id]


def authz(identity: str) -> list[str]:
    return ["--object", f"authz-simple,id=authz0,identity={identity.replace(',', ',,')}", "--tls-authz", "authz0"]


def nbds(port: int, certificates: Path) -> str:
    return f"nbds://127.0.0.1:{port}/?tls-certificates={certificates}"


def qemu_tls_image(port: int, certificates: Path) -> list[str]:
    return ["--object", f"tls-creds-x509,id=c0,dir={certificates},endpoint=client",
            "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},tls-creds=c0"]


def test_tls_clients_with_certificates_and_plain_clients_refused(servers, pki, tmp_path):
    image = make_image(tmp_path / "a.qcow2")
    local = guest_view(str(image), tmp_path / "local.raw", "qcow2")
    seen = {}
    for server in SERVERS:
        port = free_port()
        s = servers(server, "-t", *tcp_args(port), *x509(pki.server), "-f", "qcow2", image)
        info = json.loads(run("nbdinfo", "--json", nbds(port, pki.client)).stdout)
        assert info["TLS"] is True
        seen[server] = {k: info["exports"][0].get(k) for k in COMPARED}
        run("qemu-img", "convert", "-O", "raw", *qemu_tls_image(port, pki.client), tmp_path / f"{server}.raw")
        seen[server]["bytes"] = (tmp_path / f"{server}.raw").read_bytes()
        out = run("qemu-io", *qemu_tls_image(port, pki.client), "-c", "read -P 0x22 3M 64k").stdout
        assert "Pattern verification failed" not in out
        for refused in (["nbdinfo", f"nbd://127.0.0.1:{port}/"],                 # plain
                        ["nbdinfo", nbds(port, pki.no_cert)],                      # no client certificate
                        ["nbdinfo", nbds(port, pki.wrong_ca)],                     # another CA's
                        ["qemu-img", "info", "-f", "raw", f"nbd://127.0.0.1:{port}/"]):
            assert run(*refused, check=False).returncode != 0, (server, refused)
        s.stop()    # the image's write lock, for the next server
    assert seen["nbdserve"] == seen["qemu-nbd"]
    assert seen["nbdserve"]["bytes"] == local


@pytest.mark.parametrize("server", list(SERVERS))
def test_tls_verify_peer_off_lets_in_clients_without_a_certificate(servers, pki, tmp_path, server):
    image = make_image(tmp_path / "a.qcow2")
    port = free_port()
    servers(server, "-t", *tcp_args(port), *x509(pki.server, "verify-peer=off"), "-f", "qcow2", image)
    assert run("nbdinfo", "--size", nbds(port, pki.no_cert)).stdout == f"{64 * MiB}\n"
    assert run("nbdinfo", "--size", f"nbd://127.0.0.1:{port}/", check=False).returncode != 0


def denied_identity(pki, client: Path, tmp_path: Path) -> str:
    """The distinguished name Debian's qemu-nbd prints when its authz-simple denies the
    certificate in ``client`` (qcrypto_tls_session_check_certificate)."""
    image = make_image(tmp_path / "dn.qcow2")
    port = free_port()
    log = tmp_path / "qemu-nbd.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([QEMU_NBD, "-t", *tcp_args(port), *x509(pki.server), *authz("CN=nobody"),
                                 "-f", "qcow2", str(image)], stderr=err)
    try:
        deadline = time.monotonic() + 20
        while "is denied" not in log.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            run("nbdinfo", "--size", nbds(port, client), check=False)
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    [line] = {ln for ln in log.read_text().splitlines() if "is denied" in ln}
    return line.split("TLS x509 authz check for ", 1)[1].rsplit(" is denied", 1)[0]


@pytest.mark.parametrize("name", list(SUBJECTS))
def test_tls_authz_lets_in_the_identity_qemu_nbd_names(servers, pki, tmp_path, name):
    client = pki.subjects[name]
    identity = denied_identity(pki, client, tmp_path)
    image = make_image(tmp_path / "a.qcow2")
    refusals = {}
    for server in SERVERS:
        allowed, denied = free_port(), free_port()
        servers(server, "-t", "-r", *tcp_args(allowed), *x509(pki.server), *authz(identity), "-f", "qcow2", image)
        servers(server, "-t", "-r", *tcp_args(denied), *x509(pki.server), *authz(identity + "x"), "-f", "qcow2",
                image)
        assert run("nbdinfo", "--size", nbds(allowed, client)).stdout == f"{64 * MiB}\n", server
        for port, certificates in ((allowed, pki.client), (denied, client)):
            p = run("nbdinfo", "--size", nbds(port, certificates), check=False)
            assert p.returncode != 0 and p.stdout == "", (server, certificates)
        out = run("qemu-io", "-r", *qemu_tls_image(allowed, client), "-c", "read -P 0x11 0 1M").stdout
        assert "Pattern verification failed" not in out
        p = run("qemu-img", "info", *qemu_tls_image(denied, client), check=False)
        assert p.returncode != 0, server
        refusals[server] = p.stderr.replace(str(denied), "PORT")
    assert refusals["nbdserve"] == refusals["qemu-nbd"]     # closed after the handshake, as qemu-nbd does


# qemu-nbd refuses these too (exit 1)
QEMU_REFUSES_TOO = [
    (["--object", "tls-creds-psk,id=t0,dir=/nonexistent,endpoint=server", "--tls-creds", "t0"], "tls-creds-psk"),
    (["--tls-creds", "t0"], "No TLS credentials with id 't0'"),
    (["--tls-authz", "a0"], "--tls-authz is not permitted without --tls-creds"),
    (["--object", "authz-simple,id=t0,identity=CN=x", "--tls-creds", "t0"], "is not TLS credentials"),
    (["--object", "tls-creds-x509,id=t0,dir={server}", "--tls-creds", "t0"], "for a server endpoint"),
    (["--object", "tls-creds-x509,id=t0,dir={client},endpoint=server"], "server-cert.pem: No such file"),
    (["--object", "tls-creds-x509,id=t0,dir={foreign},endpoint=server", "--tls-creds", "t0"],
     "failed validation against"),
]
# qemu-nbd has these; nbdserve-qemu-nbd refuses them by name
OURS_ONLY = [
    (["--object", "tls-creds-anon,id=t0,endpoint=server", "--tls-creds", "t0"], "tls-creds-anon"),
    (["--object", "secret,id=s0,data=x"], "--object secret"),
    (["--object", "authz-list,id=a0"], "--object authz-list"),
    (["--object", "tls-creds-x509,id=t0,dir={server},endpoint=server,priority=NORMAL"], "'priority'"),
    (["--object", "tls-creds-x509,id=t0,dir={server},endpoint=server,verify-peer=off",
      "--object", "authz-simple,id=a0,identity=CN=x", "--tls-creds", "t0", "--tls-authz", "a0"],
     "--tls-authz needs verify-peer=on"),
]


@pytest.mark.parametrize("args, named, qemu_refuses", [(a, n, True) for a, n in QEMU_REFUSES_TOO]
                         + [(a, n, False) for a, n in OURS_ONLY])
def test_tls_objects_refused_by_name(pki, tmp_path, args, named, qemu_refuses):
    image = make_image(tmp_path / "a.qcow2")
    args = [a.format(server=pki.server, client=pki.client, foreign=pki.foreign_server) for a in args]
    if qemu_refuses:
        q = run(QEMU_NBD, "--fork", "-k", tmp_path / "q.sock", *args, "-f", "qcow2", image, check=False)
        assert q.returncode == 1, q
    p = run(DROPIN, "--fork", "-k", tmp_path / "s.sock", *args, "-f", "qcow2", image, check=False)
    assert p.returncode != 0 and p.stdout == "", p
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("nbdserve-qemu-nbd: error: ") and named in p.stderr, p


def test_tls_foreign_certificate_passes_with_sanity_check_off(servers, pki, tmp_path):
    image = make_image(tmp_path / "a.qcow2")
    for server in SERVERS:
        port = free_port()
        s = servers(server, "-t", *tcp_args(port), *x509(pki.foreign_server, "sanity-check=off"), "-f", "qcow2",
                    image)
        # clients trusting the CA in that folder cannot verify the server's certificate
        assert run("nbdinfo", "--size", nbds(port, pki.client), check=False).returncode != 0, server
        s.stop()    # the image's write lock, for the next server


# -- --image-opts ---------------------------------------------------------------------------------

IMAGE_OPTS = ["driver=qcow2,file.filename={qcow2}", "driver=qcow2,file.driver=file,file.filename={qcow2}",
              "file.filename={qcow2}", "driver=raw,file.filename={raw}", "driver=file,filename={qcow2}",
              "driver=raw,file.driver=file,file.filename={qcow2}"]


@pytest.mark.parametrize("opts", IMAGE_OPTS)
def test_image_opts_serve_what_qemu_nbd_serves(servers, tmp_path, opts):
    qcow2 = make_image(tmp_path / "a.qcow2")
    raw = tmp_path / "a.raw"
    raw.write_bytes(os.urandom(3 * MiB))
    seen = {}
    for server in SERVERS:
        sock = tmp_path / f"{server}.sock"
        s = servers(server, "-t", "-k", sock, "--image-opts", opts.format(qcow2=qcow2, raw=raw))
        uri = f"nbd+unix:///?socket={sock}"
        info = nbdinfo_json(uri)
        seen[server] = {k: info.get(k) for k in COMPARED}
        seen[server]["bytes"] = guest_view(uri, tmp_path / f"{server}.raw")
        s.stop()    # the image's write lock, for the next server
    assert seen["nbdserve"] == seen["qemu-nbd"]


@pytest.mark.parametrize("opts, extra, named", [
    ("{qcow2}", [], "file="), ("driver=qcow2,file={qcow2}", [], "file="),
    ("driver=qcow2,foo=bar,file.filename={qcow2}", [], "'foo'"),
    ("driver=vmdk,file.filename={qcow2}", [], "driver=vmdk"), ("driver=raw", [], "file.filename"),
    ("driver=qcow2,file.driver=file,filename={qcow2}", [], "'filename'"),
    ("driver=qcow2,file.filename={qcow2}", ["-f", "qcow2"], "--image-opts and -f are mutually exclusive"),
])
def test_image_opts_outside_the_subset_refused_by_name(tmp_path, opts, extra, named):
    """qemu-nbd fails to open each of these too."""
    qcow2 = make_image(tmp_path / "a.qcow2")
    for server in SERVERS:
        p = run(SERVERS[server], "--fork", "-k", tmp_path / "s.sock", *extra, "--image-opts",
                opts.format(qcow2=qcow2), check=False)
        assert p.returncode != 0, (server, p)
    assert p.stderr.count("\n") == 1 and named in p.stderr, p
