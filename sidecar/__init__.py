"""ltx-sidecar: replicate one SQLite database to many regions using the LTX format.

A plain process that runs beside a SQLite application (no FUSE, not in the write
path). See DESIGN.md for the architecture.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ltx-sidecar")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
