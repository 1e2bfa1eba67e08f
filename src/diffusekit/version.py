"""The installed diffusekit version (imports nothing heavy: the package's __init__ and the PNGs' parameters use it)."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("diffusekit")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"
