"""The configuration file watcher: what it notices, and what it keeps when a document is bad."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from configfile import MountedSecret, document

from tollgate_gateway import config_watch
from tollgate_gateway.config_watch import ConfigError, ConfigWatcher
from tollgate_gateway.keys import KeyRing


class Changes:
    """The watcher's `on_change` callback, remembering what it was handed."""

    def __init__(self) -> None:
        self.rings: list[KeyRing] = []
        self.versions: list[str] = []

    def __call__(
        self, ring: KeyRing, version: str, models: object = None, upstreams: object = None
    ) -> None:
        self.rings.append(ring)
        self.versions.append(version)

    @property
    def names(self) -> set[str]:
        return self.rings[-1].names()


def doc(name: str, plain: str = "sk-a") -> dict[str, object]:
    return document({plain: {"name": name}})


def watcher(path: Path) -> tuple[ConfigWatcher, Changes]:
    changes = Changes()
    watch = ConfigWatcher(str(path), [], changes)
    watch.load()
    return watch, changes


def test_load_applies_the_document(tmp_path: Path) -> None:
    secret = MountedSecret(tmp_path)
    secret.write(doc("team-a"))
    watch, changes = watcher(secret.path)
    assert changes.names == {"team-a"} and changes.versions == [watch.version]
    assert (watch.reloads_ok, watch.reloads_failed, watch.last_ok) == (0, 0, True)


def test_a_broken_first_document_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b"{not json")
    with pytest.raises(ConfigError, match=str(path)):
        watcher(path)
    with pytest.raises(ConfigError):
        watcher(tmp_path / "missing.json")


def test_kubernetes_secret_update_is_noticed(tmp_path: Path) -> None:
    """kubelet writes a new timestamped directory and swaps the `..data` symlink."""
    secret = MountedSecret(tmp_path)
    secret.write(doc("team-a"))
    watch, changes = watcher(secret.path)
    first = watch.version
    watch.check()
    assert len(changes.rings) == 1  # nothing changed, nothing applied
    secret.write(doc("team-b"))
    watch.check()
    assert changes.names == {"team-b"} and watch.version != first
    assert (watch.reloads_ok, watch.reloads_failed) == (1, 0)


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Overwrite the file's bytes (same inode), then put its mtime back."""
    before = os.stat(path)
    assert len(data) == before.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


def test_in_place_edit_of_same_size_and_mtime_is_noticed(tmp_path: Path) -> None:
    """No stat field changes (`cp -p`, `rsync -t`, a write within the mtime's granularity)."""
    path = tmp_path / "config.json"
    path.write_bytes(config_bytes("team-a"))
    watch, changes = watcher(path)
    rewrite_in_place(path, config_bytes("team-b"))
    watch.check()
    assert changes.names == {"team-b-0"} and watch.reloads_ok == 1


def config_bytes(name: str, keys: int = 1) -> bytes:
    return json.dumps(document({f"sk-{i}": {"name": f"{name}-{i}"} for i in range(keys)})).encode()


def test_big_file_is_reread_within_a_bounded_number_of_polls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file bigger than the per-poll read budget is compared only every few polls."""
    monkeypatch.setattr(config_watch, "CONTENT_CHECK_BYTES", 1000)
    path = tmp_path / "config.json"
    path.write_bytes(config_bytes("team-a", keys=40))
    size = path.stat().st_size
    polls = math.ceil(size / 1000)
    assert polls >= 4
    watch, changes = watcher(path)
    reads = count_reads(monkeypatch)
    for _ in range(polls * 3):
        watch.check()
    assert len(reads) == 3  # once every `polls` polls, not every poll
    rewrite_in_place(path, config_bytes("team-b", keys=40))
    for _ in range(polls):
        watch.check()
    assert "team-b-0" in changes.names


def count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    read_bytes = Path.read_bytes

    def counting(self: Path) -> bytes:
        reads.append(self)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    return reads


def test_touch_without_change_reloads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(config_bytes("team-a"))
    watch, changes = watcher(path)
    os.utime(path, ns=(0, 10**18))
    watch.check()
    assert len(changes.rings) == 1
    assert (watch.reloads_ok, watch.reloads_failed, watch.last_ok) == (0, 0, True)


def test_invalid_document_keeps_the_last_good_one(tmp_path: Path) -> None:
    secret = MountedSecret(tmp_path)
    secret.write(doc("team-a"))
    watch, changes = watcher(secret.path)
    good = watch.version
    bad_policy = document({"sk-b": {"name": "team-b", "policy": "missing"}})
    for bad in (b"{not json", bad_policy):
        secret.write(bad)
        watch.check()
        assert changes.names == {"team-a"} and watch.version == good
        assert not watch.last_ok
    assert (watch.reloads_ok, watch.reloads_failed) == (0, 2)
    secret.write(doc("team-c"))
    watch.check()
    assert changes.names == {"team-c"} and watch.last_ok
    assert (watch.reloads_ok, watch.reloads_failed) == (1, 2)


def test_missing_file_is_a_failed_reload_until_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(config_bytes("team-a"))
    watch, changes = watcher(path)
    saved = path.read_bytes()
    path.unlink()
    watch.check()
    watch.check()  # still missing: counted once
    assert (watch.reloads_failed, watch.last_ok) == (1, False)
    path.write_bytes(saved)  # back with the very same bytes
    watch.check()
    assert watch.last_ok and len(changes.rings) == 1 and watch.reloads_ok == 0


def test_the_api_and_the_file_bringing_the_same_document_reload_once(tmp_path: Path) -> None:
    secret = MountedSecret(tmp_path)
    secret.write(doc("team-a"))
    watch, changes = watcher(secret.path)
    new = config_bytes("team-b")
    watch.apply_bytes(new, source="secret")
    assert changes.names == {"team-b-0"} and watch.reloads_ok == 1
    secret.write(new)  # kubelet catches up later
    watch.check()
    assert len(changes.rings) == 2 and watch.reloads_ok == 1


def test_without_a_file_the_environment_keys_are_used() -> None:
    changes = Changes()
    watch = ConfigWatcher(None, [], changes)
    watch.load()
    assert watch.version == "env" and len(changes.rings) == 1
