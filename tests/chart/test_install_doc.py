"""docs/install.md is followed literally by newcomers: every values snippet and every
`--set` it shows must be accepted by the chart, and every object it shows by its CRD."""

from __future__ import annotations

import itertools
import re
import shlex

import pytest
import yaml
from chart_support import CHART, NAMESPACE, RELEASE, ROOT, helm, render
from test_operator_crds import validate as validate_custom_resource

DOC = (ROOT / "docs" / "install.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", DOC, flags=re.S)
SHELL = "\n".join(body for lang, body in BLOCKS if lang == "sh")


def _helm_commands() -> list[list[str]]:
    """The helm install/upgrade commands of the shell blocks, as argument lists."""
    joined = SHELL.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("helm ") and " --set" in line:
            line = line.replace("$REGISTRY", "registry.example.com/ml")
            commands.append(shlex.split(line))
    return commands


HELM_COMMANDS = _helm_commands()


def test_the_doc_shows_installs_with_settings() -> None:
    assert len(HELM_COMMANDS) >= 3


@pytest.mark.parametrize("command", HELM_COMMANDS, ids=lambda c: " ".join(c[:3]))
def test_every_set_in_the_doc_renders(command: list[str]) -> None:
    sets = [arg for flag, arg in itertools.pairwise(command) if flag == "--set"]
    assert sets
    args = [a for s in sets for a in ("--set", s)]
    helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *args)


def test_every_values_snippet_in_the_doc_renders() -> None:
    snippets = [
        yaml.safe_load(body) for lang, body in BLOCKS if lang == "yaml" and "apiVersion" not in body
    ]
    assert len(snippets) >= 2
    for values in snippets:
        if "monitoring" in values:
            values = {**values, "gpuExporter": {"enabled": True}}
        render(values)


def test_every_custom_resource_in_the_doc_is_valid() -> None:
    objects = [
        yaml.safe_load(body.split("<<'YAML'\n", 1)[1].split("\nYAML", 1)[0])
        for lang, body in BLOCKS
        if lang == "sh" and "<<'YAML'" in body
    ]
    assert objects
    for obj in objects:
        obj["metadata"].setdefault("namespace", NAMESPACE)
        assert validate_custom_resource(obj) == []
