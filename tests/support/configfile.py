"""The gateway configuration document on disk, written the way kubelet updates a mounted
Secret: files live in a timestamped directory, `..data` is a symlink to it, and the
visible `config.json` is a symlink through `..data`. An update writes a new directory and
renames a new `..data` symlink over the old one (atomic), then removes the old directory.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tollgate_contract.keys import key_hash

_counter = itertools.count()


def document(
    keys: dict[str, dict[str, Any]],
    policies: dict[str, dict[str, Any]] | None = None,
    default_policy: str | None = None,
) -> dict[str, Any]:
    """A document from plain keys (hashed here): {"sk-...": {"name": ..., ...}}."""
    doc: dict[str, Any] = {
        "apiVersion": "tollgate.dev/v1alpha1",
        "kind": "GatewayConfig",
        "policies": policies or {},
        "keys": {key_hash(plain): spec for plain, spec in keys.items()},
    }
    if default_policy:
        doc["defaultPolicy"] = default_policy
    return doc


class MountedSecret:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "config.json"

    def write(self, doc: dict[str, Any] | bytes) -> None:
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        version = self.dir / f"..2026_11_26_{next(_counter):06d}"
        version.mkdir()
        (version / "config.json").write_bytes(data)
        link = self.dir / "..data"
        old = link.resolve() if link.is_symlink() else None
        tmp = self.dir / "..data_tmp"
        os.symlink(version.name, tmp)
        os.replace(tmp, link)
        if not self.path.is_symlink():
            os.symlink("..data/config.json", self.path)
        if old is not None:
            shutil.rmtree(old)
