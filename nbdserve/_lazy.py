"""Package names imported on first use (PEP 562 module __getattr__), so that a command
imports only what it runs: ``nbdserve check`` needs neither Trio nor the write path."""

from __future__ import annotations

from importlib import import_module


def lazy_getattr(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` for ``package`` serving ``name -> relative module`` on demand."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
