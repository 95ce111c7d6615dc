"""sandtrace: trace exec, connect and bind of sandboxed processes with eBPF, detect rogue
behaviour, and stream it to SIEMs. The `sandtrace` command is sandtrace.cli."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sandtrace")
except PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
