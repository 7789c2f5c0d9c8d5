"""The Trio transport: listeners, one task per connection and per request."""

from .app import run_server
from .exports import Export, export_info, nbd_errno, open_export

__all__ = ["run_server", "Export", "export_info", "nbd_errno", "open_export"]
