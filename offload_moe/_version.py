"""The installed package's version (a source tree without metadata reads as 0.0.0+source)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("offload_moe")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"
