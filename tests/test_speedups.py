"""The C frame counter (``ws_monitoring/_speedups.c``) and its pure-Python fallback.

The rest of the suite runs against whichever implementation was imported (C whenever it
was built; ``make test`` requires it). Here: the fallback passes the core, adapter and
bad-input suites in a subprocess, both implementations count the same random frame
streams identically, and the C types reject misuse with clear errors.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from tests.helpers.servers import frame
from tests.test_core import conn_with_request, make_monitor, recv
from ws_monitoring import core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_speedups = pytest.mark.skipif(
    not core.SPEEDUPS, reason="ws_monitoring._speedups is not built here"
)


def test_the_implementation_follows_the_environment() -> None:
    """C when built, unless WS_MONITORING_NO_SPEEDUPS; make test requires the C one."""
    built = importlib.util.find_spec("ws_monitoring._speedups") is not None
    expected = built and not os.environ.get("WS_MONITORING_NO_SPEEDUPS")
    assert core.SPEEDUPS is expected
    base = core.ConnectionRecord.__mro__[1]
    assert base.__module__ == ("ws_monitoring._speedups" if expected else "ws_monitoring.core")
    # make test sets WS_MONITORING_REQUIRE_SPEEDUPS: the C counter cannot silently vanish.
    if os.environ.get("WS_MONITORING_REQUIRE_SPEEDUPS"):
        assert built


@pytest.mark.parametrize("required", [False, True])
def test_without_the_compiled_module(required: bool) -> None:
    """Where no C compiler built it: pure Python, or an ImportError when it is required."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WS_MONITORING_")}
    if required:
        env["WS_MONITORING_REQUIRE_SPEEDUPS"] = "1"
    code = (
        "import sys; sys.modules['ws_monitoring._speedups'] = None\n"
        "from ws_monitoring import core\n"
        "assert not core.SPEEDUPS and core.ConnectionRecord.__mro__[1] is core._Counts\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if required:
        assert result.returncode == 1
        # ModuleNotFoundError, an ImportError, names the missing module.
        assert "Error: import of ws_monitoring._speedups" in result.stderr
    else:
        assert result.returncode == 0, result.stderr


def test_pure_python_fallback_passes_the_suites() -> None:
    env = {**os.environ, "WS_MONITORING_NO_SPEEDUPS": "1"}
    env.pop("WS_MONITORING_REQUIRE_SPEEDUPS", None)
    suites = [
        "tests/test_core.py",
        "tests/test_hot_path.py",
        "tests/test_bad_input.py",
        "tests/adapters/test_asyncio.py",
        "tests/adapters/test_sync.py",
        "tests/test_speedups.py::test_the_implementation_follows_the_environment",
        "tests/test_speedups.py::test_column_sums_of_a_scrape",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


# -- both implementations on the same frames -------------------------------------------


def _python_counter(monitor: core.Monitor) -> tuple[object, object]:
    """A pure-Python record and frame counter, whatever the imported implementation."""

    class PyRecord(core._Counts):
        __slots__ = ("close_code", "ping_data", "ping_sent_at")
        _ping = core.ConnectionRecord._ping
        _pong = core.ConnectionRecord._pong
        _close_frame = core.ConnectionRecord._close_frame

        def __init__(self) -> None:
            super().__init__(monitor.layout)
            self.close_code = None
            self.ping_data = None
            self.ping_sent_at = 0.0

    record = PyRecord()
    return record, core._frame_counter_class(monitor)(record)


_OPS = [Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING, Opcode.PONG, Opcode.CLOSE]
_frames = st.lists(
    st.tuples(
        st.sampled_from(_OPS),
        st.binary(max_size=300),
        st.booleans(),  # fin
        st.booleans(),  # rsv1
        st.booleans(),  # received (decode) or sent (encode)
    ),
    max_size=40,
)
_FIELDS = ("in_text", "in_binary", "out_text", "out_binary", "in_bytes", "out_bytes", "h")


@needs_speedups
@settings(max_examples=200, deadline=None)
@given(_frames)
def test_c_and_python_count_the_same(frames: list[tuple[Opcode, bytes, bool, bool, bool]]) -> None:
    monitor = make_monitor(size_buckets=(4.0, 64.0, 100.0), rtt_buckets=(1.0,))
    c_record = core.ConnectionRecord(monitor)
    py_record, py_counter = _python_counter(monitor)
    for op, data, fin, rsv1, received in frames:
        f = Frame(op, data, fin=fin, rsv1=rsv1)
        if received:
            assert c_record.decode(f, max_size=None) is f
            assert py_counter.decode(f, max_size=None) is f  # type: ignore[attr-defined]
        else:
            assert c_record.encode(f) is f
            assert py_counter.encode(f) is f  # type: ignore[attr-defined]
    for name in _FIELDS:
        assert getattr(c_record, name) == getattr(py_record, name), name
    assert c_record.close_code == py_record.close_code  # type: ignore[attr-defined]
    assert c_record.ping_data == py_record.ping_data  # type: ignore[attr-defined]


@needs_speedups
def test_durations_and_rtts_fall_in_the_same_buckets() -> None:
    monitor = make_monitor(duration_buckets=(0.001, 0.01, 0.1), rtt_buckets=(0.05, 0.5))
    c_record = core.ConnectionRecord(monitor)
    py_record, _ = _python_counter(monitor)
    for value in (0.0, 0.001, 0.0010001, 0.05, 0.1, 0.5, 7.0):
        assert c_record.add_duration(value) == py_record.add_duration(value)  # type: ignore[attr-defined]
        c_record.add_rtt(value)
        py_record.add_rtt(value)  # type: ignore[attr-defined]
    assert c_record.h == py_record.h  # type: ignore[attr-defined]
    assert c_record.handling_sum == pytest.approx(py_record.handling_sum)  # type: ignore[attr-defined]
    assert c_record.rtt_sum == pytest.approx(py_record.rtt_sum)  # type: ignore[attr-defined]


# -- the C types against misuse ------------------------------------------------------------


@needs_speedups
def test_c_types_reject_misuse() -> None:
    from ws_monitoring import _speedups

    monitor = make_monitor()
    record = core.ConnectionRecord(monitor)
    with pytest.raises(TypeError, match="one positional"):
        record.decode()  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        record.decode(object())
    with pytest.raises(AttributeError):
        record.encode(object())
    with pytest.raises(TypeError):
        record.add_duration("slow")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _speedups.Counts(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_sent"):
        _speedups.Layout(monitor.layout, b"", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="out of range"):
        _speedups.Layout(monitor.layout, b"\xff", None)

    class Shifted:
        size_bounds = duration_bounds = rtt_bounds = (1.0,)
        size_out, duration, rtt, length = 2, 4, 6, 9  # length should be 8

    with pytest.raises(ValueError, match="offsets"):
        _speedups.Layout(Shifted(), b"", None)

    class Empty(Shifted):
        size_bounds = ()

    with pytest.raises(ValueError, match="at least one"):
        _speedups.Layout(Empty(), b"", None)


@needs_speedups
def test_a_failing_send_sink_does_not_break_sending(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        wants_sent_messages = True

        def message_started(self, *args: object) -> None:
            return None

        def message_finished(self, *args: object) -> None:
            return None

        def message_sent(self, *args: object) -> None:
            raise RuntimeError("sink bug")

        def handshake_finished(self, *args: object) -> None:
            return None

        connection_opened = handler_failed = connection_closed = shutdown = handshake_finished

    monitor = make_monitor([Broken()])  # type: ignore[list-item]
    conn = conn_with_request()
    record = monitor.open(conn)
    conn.protocol.send_text(b"hello")
    recv(conn, frame(0x1, b"in"))
    assert (record.out_text, record.in_text) == (1, 1)
    failed = [
        r
        for r in caplog.records
        if r.getMessage() == "ws_monitoring sink Broken.message_sent failed"
    ]
    assert len(failed) == 1
    assert failed[0].exc_info is not None


def test_column_sums_of_a_scrape() -> None:
    monitor = make_monitor(size_buckets=(4.0, 64.0), duration_buckets=(0.01,), rtt_buckets=(1.0,))
    length = monitor.layout.length
    records = [core.ConnectionRecord(monitor) for _ in range(3)]
    assert core.sum_counts(records, length) == (0, 0, 0, 0, 0, 0, 0.0, 0.0, None)
    first, third = monitor.frame_counter(records[0]), monitor.frame_counter(records[2])
    first.decode(Frame(Opcode.TEXT, b"abc"))
    records[0].add_duration(0.5)
    third.encode(Frame(Opcode.BINARY, b"x" * 100))
    third.decode(Frame(Opcode.BINARY, b"x" * 10))
    sums = core.sum_counts(records, length)
    assert sums[:6] == (1, 1, 0, 1, 13, 100)
    assert sums[6] == 0.5
    assert sums[8] == [a + b for a, b in zip(records[0].h or [], records[2].h or [], strict=True)]
    assert core.sum_counts(records, length) == core._sum_counts(records, length)


@needs_speedups
def test_c_column_sums_reject_misuse() -> None:
    from ws_monitoring import _speedups

    monitor = make_monitor()
    record = core.ConnectionRecord(monitor)
    record.add_duration(0.1)
    with pytest.raises(TypeError, match="not a Counts"):
        _speedups.sum_counts([object()], monitor.layout.length)
    with pytest.raises(ValueError, match="another histogram layout"):
        _speedups.sum_counts([record], monitor.layout.length + 1)
    with pytest.raises(ValueError):
        _speedups.sum_counts([record], -1)
    with pytest.raises(TypeError):
        _speedups.sum_counts(42, 3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _speedups.sum_counts([record])  # type: ignore[call-arg]


# -- the timed recv() awaitable, driven by hand --------------------------------------------


class _Future:
    """Something to yield, as an asyncio future does while it waits."""

    def __await__(self):  # type: ignore[no-untyped-def]
        return (yield self)


def _timed_record() -> core.ConnectionRecord:
    return core.ConnectionRecord(make_monitor())


@needs_speedups
def test_timed_recv_passes_values_and_results_through() -> None:
    record = _timed_record()

    async def inner() -> str:
        got = await _Future()
        return f"message {got}"

    timed = record.timed(inner())
    assert isinstance(timed.__await__(), type(timed))
    assert isinstance(next(timed), _Future)
    with pytest.raises(StopIteration) as stop:
        timed.send("x")
    assert stop.value.value == "message x"
    assert record.handling_start > 0
    # Reusing a finished recv() is an error, as reusing a coroutine is.
    with pytest.raises(RuntimeError, match="reuse"):
        timed.send(None)
    with pytest.raises(ValueError, match="late"):
        timed.throw(ValueError("late"))
    assert timed.close() is None
    # The next recv() ends the handling of this message: one duration counted.
    record.timed(inner()).close()
    assert record.handling_start == 0.0
    assert sum((record.h or [])[monitor_duration_slice(record)]) == 1


def monitor_duration_slice(record: core.ConnectionRecord) -> slice:
    layout = record.monitor.layout
    return slice(layout.duration, layout.rtt)


@needs_speedups
def test_timed_recv_throw_close_and_tuple_results() -> None:
    record = _timed_record()

    async def catches() -> tuple[str, str]:
        try:
            await _Future()
        except KeyError:
            return ("caught", "it")
        raise AssertionError("not reached")

    timed = record.timed(catches())
    next(timed)
    with pytest.raises(StopIteration) as stop:
        timed.throw(KeyError("k"))
    assert stop.value.value == ("caught", "it")

    async def waits_again() -> str:
        try:
            await _Future()
        except KeyError:
            await _Future()
        return "done"

    timed = record.timed(waits_again())
    next(timed)
    assert isinstance(timed.throw(KeyError("k")), _Future)
    with pytest.raises(StopIteration):
        timed.send(None)

    async def raises() -> str:
        await _Future()
        raise OSError("gone")

    timed = record.timed(raises())
    next(timed)
    with pytest.raises(OSError, match="gone"):
        timed.send(None)

    async def returns_none() -> None:
        await _Future()

    timed = record.timed(returns_none())
    next(timed)
    with pytest.raises(StopIteration) as stop:
        next(timed)
    assert stop.value.value is None

    closed = []

    async def cleans_up() -> str:
        try:
            await _Future()
        finally:
            closed.append(True)
        return "unreachable"

    timed = record.timed(cleans_up())
    next(timed)
    timed.close()
    assert closed == [True]


# -- RecvMethod: recv() of the connection classes serve() makes ------------------------------


@needs_speedups
def test_recv_method_passes_arguments_through_and_looks_like_recv() -> None:
    from ws_monitoring import _speedups

    class Connection:
        __slots__ = ("_ws_monitoring_record", "calls")

        async def recv(self, decode: bool | None = None) -> str:
            """websockets' recv, as far as this test is concerned."""
            self.calls.append(decode)
            return "message"

    base_recv = Connection.recv

    class Instrumented(Connection):
        __slots__ = ()
        recv = _speedups.RecvMethod(base_recv)  # type: ignore[assignment]

    assert Instrumented.recv.__name__ == "recv"  # type: ignore[attr-defined]
    assert Instrumented.recv.__doc__ == base_recv.__doc__
    assert Instrumented.recv.__wrapped__ is base_recv  # type: ignore[attr-defined]
    connection = Instrumented()
    connection.calls = []
    record = connection._ws_monitoring_record = _timed_record()
    timed = connection.recv(decode=False)
    with pytest.raises(StopIteration) as stop:
        timed.send(None)
    assert stop.value.value == "message"
    assert connection.calls == [False]
    assert record.handling_start > 0
    # Bad arguments: websockets' own error, before anything is timed.
    with pytest.raises(TypeError, match="positional"):
        connection.recv(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="needs its connection"):
        Instrumented.recv()  # type: ignore[call-arg]
    connection._ws_monitoring_record = object()  # type: ignore[assignment]
    with pytest.raises(TypeError, match="not a connection record"):
        connection.recv()
    del connection._ws_monitoring_record
    with pytest.raises(AttributeError):
        connection.recv()
    with pytest.raises(TypeError, match="recv function"):
        _speedups.RecvMethod(42)  # type: ignore[arg-type]


@needs_speedups
def test_recv_method_reads_the_record_slot_it_was_given() -> None:
    from ws_monitoring import _speedups

    class Connection:
        __slots__ = ("_ws_monitoring_record", "other")

        async def recv(self, decode: bool | None = None) -> str:
            return "message"

    class Instrumented(Connection):
        __slots__ = ()

    Instrumented.recv = _speedups.RecvMethod(  # type: ignore[method-assign]
        Connection.recv, record_slot=Connection.__dict__["_ws_monitoring_record"]
    )
    connection = Instrumented()
    record = connection._ws_monitoring_record = _timed_record()
    with pytest.raises(StopIteration):
        connection.recv().send(None)
    assert record.handling_start > 0
    del connection._ws_monitoring_record
    with pytest.raises(AttributeError, match="_ws_monitoring_record"):
        connection.recv()
    # Not an instance of the slot's class: the attribute is looked up as usual.
    other = type("Other", (), {"_ws_monitoring_record": record})()
    with pytest.raises(StopIteration):
        Instrumented.recv(other).send(None)  # type: ignore[arg-type]
    for wrong in (Connection.__dict__["other"], Connection.recv, 42):
        with pytest.raises(TypeError, match="record_slot"):
            _speedups.RecvMethod(Connection.recv, record_slot=wrong)


@needs_speedups
def test_a_done_recv_awaitable_nobody_holds_is_reused() -> None:
    """One allocation per connection, not per message; one still held is never reused."""

    async def message(text: str) -> str:
        return text

    record = _timed_record()
    first = record.timed(message("a"))
    with pytest.raises(StopIteration):
        first.send(None)
    first_id = id(first)
    del first
    second = record.timed(message("b"))
    assert id(second) == first_id  # the same object, handed out again
    with pytest.raises(StopIteration) as stop:
        second.send(None)
    assert stop.value.value == "b"
    third = record.timed(message("c"))  # ``second`` is still held: a new one
    assert third is not second
    with pytest.raises(RuntimeError, match="already awaited"):
        second.send(None)
    with pytest.raises(StopIteration):
        third.send(None)
    # A done awaitable keeps no reference to its record: an idle record is no cycle.
    import gc

    assert record not in gc.get_referents(third)


def test_monitors_and_records_are_collected() -> None:
    """The C layout refers back to its monitor (on_sent): the cycle must be collectable."""
    import gc
    import weakref

    from tests.test_core import Recorder

    monitor = make_monitor([Recorder()])
    conn = conn_with_request()
    record = monitor.open(conn)
    recv(conn, frame(0x1, b"hello"))
    record.message_handed("hello")
    refs = [weakref.ref(monitor), weakref.ref(record)]
    del monitor, record, conn
    gc.collect()
    assert [ref() for ref in refs] == [None, None]
