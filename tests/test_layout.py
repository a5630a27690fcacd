"""The package's shape: data flows one way, and every documented import path works.

The import graph is read from the source (every import statement, including those in
functions and under ``TYPE_CHECKING``), so a cycle that Python's lazy imports would
hide at run time still fails here.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
from collections.abc import Iterator

import pytest

import ws_monitoring

PACKAGE = pathlib.Path(ws_monitoring.__file__).parent

#: Modules that import no adapter and no sink (``core`` calls sinks only through typing's
#: Protocols).
LEAVES = {"core", "config", "labels", "privacy", "typing", "_speedups"}
#: Sink subpackages: each may import the leaves and itself, never another sink or an adapter.
SINKS = {"metrics", "tracing", "logging", "alerting"}
ADAPTERS = {"adapters"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    # A C extension's stub stands for it (``_speedups.pyi``).
    for path in [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.pyi")]:
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(name: str) -> Iterator[tuple[str, bool]]:
    """(imported ws_monitoring module, under TYPE_CHECKING) for each import in ``name``."""
    path = MODULES[name]
    if path.suffix == ".pyi":
        return
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # ``from package import submodule`` imports the submodule.
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "ws_monitoring" and target != name:
                while target not in MODULES:  # ``import ws_monitoring.x.Name``
                    target = target.rpartition(".")[0]
                yield target, _in_type_checking(node, parents)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for target, type_only in _imports(name):
            # typing.py holds Protocols only and may name concrete classes for the
            # type checker; every other TYPE_CHECKING import counts as an edge.
            if type_only and name == "ws_monitoring.typing":
                continue
            graph[name].add(target)
    return graph


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_graph_is_read_from_every_module() -> None:
    graph = _graph()
    assert {"ws_monitoring.core", "ws_monitoring.adapters.asyncio"} <= graph.keys()
    # Function-level and TYPE_CHECKING imports are seen.
    assert "ws_monitoring.metrics.sink" in graph["ws_monitoring.adapters.instrument"]
    assert "ws_monitoring.core" in graph["ws_monitoring.tracing.sink"]


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def _forbidden(source: str, target: str) -> bool:
    src, dst = _component(source), _component(target)
    if src == dst:
        return False
    if src in LEAVES:
        return dst not in LEAVES
    if src in SINKS:
        return dst not in LEAVES
    if src in ADAPTERS:
        return dst not in LEAVES | SINKS
    return False


def test_sinks_and_leaves_import_no_adapter_and_no_other_sink() -> None:
    graph = _graph()
    bad = sorted((s, t) for s, targets in graph.items() for t in targets if _forbidden(s, t))
    assert bad == []


@pytest.mark.parametrize(
    ("source", "target", "forbidden"),
    [
        ("ws_monitoring.metrics.server", "ws_monitoring.alerting.sink", True),
        ("ws_monitoring.privacy", "ws_monitoring.adapters.asyncio", True),
        ("ws_monitoring.core", "ws_monitoring.metrics.sink", True),
        ("ws_monitoring.tracing.sink", "ws_monitoring.privacy", False),
        ("ws_monitoring.adapters.instrument", "ws_monitoring.tracing.setup", False),
        ("ws_monitoring.tracing.sink", "ws_monitoring.tracing.export", False),
    ],
)
def test_the_rules_catch_what_they_should(source: str, target: str, forbidden: bool) -> None:
    assert _forbidden(source, target) is forbidden


#: Every import path the README or the seed documents, and what it must be.
DOCUMENTED = [
    ("ws_monitoring", "serve", "ws_monitoring.adapters.instrument"),
    ("ws_monitoring", "serve_sync", "ws_monitoring.adapters.instrument"),
    ("ws_monitoring", "instrument", "ws_monitoring.adapters.instrument"),
    ("ws_monitoring", "start_metrics_server", "ws_monitoring.metrics.server"),
    ("ws_monitoring.metrics", "start_metrics_server", "ws_monitoring.metrics.server"),
    (
        "ws_monitoring.metrics.multiprocess",
        "mark_process_dead",
        "ws_monitoring.metrics.multiprocess",
    ),
    (
        "ws_monitoring.metrics.multiprocess",
        "MultiprocessCollector",
        "ws_monitoring.metrics.multiprocess",
    ),
    ("ws_monitoring", "setup_logging", "ws_monitoring.logging.setup"),
    ("ws_monitoring.logging", "setup_logging", "ws_monitoring.logging.setup"),
    ("ws_monitoring.logging_config", "setup_logging", "ws_monitoring.logging.setup"),
    ("ws_monitoring", "setup_tracing", "ws_monitoring.tracing.setup"),
    ("ws_monitoring.tracing", "setup_tracing", "ws_monitoring.tracing.setup"),
    ("ws_monitoring.opentelemetry_tracing", "setup_tracing", "ws_monitoring.tracing.setup"),
    ("ws_monitoring", "SentryAlerter", "ws_monitoring.alerting.sentry"),
    ("ws_monitoring.alerting", "SentryAlerter", "ws_monitoring.alerting.sentry"),
    ("ws_monitoring", "PrometheusAlerter", "ws_monitoring.alerting.alertmanager"),
    ("ws_monitoring.alerting", "PrometheusAlerter", "ws_monitoring.alerting.alertmanager"),
    ("ws_monitoring", "watch_server", "ws_monitoring.alerting.watchdog"),
    ("ws_monitoring", "grant", "ws_monitoring.consent"),
    ("ws_monitoring", "withdraw_user", "ws_monitoring.consent"),
    ("ws_monitoring", "Consent", "ws_monitoring.privacy"),
    ("ws_monitoring", "Config", "ws_monitoring.config"),
]


@pytest.mark.parametrize(("module", "name", "home"), DOCUMENTED)
def test_documented_import_paths(module: str, name: str, home: str) -> None:
    value = getattr(importlib.import_module(module), name)
    assert value is getattr(importlib.import_module(home), name)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("ws_monitoring", "tracer"),
        ("ws_monitoring.tracing", "tracer"),
        ("ws_monitoring.opentelemetry_tracing", "tracer"),
    ],
)
def test_the_tracer_is_one_object(module: str, name: str) -> None:
    from ws_monitoring.tracing.setup import tracer

    assert getattr(importlib.import_module(module), name) is tracer


def test_public_surface() -> None:
    for name in ws_monitoring.__all__:
        assert getattr(ws_monitoring, name) is not None
    for internal in ("ServerWatchdog", "WebsocketsIntegration", "fire_all"):
        assert internal not in ws_monitoring.__all__
        with pytest.raises(AttributeError):
            getattr(ws_monitoring, internal)


@pytest.mark.parametrize(
    "module", ["ws_monitoring.alerting", "ws_monitoring.tracing", "ws_monitoring.logging"]
)
def test_lazy_packages_refuse_unknown_names(module: str) -> None:
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = importlib.import_module(module).nope
