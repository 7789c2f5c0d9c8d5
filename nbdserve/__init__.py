"""nbdserve: an NBD server for qcow2 images with a pure-Python qcow2 engine."""

__version__ = "0.1.0"
