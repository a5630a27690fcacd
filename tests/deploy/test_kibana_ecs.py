"""The Kibana data view and the Loki trace link name fields the ECS formatter really emits.

A real instrumented server logs through ``setup_logging(fmt="ecs")``: a normal
connection, a handler crash, a rejected handshake and a record made inside a span.
Every field the shipped Kibana objects name must appear in those lines.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.http11 import Request, Response

import ws_monitoring
from tests.deploy import stack
from ws_monitoring.logging.setup import setup_logging

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331


def flatten(document: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted names of the non-null leaves (what Elasticsearch indexes as fields)."""
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten(value, f"{name}.")
        elif value is not None:
            yield name


def kuery_fields(query: str) -> set[str]:
    return set(re.findall(r"([\w@.]+)\s*:", query))


def named_fields() -> set[str]:
    """Every field the shipped saved objects refer to."""
    names: set[str] = set()
    for line in stack.KIBANA_FILE.read_text().splitlines():
        obj = json.loads(line)
        attributes = obj["attributes"]
        if obj["type"] == "index-pattern":
            names.add(attributes["timeFieldName"])
            names |= set(json.loads(attributes["fieldAttrs"]))
            names |= set(json.loads(attributes["fieldFormatMap"]))
            names |= {field["name"] for field in json.loads(attributes["fields"])}
        elif obj["type"] == "search":
            names |= set(attributes["columns"])
            names |= {field for field, _ in attributes["sort"]}
            source = json.loads(attributes["kibanaSavedObjectMeta"]["searchSourceJSON"])
            names |= kuery_fields(source["query"]["query"])
    return names


async def handler(ws: ServerConnection) -> None:
    async for message in ws:
        if message == "crash":
            raise RuntimeError("kibana test: crash")
        if message == "traced":
            context = SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1))
            with trace.use_span(NonRecordingSpan(context)):
                logging.getLogger("ws_monitoring.app").info("work inside a span")
        await ws.send(message)


def reject_missing(ws: ServerConnection, request: Request) -> Response | None:
    return ws.respond(404, "Not Found\n") if request.path == "/missing" else None


@pytest.fixture
async def ecs_lines(registry: CollectorRegistry) -> list[str]:
    """The ECS lines a real server wrote, as written."""
    stream = io.StringIO()
    setup = setup_logging("INFO", fmt="ecs", stream=stream, background=False, service_name="demo")
    try:
        async with ws_monitoring.serve(
            handler,
            "127.0.0.1",
            0,
            registry=registry,
            routes=["/echo"],
            tracing=False,
            process_request=reject_missing,
        ) as server:
            base = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            async with connect(f"{base}/echo") as client:
                await client.send("traced")
                assert await client.recv() == "traced"
            async with connect(f"{base}/echo") as client:
                await client.send("crash")
                with pytest.raises(ConnectionClosedError):
                    await client.recv()
            with pytest.raises(InvalidStatus):
                async with connect(f"{base}/missing"):
                    pass
    finally:
        setup.close()
    return stream.getvalue().splitlines()


@pytest.fixture
def ecs_documents(ecs_lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ecs_lines]


async def test_data_view_fields_are_emitted(ecs_documents: list[dict[str, Any]]) -> None:
    emitted = {name for document in ecs_documents for name in flatten(document)}
    actions = {doc.get("event", {}).get("action") for doc in ecs_documents}
    assert {"connection_opened", "connection_closed", "handler_crashed"} <= actions
    assert "handshake_rejected" in actions
    named = named_fields()
    assert len(named) >= 15
    missing = named - emitted
    assert not missing, f"Kibana objects name fields the ECS formatter never emits: {missing}"


async def test_kibana_error_search_matches_real_error_lines(
    ecs_documents: list[dict[str, Any]],
) -> None:
    # The saved search's KQL: log.level : "error" or websocket.error_type : *
    errors = [
        doc
        for doc in ecs_documents
        if doc["log"]["level"] == "error" or doc.get("websocket", {}).get("error_type")
    ]
    assert {doc.get("event", {}).get("action") for doc in errors} == {
        "handler_crashed",
        "connection_closed",
    }
    crash = next(doc for doc in errors if doc["event"]["action"] == "handler_crashed")
    assert crash["error"]["type"] == "RuntimeError"
    assert crash["websocket"]["route"] == "/echo"


async def test_loki_trace_link_matches_real_ecs_lines(ecs_lines: list[str]) -> None:
    sources = stack.load_yaml(
        stack.DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml"
    )["datasources"]
    loki = next(source for source in sources if source["type"] == "loki")
    pattern = re.compile(loki["jsonData"]["derivedFields"][0]["matcherRegex"])
    traced = [line for line in ecs_lines if json.loads(line)["message"] == "work inside a span"]
    assert len(traced) == 1
    # The logs panel filters lines on the connection id and the trace id as text.
    assert json.loads(traced[0])["websocket"]["connection_id"] in traced[0]
    match = pattern.search(traced[0])
    assert match is not None
    assert match.group(1) == f"{TRACE_ID:032x}"
    assert [line for line in ecs_lines if pattern.search(line)] == traced
