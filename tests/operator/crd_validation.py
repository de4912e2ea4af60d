"""Validate a custom resource as the API server does: its CRD's openAPIV3Schema, then its
CEL rules (x-kubernetes-validations), evaluated by a real CEL implementation (cel-python),
not by a hand-written Python equivalent. Used by the emulator on every create and update,
and by the CRD tests directly.

Like the API server: schema errors and CEL errors are both reported; CEL rules run at the
level that declares them, with `self` bound to the value there; a rule that fails gives its
`message`.
"""

from __future__ import annotations

import datetime
import functools
from typing import Any

import celpy
import jsonschema


def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    try:
        datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in value


FORMATS = jsonschema.FormatChecker(formats=())
FORMATS.checks("date-time")(_date_time)
_CEL = celpy.Environment()


@functools.cache
def compile_rule(rule: str) -> Any:
    """The compiled program (raises celpy.CELParseError on a rule that does not compile,
    as the API server refuses such a CRD)."""
    return _CEL.program(_CEL.compile(rule))


def cel_holds(rule: str, value: Any) -> bool:
    try:
        result = compile_rule(rule).evaluate({"self": celpy.json_to_cel(value)})
    except celpy.CELEvalError:
        return False
    if isinstance(result, celpy.CELEvalError):
        return False
    return bool(result)


def cel_rules(schema: dict[str, Any]) -> list[str]:
    """Every CEL rule in a schema (so a test can check each compiles)."""
    found = [" ".join(r["rule"].split()) for r in schema.get("x-kubernetes-validations", [])]
    for sub in schema.get("properties", {}).values():
        found += cel_rules(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found += cel_rules(schema[key])
    return found


def cel_errors(schema: dict[str, Any], value: Any, where: str = "") -> list[str]:
    errors = []
    for rule in schema.get("x-kubernetes-validations", []):
        if not cel_holds(" ".join(rule["rule"].split()), value):
            errors.append(f"{where or '<root>'}: {rule.get('message') or rule['rule']}")
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += cel_errors(sub, value[key], f"{where}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                errors += cel_errors(extra, item, f"{where}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += cel_errors(schema["items"], item, f"{where}[{i}]")
    return errors


def validate(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Every problem the API server would report, as readable lines (empty: valid)."""
    validator = jsonschema.Draft7Validator(schema, format_checker=FORMATS)
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    # The API server reports both: the schema's errors and the CEL rules' (a rule that
    # cannot be evaluated on a malformed value counts as failing). Its CEL sees metadata as
    # name and generateName only.
    meta = obj.get("metadata") or {}
    visible = {**obj, "metadata": {k: meta[k] for k in ("name", "generateName") if k in meta}}
    return errors + cel_errors(schema, visible)
