"""tollgate gateway: the OpenAI-compatible front door in front of vLLM."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tollgate")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
