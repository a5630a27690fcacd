"""The supported-versions test matrix: ``nox -l`` lists it, ``make matrix`` runs all of it.

One list, :data:`MATRIX`, is the source of truth: the sessions are made from it and the
README's "Supported versions" table is rendered from it (``nox -s readme`` rewrites the
table; ``nox -s readme -- --check`` fails when it is stale, and the test suite runs that).

Every test session installs the package with its C speedups required
(``WS_MONITORING_REQUIRE_SPEEDUPS=1``: a failed build fails the session), runs the tests
on them, then runs the reduced selection (:data:`REDUCED`), or the test paths named, on
the pure-Python fallback (``WS_MONITORING_NO_SPEEDUPS=1``). ``nox -- --reduced`` runs the
reduced selection on both instead of the whole suite; other arguments after ``--`` go
to pytest.

Virtualenvs live in ``.nox/`` and are reused: a session reinstalls only when
``pyproject.toml``, ``setup.py``, the C source or its own pins change, so a warm run costs
the tests alone.

Interpreters are found as nox finds them, on ``PATH`` (``python3.12``), and else under
pyenv's versions directory (``$PYENV_ROOT/versions/3.12.*``, which this noxfile puts on
``PATH`` for nox). A missing interpreter skips its sessions with the reason, and fails them
under ``CI=true``.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nox
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent
PYPROJECT = ROOT / "pyproject.toml"
README = ROOT / "README.md"

PYTHONS = ("3.11", "3.12", "3.13")
"""CPython minors the package supports; keep ``requires-python`` in step."""
BASE_PYTHON = PYTHONS[0]
"""Where the websockets and minimum-versions sessions run: the oldest supported Python,
the only one every declared floor has wheels for."""
WEBSOCKETS = ("17.2", "17.3", "17.4")
"""websockets minor releases, each pinned to its newest patch (``websockets==17.0.*``)."""

REDUCED = (
    "tests/test_core.py",
    "tests/adapters",
    "tests/test_bad_input.py",
    "tests/test_speedups.py",
)
"""What ``make test`` runs per session: the parts that touch the versions that vary
(``tests/adapters`` holds the transparency tests)."""

nox.options.envdir = str(ROOT / ".nox")
nox.options.reuse_venv = "yes"
nox.options.download_python = "never"  # no network but PyPI here: never fetch a Python
nox.options.error_on_external_run = True

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@dataclass(frozen=True)
class Combination:
    """One session of the matrix: a Python and what is pinned on it."""

    name: str
    python: str
    pins: tuple[str, ...] = ()
    websockets: str = "newest"
    others: str = "newest"


def floors(extras: tuple[str, ...] = ("dev",)) -> dict[str, str]:
    """The declared lower bounds (``>=X``) of what the sessions install, as ``{name: X}``.

    That is the build requirements, the dependencies and ``extras`` with the extras they
    name (``dev`` pulls in ``all``); the minimum session pins every one of them.
    """
    data = tomllib.loads(PYPROJECT.read_text())
    project = data["project"]
    requirements = [*data["build-system"]["requires"], *project["dependencies"]]
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for line in project["optional-dependencies"][extra]:
            requirement = Requirement(line)
            if requirement.name == project["name"]:
                pending += requirement.extras  # ws-monitoring[all]: another extra
            else:
                requirements.append(line)
    found: dict[str, str] = {}
    for line in requirements:
        requirement = Requirement(line)
        for spec in requirement.specifier:
            if spec.operator == ">=":
                found[requirement.name] = spec.version
    return found


def _matrix() -> tuple[Combination, ...]:
    low = floors()
    others = ", ".join(
        f"{name} {version}" for name, version in sorted(low.items()) if name != "websockets"
    )
    return (
        *(Combination(f"tests-{python}", python) for python in PYTHONS),
        *(
            Combination(
                f"websockets-{series}",
                BASE_PYTHON,
                (f"websockets=={series}.*",),
                websockets=f"{series}.x",
            )
            for series in WEBSOCKETS
        ),
        Combination(
            "minimum",
            BASE_PYTHON,
            tuple(f"{name}=={version}" for name, version in sorted(low.items())),
            websockets=low["websockets"],
            others=f"every declared floor: {others}",
        ),
    )


MATRIX = _matrix()
"""Every session, in run order."""


# --- interpreters -------------------------------------------------------------------------


def _works(executable: str, python: str) -> bool:
    # A pyenv shim for a version that is installed but not selected is on PATH and fails.
    check = f"import sys; sys.exit(sys.version_info[:2] != {tuple(map(int, python.split('.')))})"
    try:
        return subprocess.run([executable, "-c", check], capture_output=True).returncode == 0
    except OSError:
        return False


def _pyenv_candidates(python: str) -> Iterator[str]:
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    pattern = re.compile(rf"{re.escape(python)}\.(\d+)")
    versions = []
    for path in glob.glob(os.path.join(root, "versions", f"{python}.*")):
        if match := pattern.fullmatch(os.path.basename(path)):
            versions.append((int(match[1]), path))
    for _, path in sorted(versions, reverse=True):
        yield os.path.join(path, "bin", f"python{python}")


def find_interpreter(python: str) -> str | None:
    """A working CPython ``python`` (``"3.12"``): ``python3.12`` on PATH, else pyenv's newest."""
    on_path = shutil.which(f"python{python}")
    for candidate in [*([on_path] if on_path else []), *_pyenv_candidates(python)]:
        if _works(candidate, python):
            return candidate
    return None


def _missing_reason(python: str) -> str:
    root = os.environ.get("PYENV_ROOT") or "~/.pyenv"
    return (
        f"CPython {python} not found: no working python{python} on PATH and none under "
        f"{root}/versions/{python}.*; install it (e.g. `pyenv install {python}`)"
    )


INTERPRETERS = {python: find_interpreter(python) for python in PYTHONS}
for _found in INTERPRETERS.values():
    # nox finds an interpreter by name on PATH: put pyenv's (not selected by the shims) there.
    if _found and shutil.which(os.path.basename(_found)) != _found:
        os.environ["PATH"] = os.path.dirname(_found) + os.pathsep + os.environ["PATH"]


# --- sessions -----------------------------------------------------------------------------


def _stamp(combination: Combination) -> str:
    digest = hashlib.sha256(repr(combination).encode())
    for name in ("pyproject.toml", "setup.py", "ws_monitoring/_speedups.c"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def _install(session: nox.Session, combination: Combination) -> None:
    """Install the package (C speedups required) with the session's pins, unless done."""
    venv = Path(session.virtualenv.location)
    stamp = venv / ".ws-monitoring-installed"
    abi = combination.python.replace(".", "")
    built = glob.glob(str(ROOT / f"ws_monitoring/_speedups.cpython-{abi}-*.so"))
    if stamp.exists() and stamp.read_text() == _stamp(combination) and built:
        session.log("installed and unchanged: skipping the install")
        return
    env = {"WS_MONITORING_REQUIRE_SPEEDUPS": "1"}
    args = ["-e", ".[dev]"]
    if combination.name == "minimum":
        constraints = venv / "constraints.txt"
        constraints.write_text("".join(f"{pin}\n" for pin in combination.pins))
        # Also read in pip's isolated build environment: setuptools is pinned there too.
        env["PIP_CONSTRAINT"] = str(constraints)
    else:
        args += combination.pins
    session.install(*args, env=env)
    stamp.write_text(_stamp(combination))


# The session runs the fallback itself; this test would run part of it a second time.
_OWN_FALLBACK = "tests/test_speedups.py::test_pure_python_fallback_passes_the_suites"


def _pytest_args(posargs: list[str]) -> tuple[list[str], list[str]]:
    """pytest's arguments for the C pass and for the fallback pass.

    ``--reduced`` stands for :data:`REDUCED`. The C pass runs what is asked (the whole
    suite by default); the fallback pass runs the same test paths, or :data:`REDUCED`
    when none is named: the C and Python implementations differ only in the core's
    records and counters, which those tests cover end to end.
    """
    args = [arg for arg in posargs if arg != "--reduced"]
    if len(args) != len(posargs):
        args += REDUCED
    common = ["-p", "no:cacheprovider", "--deselect", _OWN_FALLBACK]
    named = [arg for arg in args if arg.startswith("tests")]
    options = [arg for arg in args if arg not in named]
    return [*common, *args], [*common, *options, *(named or REDUCED)]


def _run_tests(session: nox.Session, combination: Combination) -> None:
    _install(session, combination)
    session.run(
        "python", "-c", "import sys, websockets; print(sys.version, websockets.version.version)"
    )
    with_c, fallback = _pytest_args(list(session.posargs))
    session.log("C speedups (required)")
    session.run("python", "-m", "pytest", *with_c, env={"WS_MONITORING_REQUIRE_SPEEDUPS": "1"})
    session.log("pure-Python fallback")
    session.run("python", "-m", "pytest", *fallback, env={"WS_MONITORING_NO_SPEEDUPS": "1"})


def _register(combination: Combination) -> None:
    what = f"Python {combination.python}, websockets {combination.websockets}"
    if INTERPRETERS[combination.python]:

        def run(session: nox.Session) -> None:
            _run_tests(session, combination)

        run.__doc__ = what
        nox.session(name=combination.name, python=combination.python, tags=["matrix"])(run)
    else:
        reason = _missing_reason(combination.python)

        def missing(session: nox.Session) -> None:
            (session.error if IN_CI else session.skip)(reason)

        missing.__doc__ = f"{what}: interpreter missing"
        # No virtualenv (there is no interpreter to make one from); python kept for listings.
        nox.session(
            name=combination.name, python=combination.python, venv_backend="none", tags=["matrix"]
        )(missing)


for _combination in MATRIX:
    _register(_combination)


# --- the README table ---------------------------------------------------------------------

BEGIN = "<!-- supported-versions: begin (generated by `nox -s readme`; edit noxfile.py) -->"
END = "<!-- supported-versions: end -->"


def table() -> str:
    """The README's "Supported versions" table, from :data:`MATRIX`."""
    rows = [
        "| session | Python | websockets | other dependencies |",
        "|---|---|---|---|",
    ]
    for c in MATRIX:
        rows.append(f"| `{c.name}` | {c.python} | {c.websockets} | {c.others} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    """``readme`` with the text between the markers replaced by :func:`table`."""
    start, end = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return f"{readme[:start]}\n{table()}\n{readme[end:]}"


@nox.session(python=False, default=False)
def readme(session: nox.Session) -> None:
    """Rewrite the README's supported-versions table; ``-- --check`` only compares."""
    current = README.read_text()
    wanted = render(current)
    if "--check" in session.posargs:
        if current != wanted:
            session.error("README.md's supported-versions table is stale: run `nox -s readme`")
    elif current != wanted:
        README.write_text(wanted)
        session.log("README.md updated")
