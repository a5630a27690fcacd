from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from typing import Any

class Layout:
    def __init__(
        self,
        layout: Any,
        size_table: bytes,
        on_sent: Callable[[Any, bool, int], None] | None,
        message_sinks: bool = False,
        *,
        message_sink: object = None,
        keep_threshold: float | None = None,
        sink_failed: Callable[[object, str, BaseException], None] | None = None,
        not_sampled: object = None,
    ) -> None: ...

class Counts:
    in_text: int
    in_binary: int
    out_text: int
    out_binary: int
    in_bytes: int
    out_bytes: int
    handling_sum: float
    rtt_sum: float
    handling_start: float
    opened_at: float
    opened_unix: float
    closed_at: float
    ping_sent_at: float
    tokens: object
    token_deferred: bool
    sample_skip: int
    exemplar_trace_id: str | None
    @property
    def h(self) -> list[int] | None: ...
    def __init__(self, layout: Layout) -> None: ...
    def decode(self, frame: Any, *, max_size: int | None = None) -> Any: ...
    def encode(self, frame: Any) -> Any: ...
    def add_duration(self, duration: float) -> int: ...
    def add_rtt(self, rtt: float) -> None: ...
    def recv_started(self) -> None: ...
    def recv_done(self, message: Any) -> None: ...
    def timed(self, recv: Awaitable[Any]) -> Coroutine[Any, Any, Any]: ...

def sum_counts(
    records: Sequence[Counts], length: int
) -> tuple[int, int, int, int, int, int, float, float, list[int] | None]: ...

class RecvMethod:
    def __init__(self, recv: Callable[..., Awaitable[Any]], record_slot: object = None) -> None: ...
    def __get__(self, obj: object, owner: type | None = None) -> Callable[..., Awaitable[Any]]: ...
    def __call__(self, connection: Any, *args: Any, **kwargs: Any) -> Awaitable[Any]: ...

class Then:
    def __init__(
        self,
        inner: Awaitable[Any],
        tail: Callable[[Any, BaseException | None], Awaitable[Any]],
        arg: object,
        /,
    ) -> None: ...
    def __await__(self) -> Generator[Any, None, Any]: ...
    def send(self, value: Any) -> Any: ...
    def throw(self, *args: Any) -> Any: ...
    def close(self) -> None: ...
