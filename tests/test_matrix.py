"""The supported-versions matrix: the README's table is the list the nox sessions run.

Runs the real ``nox`` on the project's ``noxfile.py`` (or a copy of it); listing sessions
and the ``readme`` session create no virtualenv, so these tests install nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def nox(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m nox ARGS`` on ``cwd/noxfile.py``."""
    return subprocess.run(
        [sys.executable, "-m", "nox", "-f", str(cwd / "noxfile.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def matrix_sessions(cwd: Path = ROOT, env: dict[str, str] | None = None) -> list[dict[str, object]]:
    result = nox("--list", "--json", "-t", "matrix", cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    sessions: list[dict[str, object]] = json.loads(result.stdout)
    return sessions


def readme_rows(readme: str) -> dict[str, list[str]]:
    """The "Supported versions" table's rows, by session name."""
    section = readme.split("<!-- supported-versions: begin", 1)[1].split(
        "<!-- supported-versions: end", 1
    )[0]
    rows = {}
    for line in section.splitlines():
        if match := re.fullmatch(r"\| `([^`]+)` \|(.*)\|", line):
            rows[match[1]] = [cell.strip() for cell in match[2].split("|")]
    return rows


def copy_project(tmp_path: Path) -> Path:
    for name in ("noxfile.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_the_readme_table_lists_exactly_the_sessions_nox_runs() -> None:
    rows = readme_rows((ROOT / "README.md").read_text())
    sessions = matrix_sessions()
    assert [session["session"] for session in sessions] == list(rows)
    assert [session["python"] for session in sessions] == [row[0] for row in rows.values()]
    assert nox("-s", "readme", "--", "--check").returncode == 0
    for name, (_, websockets, _) in rows.items():
        if name.startswith("websockets-"):
            assert websockets == name.removeprefix("websockets-") + ".x"


def test_the_minimum_session_pins_the_declared_floors() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    python, websockets, others = readme_rows((ROOT / "README.md").read_text())["minimum"]
    assert project["requires-python"] == f">={python}"
    extras = project["optional-dependencies"]
    declared = [*project["dependencies"], *extras["dev"]]
    for extra in ("tracing", "grpc", "logging", "sentry", "alertmanager"):  # dev -> all -> these
        declared += extras[extra]
    floors: dict[str, str] = {}
    for line in declared:
        requirement = Requirement(line)
        for spec in requirement.specifier:
            if spec.operator == ">=":
                floors[requirement.name] = spec.version
    assert websockets == floors.pop("websockets")
    assert floors  # prometheus_client, opentelemetry-*, sentry-sdk, pytest, ...
    for name, version in floors.items():
        assert f" {name} {version}," in f" {others.split(': ', 1)[1]},", name


def test_a_stale_readme_table_fails_the_check_and_is_rewritten(tmp_path: Path) -> None:
    project = copy_project(tmp_path)
    readme = project / "README.md"
    original = readme.read_text()
    stale = re.sub(r"\n\| `minimum` \|[^\n]*", "", original)
    assert stale != original
    readme.write_text(stale)

    check = nox("-s", "readme", "--", "--check", cwd=project)
    assert check.returncode != 0
    assert "stale: run `nox -s readme`" in check.stderr
    assert readme.read_text() == stale  # --check does not write

    assert nox("-s", "readme", cwd=project).returncode == 0
    assert readme.read_text() == original


@pytest.mark.parametrize("ci", ["true", ""])
def test_a_missing_interpreter_skips_its_session_and_fails_it_under_ci(
    tmp_path: Path, ci: str
) -> None:
    project = copy_project(tmp_path)
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    missing = next(s for s in ("3.11", "3.12", "3.13") if s != running)
    # Only this interpreter's own directory on PATH, and an empty pyenv: nothing else is found.
    env = {
        **os.environ,
        "PATH": os.path.dirname(sys.executable),
        "PYENV_ROOT": str(tmp_path / "no-pyenv"),
        "CI": ci,
    }
    result = nox("-s", f"tests-{missing}", cwd=project, env=env)
    reason = f"CPython {missing} not found: no working python{missing} on PATH"
    assert reason in result.stderr
    if ci:
        assert result.returncode != 0
        assert f"Session tests-{missing} aborted" in result.stderr
    else:
        assert result.returncode == 0
        assert f"Session tests-{missing} skipped" in result.stderr
