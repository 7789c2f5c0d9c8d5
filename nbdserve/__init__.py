"""nbdserve: an NBD server for qcow2 images with a pure-Python qcow2 engine.

As a library (nbdserve/api.py): ``nbdserve.serve`` (Trio), ``nbdserve.Server`` (a context
manager for other code), ``nbdserve.Export``.  Imported on first use, so that the
command line does not pay for them.
"""

from ._lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {"serve": ".api", "Server": ".api", "Serving": ".api", "Export": ".api"}
__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
