"""prometheus_client multiprocess mode: two real workers on one port, one summed scrape."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import ClientConnection, connect

from tests.helpers.scrape import Samples, fetch, scrape
from tests.helpers.system import free_port
from ws_monitoring import start_metrics_server
from ws_monitoring.metrics.multiprocess import MultiprocessCollector, mark_process_dead

ROOT = Path(__file__).resolve().parents[2]


class Worker:
    def __init__(self, port: int, directory: Path) -> None:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory),
                   WS_MONITORING_MULTIPROC_FLUSH_SECONDS="0.1")  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.mp_worker", str(port)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), f"worker did not start: {line!r}"
        self.pid = self.proc.pid

    def stop(self) -> int:
        """SIGTERM, then the number of connections the worker says it served."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        return int(out.split()[-1])


@pytest.fixture
def multiproc_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "prom"
    directory.mkdir()
    return directory


@pytest.fixture
def workers(multiproc_dir: Path) -> Iterator[tuple[int, list[Worker]]]:
    port = free_port()
    started = [Worker(port, multiproc_dir), Worker(port, multiproc_dir)]
    yield port, started
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()


def wait_for(url: str, check: object, timeout: float = 10.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if check(samples):  # type: ignore[operator]
            return samples
        if time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


async def test_two_workers_sum_into_one_scrape(
    workers: tuple[int, list[Worker]], multiproc_dir: Path
) -> None:
    port, (first, second) = workers
    registry = CollectorRegistry()
    MultiprocessCollector(registry, path=str(multiproc_dir))
    with start_metrics_server(0, "127.0.0.1", registry=registry) as metrics:
        # Many short connections: the kernel spreads them over both workers.
        for _ in range(40):
            async with connect(f"ws://127.0.0.1:{port}/chat") as client:
                await client.send("ping")
                assert await client.recv() == "ping"
        # Keep 6 connections open to check the live gauge.
        held = [await connect(f"ws://127.0.0.1:{port}/chat") for _ in range(6)]

        def settled(s: Samples) -> bool:
            return (
                s.get("websocket_messages_total", route="/chat", direction="received", type="text")
                == 40
                and s.get("websocket_connections_active", route="/chat") == 6
            )

        samples = await asyncio.to_thread(wait_for, metrics.url, settled)
        labels = {"route": "/chat", "direction": "received", "type": "text"}
        assert samples["websocket_messages_total", labels] == 40
        assert samples["websocket_messages_total", {**labels, "direction": "sent"}] == 40
        assert samples["websocket_connections_total", {"route": "/chat"}] == 46
        assert samples["websocket_connections_active", {"route": "/chat"}] == 6
        size = {"route": "/chat", "direction": "received"}
        assert samples["websocket_message_size_bytes_count", size] == 40
        assert samples["websocket_message_size_bytes_sum", size] == 160
        assert samples["websocket_message_size_bytes_bucket", {**size, "le": "64.0"}] == 40
        assert samples["websocket_disconnections_total", {"route": "/chat", "code": "1000"}] == 40

        for client in held:
            await client.close()
        samples = await asyncio.to_thread(
            wait_for, metrics.url,
            lambda s: s.get("websocket_connections_active", route="/chat") == 0,
        )  # fmt: skip
        assert samples["websocket_connections_active", {"route": "/chat"}] == 0

        served = [first.stop(), second.stop()]
        # Both workers took part, so the scrape really is a sum over processes.
        assert sum(served) == 46
        assert min(served) > 0, served
        # Counters of exited workers persist: totals stay after both have gone.
        samples = scrape(metrics.url)
        assert samples["websocket_messages_total", labels] == 40


def room_active(count: float) -> Callable[[Samples], bool]:
    return lambda s: s.get("websocket_connections_active", route="/room") == count


def live_share(directory: Path, pid: int) -> float:
    """Worker ``pid``'s share of ``websocket_connections_active``, read from its own file."""
    path = directory / f"gauge_livesum_{pid}.db"
    if not path.exists():
        return 0.0  # no connection yet: the worker has no live gauge, hence no file
    return sum(
        sample.value
        for metric in MultiprocessCollector.merge([str(path)])  # type: ignore[no-untyped-call]
        for sample in metric.samples
        if sample.name == "websocket_connections_active"
    )


async def test_dead_worker_share_of_live_gauge_is_removed(
    workers: tuple[int, list[Worker]], multiproc_dir: Path
) -> None:
    port, (first, second) = workers
    registry = CollectorRegistry()
    MultiprocessCollector(registry, path=str(multiproc_dir))
    held: list[ClientConnection] = []
    with start_metrics_server(0, "127.0.0.1", registry=registry) as metrics:
        # The kernel spreads connections over both workers at random: open more until
        # each holds some, so that killing one leaves some alive, and some gone.
        while True:
            held += [await connect(f"ws://127.0.0.1:{port}/room") for _ in range(8)]
            opened = len(held)
            samples = await asyncio.to_thread(wait_for, metrics.url, room_active(opened))
            assert samples["websocket_connections_active", {"route": "/room"}] == opened
            # Every share is flushed (they sum to the total): each worker's file is whole.
            shares = [live_share(multiproc_dir, w.pid) for w in (first, second)]
            assert sum(shares) == opened, shares
            if min(shares) > 0 or len(held) >= 64:
                break
        assert min(shares) > 0, shares
        # A crashed worker cannot clean up after itself: its share stays until the
        # supervisor marks it dead.
        first.proc.kill()
        first.proc.wait()
        mark_process_dead(first.pid, str(multiproc_dir))
        alive = 0
        for client in held:
            try:
                await client.send("x")
                await asyncio.wait_for(client.recv(), 2)
                alive += 1
            except Exception:
                pass
        # Exactly the connections of the worker still running answer.
        assert alive == shares[1]
        samples = await asyncio.to_thread(wait_for, metrics.url, room_active(alive))
        assert samples["websocket_connections_active", {"route": "/room"}] == alive
    for client in held:
        await client.close()


async def test_a_scrape_passes_over_files_still_being_created(
    workers: tuple[int, list[Worker]], multiproc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default registry of start_metrics_server() in multiprocess mode, as users get it.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(multiproc_dir))
    port, _ = workers
    for _ in range(4):
        async with connect(f"ws://127.0.0.1:{port}/chat") as client:
            await client.send("ping")
            assert await client.recv() == "ping"
    held = [await connect(f"ws://127.0.0.1:{port}/chat") for _ in range(3)]
    labels = {"route": "/chat", "direction": "received", "type": "text"}

    def settled(s: Samples) -> bool:
        return (
            s.get("websocket_messages_total", **labels) == 4
            and s.get("websocket_connections_total", route="/chat") == 7
            and s.get("websocket_connections_active", route="/chat") == 3
        )

    with start_metrics_server(0, "127.0.0.1") as metrics:
        before = await asyncio.to_thread(wait_for, metrics.url, settled)
        assert settled(before), before.text
        # What a scrape meets while a worker creates its files: prometheus_client opens
        # the file (empty) before it sizes it, and writes its used-size header after.
        # A file cut short inside its last entry stands for one a crash left behind.
        real = sorted(multiproc_dir.glob("counter_*.db"))[0].read_bytes()
        used = int.from_bytes(real[:4], sys.byteorder)
        (multiproc_dir / "counter_4000001.db").write_bytes(real[: used - 10])
        (multiproc_dir / "histogram_4000002.db").write_bytes(b"")
        (multiproc_dir / "gauge_livesum_4000003.db").write_bytes(b"\x08\x00\x00")
        status, _, body = fetch(metrics.url)
        assert status == 200, body
        after = Samples(body)
        # Every value of the complete files, none from the incomplete ones.
        assert after.values == {
            **before.values,
            ("ws_monitoring_multiprocess_files_skipped_total", frozenset()): 3.0,
        }
        assert scrape(metrics.url)["ws_monitoring_multiprocess_files_skipped_total"] == 6
    for client in held:
        await client.close()
