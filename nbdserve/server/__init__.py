"""The Trio transport: listeners, one task per connection and per request.

What to serve comes as settings.py's plain types.  Names are imported on first use, so that
building settings (config.py, the command line) does not import Trio.
"""

from .._lazy import lazy_getattr

_EXPORTS = {
    "run_server": ".app", "Export": ".exports", "export_info": ".exports", "nbd_errno": ".exports",
    "open_export": ".exports", "ExportSettings": ".settings", "ServerSettings": ".settings",
    "TlsSettings": ".settings",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
