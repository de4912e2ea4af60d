"""The Dockerfiles, checked for what can be checked without Docker: a base image pinned by
version, a multi-stage build whose final stage installs no build tools, a numeric non-root
USER (so Kubernetes can enforce runAsNonRoot), an entrypoint that is one of pyproject's
console scripts, names and tags that match the chart and the operator, and a build context
(.dockerignore) holding exactly what the wheel is built from."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from chart_support import CHART, ROOT

from tollgate_operator.settings import OperatorSettings

DOCKER = ROOT / "docker"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
# image -> the console script it runs
IMAGES = {
    "gateway": "tollgate-gateway",
    "operator": "tollgate-operator",
    "gpu-exporter": "tollgate-gpu-exporter",
}
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|make|build-essential|cmake|cargo|rustc|libc6-dev|python3-dev)\b"
)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile: enough of the grammar for these checks
    (line continuations, comments, ARG defaults, FROM ... AS ...)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(
                r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0]
            )
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_base_image_is_pinned_by_version(image: str) -> None:
    _, stages = parse(DOCKER / f"Dockerfile.{image}")
    for stage in stages:
        if stage.base in {s.name for s in stages}:
            continue  # FROM an earlier stage
        repository, _, tag = stage.base.partition(":")
        assert "@sha256:" in stage.base or re.match(r"^\d+\.\d+\.\d+-slim(-\w+)?$", tag), (
            f"{image}: base {stage.base!r} is not pinned to a full version (x.y.z-slim)"
        )
        assert repository in ("python", "docker.io/library/python"), stage.base


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_multi_stage_without_build_tools_in_the_final_image(image: str) -> None:
    _, stages = parse(DOCKER / f"Dockerfile.{image}")
    assert len(stages) >= 2, f"{image}: not a multi-stage build"
    last = final(stages)
    copies_from_build = [
        rest for keyword, rest in last.instructions if keyword == "COPY" and "--from=" in rest
    ]
    assert copies_from_build, f"{image}: the final stage copies nothing from the build stage"
    for keyword, rest in last.instructions:
        if keyword == "RUN":
            assert not BUILD_TOOLS.search(rest), f"{image}: build tools in the final stage: {rest}"
            assert "pip install" not in rest, f"{image}: installs packages in the final stage"
    # Sources are copied into the build stage only.
    sources = [
        rest for keyword, rest in last.instructions if keyword == "COPY" and "--from=" not in rest
    ]
    assert not sources, f"{image}: the final stage copies the build context: {sources}"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_runs_as_a_numeric_non_root_user(image: str) -> None:
    _, stages = parse(DOCKER / f"Dockerfile.{image}")
    users = [rest for keyword, rest in final(stages).instructions if keyword == "USER"]
    assert users, f"{image}: no USER in the final stage (it would run as root)"
    user, _, group = users[-1].partition(":")
    assert user.isdigit() and int(user) > 0, (
        f"{image}: USER {users[-1]!r} is not a numeric non-root uid"
    )
    assert not group or (group.isdigit() and int(group) > 0), users[-1]
    # The chart's pods run as the same uid.
    assert int(user) == 65532


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_entrypoint_is_the_console_script(image: str) -> None:
    _, stages = parse(DOCKER / f"Dockerfile.{image}")
    entrypoints = [rest for keyword, rest in final(stages).instructions if keyword == "ENTRYPOINT"]
    assert entrypoints, f"{image}: no ENTRYPOINT"
    command = json.loads(entrypoints[-1])  # exec form: signals reach the process directly
    assert Path(command[0]).name == IMAGES[image]
    assert IMAGES[image] in SCRIPTS, f"{IMAGES[image]} is not a console script in pyproject.toml"
    module, _, function = SCRIPTS[IMAGES[image]].partition(":")
    package = module.split(".")[0]
    packages = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    source = next(ROOT / p for p in packages if Path(p).name == package)
    assert (source / (module.split(".", 1)[1].replace(".", "/") + ".py")).exists()
    assert f"def {function}(" in (source / "main.py").read_text()


def test_image_names_and_tags_match_the_chart_and_the_operator() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    settings = OperatorSettings()
    for image, key in (
        ("gateway", "gateway"),
        ("operator", "operator"),
        ("gpu-exporter", "gpuExporter"),
    ):
        assert values["images"][key] == f"tollgate/{image}"
        header = (DOCKER / f"Dockerfile.{image}").read_text()
        assert f"-t tollgate/{image}:{chart['appVersion']}" in header
    assert settings.gateway_image == f"tollgate/gateway:{chart['appVersion']}"
    assert settings.exporter_image == f"tollgate/gpu-exporter:{chart['appVersion']}"
    assert chart["appVersion"] == PYPROJECT["project"]["version"]


def _context(patterns: list[str]) -> set[str]:
    """Files of the repository Docker would send, given .dockerignore patterns (the subset
    of the syntax used: '*', '!path', '**/name')."""
    files = {
        p.relative_to(ROOT).as_posix()
        for p in ROOT.rglob("*")
        if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts
    }
    kept = set()
    for path in files:
        include = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern[1:] if negate else pattern
            pat = pat.rstrip("/")
            matched = (
                fnmatch.fnmatch(path, pat)
                or path.startswith(pat + "/")
                or (pat.startswith("**/") and fnmatch.fnmatch(Path(path).name, pat[3:]))
                or (pat.startswith("**/") and f"/{pat[3:]}/" in f"/{path}")
            )
            if matched:
                include = negate
        if include:
            kept.add(path)
    return kept


def test_dockerignore_sends_only_what_the_wheel_is_built_from() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    context = _context(patterns)
    assert {"pyproject.toml", "README.md"} <= context  # hatchling needs the readme
    for package in PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
        assert f"{package}/__init__.py" in context, package
    for path in context:
        assert path.split("/")[0] in {"pyproject.toml", "README.md", "services", "operator"}, path
        assert "__pycache__" not in path and not path.endswith(".pyc"), path
    # Every COPY source of the Dockerfiles is in the context.
    for image in IMAGES:
        _, stages = parse(DOCKER / f"Dockerfile.{image}")
        for stage in stages:
            for keyword, rest in stage.instructions:
                if keyword == "COPY" and "--from=" not in rest:
                    for source in shlex.split(rest)[:-1]:
                        assert any(
                            p == source.rstrip("/") or p.startswith(source) for p in context
                        ), source
