"""The two ways a connection can go wrong (after h11's RemoteProtocolError / LocalProtocolError)."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer broke the protocol; the only remedy is to drop the connection."""


class LocalProtocolError(Exception):
    """We misused the API (e.g. replied to a cookie that is not in flight)."""
