"""Errors of the qcow2 engine."""


class Qcow2Error(Exception):
    """The image cannot be used: the message names the flaw in one line (like qemu's open errors)."""
