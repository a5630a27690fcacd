"""Real OTLP receivers on loopback: OTLP/HTTP (protobuf) and OTLP/gRPC (grpcio).

Both decode each ``ExportTraceServiceRequest`` with ``opentelemetry-proto`` and keep
the spans as plain :class:`ReceivedSpan` values, so tests assert on what a collector
would actually store. The HTTP receiver can also misbehave on purpose: answer with
another status, answer late, or report a partial success.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gzip
import http.server
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from tests.helpers.servers import HOST

KINDS = {
    PbSpan.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    PbSpan.SPAN_KIND_INTERNAL: "INTERNAL",
    PbSpan.SPAN_KIND_SERVER: "SERVER",
    PbSpan.SPAN_KIND_CLIENT: "CLIENT",
    PbSpan.SPAN_KIND_PRODUCER: "PRODUCER",
    PbSpan.SPAN_KIND_CONSUMER: "CONSUMER",
}
STATUS = {0: "UNSET", 1: "OK", 2: "ERROR"}


def decode_value(value: AnyValue) -> Any:
    """A Python value from an OTLP ``AnyValue``."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [decode_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: decode_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def decode_attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: decode_value(kv.value) for kv in kvs}


@dataclasses.dataclass
class ReceivedSpan:
    """One span as the collector received it; ids in lowercase hex ("" when absent)."""

    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    trace_state: str
    start: int
    end: int
    flags: int
    attributes: dict[str, Any]
    events: list[tuple[str, int, dict[str, Any]]]
    links: list[tuple[str, str, dict[str, Any]]]
    status: str
    status_message: str
    resource: dict[str, Any]
    scope: str
    scope_version: str

    def text(self) -> str:
        """Everything exported about the span as one string (for leak assertions)."""
        return repr(dataclasses.asdict(self))


def decode_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for rs in request.resource_spans:
        resource = decode_attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(
                    ReceivedSpan(
                        name=s.name,
                        kind=KINDS[s.kind],
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        trace_state=s.trace_state,
                        start=s.start_time_unix_nano,
                        end=s.end_time_unix_nano,
                        flags=s.flags,
                        attributes=decode_attributes(s.attributes),
                        events=[
                            (e.name, e.time_unix_nano, decode_attributes(e.attributes))
                            for e in s.events
                        ],
                        links=[
                            (ln.trace_id.hex(), ln.span_id.hex(), decode_attributes(ln.attributes))
                            for ln in s.links
                        ],
                        status=STATUS[s.status.code],
                        status_message=s.status.message,
                        resource=resource,
                        scope=ss.scope.name,
                        scope_version=ss.scope.version,
                    )
                )
    return spans


class _Store:
    """Received requests and spans, shared by both receivers. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self.requests = 0
        self.headers: list[dict[str, str]] = []

    def add(self, spans: list[ReceivedSpan], headers: dict[str, str]) -> None:
        with self._lock:
            self._spans.extend(spans)
            self.requests += 1
            self.headers.append(headers)

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans if s.name == name]

    def wait(
        self,
        predicate: Callable[[list[ReceivedSpan]], bool] | int,
        timeout: float = 10.0,
    ) -> list[ReceivedSpan]:
        """Poll until ``predicate(spans)`` holds (an int: at least that many spans)."""
        check = (lambda spans: len(spans) >= predicate) if isinstance(predicate, int) else predicate
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans
            if check(spans):
                return spans
            if time.monotonic() > deadline:
                names = [s.name for s in spans]
                raise AssertionError(f"timed out waiting for spans; received {names}")
            time.sleep(0.01)


class OtlpHttpReceiver(_Store):
    """An OTLP/HTTP collector on ``127.0.0.1``: ``url`` is its base, ``traces_url`` the path.

    ``tls`` (certificate file, key file) serves HTTPS.

    ``status`` (200) is the HTTP status it answers, after those queued in ``statuses``
    (one per request); ``retry_after`` a ``Retry-After`` value sent with errors;
    ``delay`` seconds it waits before answering, ``rejected`` a partial-success count
    it reports, ``keep_alive`` whether connections stay open. ``attempts`` counts the
    requests.
    """

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.status = 200
        self.statuses: collections.deque[int] = collections.deque()
        self.retry_after: str | None = None
        #: False: answer with ``Connection: close``.
        self.keep_alive = True
        self.delay = 0.0
        self.rejected = 0
        self.attempts = 0
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                store.attempts += 1
                if store.delay:
                    time.sleep(store.delay)
                status = store.statuses.popleft() if store.statuses else store.status
                if status != 200:
                    self._answer(status, b"")
                    return
                encoding = self.headers.get("Content-Encoding")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                store.add(decode_request(request), {k.lower(): v for k, v in self.headers.items()})
                response = trace_service_pb2.ExportTraceServiceResponse()
                if store.rejected:
                    response.partial_success.rejected_spans = store.rejected
                    response.partial_success.error_message = "rejected by test"
                self._answer(200, response.SerializeToString())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                if status != 200 and store.retry_after is not None:
                    self.send_header("Retry-After", store.retry_after)
                if not store.keep_alive:
                    self.send_header("Connection", "close")
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://{HOST}:{self.port}"
        self.traces_url = f"{self.url}/v1/traces"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class OtlpGrpcReceiver(_Store):
    """An OTLP/gRPC collector on ``127.0.0.1`` (plaintext): ``url`` is ``http://host:port``."""

    def __init__(self) -> None:
        super().__init__()
        store = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                metadata = dict(context.invocation_metadata())
                store.add(decode_request(request), metadata)
                return trace_service_pb2.ExportTraceServiceResponse()

        import grpc

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        self.port = self._server.add_insecure_port(f"{HOST}:0")
        self._server.start()
        self.url = f"http://{HOST}:{self.port}"

    def close(self) -> None:
        self._server.stop(0).wait(5)


@contextlib.contextmanager
def http_receiver() -> Iterator[OtlpHttpReceiver]:
    """An :class:`OtlpHttpReceiver` for the duration of a ``with`` block."""
    receiver = OtlpHttpReceiver()
    try:
        yield receiver
    finally:
        receiver.close()


@contextlib.contextmanager
def grpc_receiver() -> Iterator[OtlpGrpcReceiver]:
    """An :class:`OtlpGrpcReceiver` for the duration of a ``with`` block."""
    receiver = OtlpGrpcReceiver()
    try:
        yield receiver
    finally:
        receiver.close()
