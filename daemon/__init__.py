"""registryd: the node and replica registry of a distributed inference cluster."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("registryd")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
