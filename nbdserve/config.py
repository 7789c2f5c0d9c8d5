"""Server and export configuration: the CLI flags and the TOML file both produce these."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PORT = 10809


@dataclass
class ExportConfig:
    name: str
    image: str                      # absolute path
    format: str | None = None       # "qcow2", "raw", or None to probe
    read_only: bool = False
    description: str = ""
    allocator: str = "fixed"        # qcow2 AllocationPolicy: "fixed" | "qemu-1.1.2"
    delays: dict[str, float] = field(default_factory=dict)  # blkdebug event -> seconds


@dataclass
class ServerConfig:
    exports: list[ExportConfig]
    bind: str | None = "127.0.0.1"  # None: no TCP listener
    port: int = DEFAULT_PORT
    unix_socket: str | None = None
    verbose: bool = False
    handshake_timeout: float = 10.0
    max_connections: int = 1000
