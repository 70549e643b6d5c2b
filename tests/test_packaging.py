"""Install files: pyproject.toml and environment.yml list the same packages; torch is pinned."""

import re
import tomllib

from conftest import ROOT


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower()


def _pip_section(text: str) -> list[str]:
    """The entries under `- pip:` in environment.yml (a plain list; no YAML library needed)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    indent = len(lines[start + 1]) - len(lines[start + 1].lstrip())
    out = []
    for line in lines[start + 1:]:
        if not line.strip() or len(line) - len(line.lstrip()) < indent:
            break
        out.append(line.strip()[2:].strip())
    return out


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    pip = _pip_section((ROOT / "environment.yml").read_text())
    editable = [p for p in pip if p.startswith("-e ")]
    assert editable == ["-e .[" + ",".join(project["optional-dependencies"]) + "]"]
    listed = [p for p in pip if not p.startswith("-e ")]
    assert sorted(map(_name, listed)) == sorted(map(_name, declared))
    # the exact pins agree too (torch above all: unpinned it pulls a multi-GB CUDA build)
    assert sorted(p for p in listed if "==" in p) == sorted(r for r in declared if "==" in r)
    assert "torch==2.13.0" in project["dependencies"]
