"""Status conditions and status patches that are written only when they change.

A status write is a real write (it wakes every watcher), so each status is computed in
full, compared with what the object already says, and only the difference is patched.
lastTransitionTime moves only when a condition's status flips, as the API conventions ask.
"""

from __future__ import annotations

import datetime
from typing import Any

from .reconcile import contains


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, ok: bool, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
    }


def merge_conditions(
    current: list[dict[str, Any]] | None, wanted: list[dict[str, Any]], generation: int | None
) -> list[dict[str, Any]]:
    """The wanted conditions, keeping lastTransitionTime where the status did not flip."""
    by_type = {c.get("type"): c for c in current or []}
    merged = []
    for cond in wanted:
        old = by_type.get(cond["type"])
        stamp = (
            old.get("lastTransitionTime")
            if old is not None and old.get("status") == cond["status"]
            else None
        )
        item = {**cond, "lastTransitionTime": stamp or now_iso()}
        if generation is not None:
            item["observedGeneration"] = generation
        merged.append(item)
    return merged


def status_patch(current: dict[str, Any] | None, wanted: dict[str, Any]) -> dict[str, Any]:
    """The top-level status fields that differ (conditions are compared without their
    timestamps). Empty when nothing changed: then nothing is written."""
    current = current or {}
    patch: dict[str, Any] = {}
    for key, value in wanted.items():
        if value is None:
            if current.get(key) is not None:
                patch[key] = None  # merge patch: remove it
        elif key == "conditions":
            old = [_strip(c) for c in current.get("conditions") or []]
            if old != [_strip(c) for c in value]:
                patch[key] = value
        elif not (
            key in current and contains(current[key], value) and contains(value, current[key])
        ):
            patch[key] = value
    return patch


def _strip(cond: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cond.items() if k != "lastTransitionTime"}
