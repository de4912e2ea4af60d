"""tollgate gateway: the OpenAI-compatible front door in front of vLLM.

`__version__` is looked up on first use: `importlib.metadata` scans the installed
distributions, about a tenth of the start-up, and only the metrics and traces need it.
"""

from __future__ import annotations

import functools


@functools.cache
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("tollgate")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
