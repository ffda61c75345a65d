"""A village link between the gateway and the reading center, emulated on loopback.

This kernel has no `netem`, so latency, jitter and loss are added here, in userspace: a TCP relay
that listens on 127.0.0.1 and forwards to the real peer. Each direction is one bottleneck shared
by every connection through the relay (a STAT ECG on a second association competes with the
routine transfers already on the wire, as it would on a real 4G link):

- rate: bytes leave the bottleneck at `rate_bps`, in arrival order across connections;
- latency: each chunk is delivered `rtt_s / 2` (+ jitter) after it left the bottleneck;
- loss: TCP does not lose bytes, it stalls — with probability `loss` per 1448-byte segment the
  bottleneck stalls for `stall_s` (≈ a retransmission timeout), holding everything behind it;
- backpressure: the relay reads from a sender only while the bottleneck queue holds less than
  `queue_bytes` (plus the bandwidth-delay product in flight), and its sockets have small buffers,
  so a sender cannot park megabytes in the relay and think them sent.

Profiles (`PROFILES`) follow the issue: lan, 4g (8 Mbit/s up, 60 ms), 3g (1 Mbit/s, 150 ms),
edge (200 kbit/s, 400 ms, stalls), satellite (1 Mbit/s, 650 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
from collections import deque
from dataclasses import dataclass, field

SEGMENT_BYTES = 1448  # TCP payload of one Ethernet-sized segment
SOCKET_BUFFER_BYTES = 32 * 1024  # the relay's own socket buffers: small, so backpressure is real
ADMITTED_KEPT = 4096  # chunks remembered for `Bottleneck.queued_s_at` (seconds of a fast link)


@dataclass(frozen=True)
class LinkProfile:
    name: str
    up_bps: float | None  # gateway → reading center; None: not limited
    down_bps: float | None  # reading center → gateway
    rtt_s: float
    jitter_s: float = 0.0  # extra one-way delay, uniform in [0, jitter_s)
    loss: float = 0.0  # probability per segment of a stall
    stall_s: float = 0.0  # how long a lost segment holds the link (retransmission timeout)
    queue_bytes: int = 64 * 1024  # bottleneck queue (a modem's buffer)

    def floor_s(self, up_bytes: int) -> float:
        """The least time `up_bytes` can take to cross this link (rate only, plus one RTT)."""
        return self.link_time_s(up_bytes) + self.rtt_s

    def link_time_s(self, up_bytes: int) -> float:
        """The uplink's time to carry `up_bytes` (its rate only; 0 without one)."""
        return up_bytes * 8 / self.up_bps if self.up_bps else 0.0

    def arrival_floor_s(self, up_bytes: int) -> float:
        """The least time from the first of `up_bytes` leaving to the last being at the far end
        (rate, plus the one-way delay): an object alone on the link, association open already."""
        return self.link_time_s(up_bytes) + self.rtt_s / 2


PROFILES: dict[str, LinkProfile] = {
    "lan": LinkProfile("lan", None, None, 0.0005),
    "4g": LinkProfile("4g", 8e6, 20e6, 0.060, jitter_s=0.005),
    "3g": LinkProfile("3g", 1e6, 2e6, 0.150, jitter_s=0.010),
    "edge": LinkProfile("edge", 200e3, 240e3, 0.400, jitter_s=0.030, loss=0.005, stall_s=1.0),
    "satellite": LinkProfile("satellite", 1e6, 4e6, 0.650, jitter_s=0.010),
}


@dataclass
class Bottleneck:
    """One direction of the link, shared by every connection through the relay."""

    rate_bps: float | None
    one_way_s: float
    jitter_s: float
    loss: float
    stall_s: float
    queue_bytes: int
    rng: random.Random
    free_at: float = 0.0  # when the link finishes sending what it has
    queued: int = 0  # bytes read from senders and not yet delivered
    bytes_total: int = 0
    first_at: float | None = None  # when the first byte reached the bottleneck (the loop's clock)
    busy_s: float = 0.0  # time spent sending (rate only): free_at - first_at - busy_s was idle
    stall_spans: list[tuple[float, float]] = field(default_factory=list)  # when a stall held the link
    # (arrival, free_at after it) of the last chunks: what the link held a moment ago (`queued_s_at`)
    admitted: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=ADMITTED_KEPT))
    room: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def stalls(self) -> int:
        return len(self.stall_spans)

    def stalled_s(self, start: float, end: float) -> float:
        """How long, between `start` and `end` (time.monotonic: the loop's clock), a stall held
        this link - also one that began before `start` (a routine segment's, holding the link when
        a STAT study came). (Its stalls follow one another: they never overlap.)"""
        return sum(max(0.0, min(end, b) - max(start, a)) for a, b in self.stall_spans)

    def queued_s_at(self, when: float) -> float:
        """How long the link still needed, at `when` (a moment ago, the loop's clock), to carry what
        it held then (a stall's rest included): for a STAT study made durable by another process,
        whose own bytes may have come since."""
        admitted = tuple(self.admitted)  # (one step under the GIL: the relay's thread appends)
        free_at = next((free_at for at, free_at in reversed(admitted) if at <= when), None)
        if free_at is None:
            if len(admitted) == ADMITTED_KEPT:
                raise ValueError(f"the link's history does not reach back to {when}")
            return 0.0  # nothing had come yet
        return max(0.0, free_at - when)

    @property
    def limit(self) -> int:
        bdp = int((self.rate_bps or 0) / 8 * self.one_way_s * 2)
        return self.queue_bytes + bdp

    def schedule(self, now: float, size: int) -> float:
        """When a chunk of `size` bytes arriving now leaves the far end of the link."""
        start = max(now, self.free_at)
        if self.first_at is None:
            self.first_at = start
        sending = size * 8 / self.rate_bps if self.rate_bps else 0.0
        self.busy_s += sending
        self.free_at = start + sending
        if self.loss:
            segments = max(1, -(-size // SEGMENT_BYTES))
            if self.rng.random() < 1 - (1 - self.loss) ** segments:
                self.stall_spans.append((self.free_at, self.free_at + self.stall_s))
                self.free_at += self.stall_s
        self.bytes_total += size
        self.admitted.append((now, self.free_at))
        return self.free_at + self.one_way_s + (self.rng.random() * self.jitter_s if self.jitter_s else 0.0)


class LinkRelay:
    """`with LinkRelay(PROFILES["4g"], "127.0.0.1", pacs_port) as relay:` then connect to
    `relay.port` instead of the peer. Runs its own asyncio loop on a thread."""

    def __init__(self, profile: LinkProfile, target_host: str, target_port: int, *, seed: int = 0) -> None:
        self.profile = profile
        self.target = (target_host, target_port)
        self.seed = seed
        self.port = 0
        self.connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self.up: Bottleneck | None = None
        self.down: Bottleneck | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> LinkRelay:
        self._thread = threading.Thread(target=self._run, name=f"link-{self.profile.name}", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("link relay did not start")
        return self

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> LinkRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stalls(self) -> int:
        return (self.up.stalls if self.up else 0) + (self.down.stalls if self.down else 0)

    # -- the loop -------------------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        p = self.profile
        rng = random.Random(self.seed)
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.up = Bottleneck(p.up_bps, p.rtt_s / 2, p.jitter_s, p.loss, p.stall_s, p.queue_bytes, rng)
        self.down = Bottleneck(p.down_bps, p.rtt_s / 2, p.jitter_s, p.loss, p.stall_s, p.queue_bytes, rng)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        listener.bind(("127.0.0.1", 0))
        server = await asyncio.start_server(self._serve, sock=listener)
        self.port = listener.getsockname()[1]
        self._started.set()
        async with server:
            await self._stop.wait()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            await self._relay(client_r, client_w)
        except asyncio.CancelledError:
            # the relay is closing with this connection open (asyncio.run cancels it); Python
            # 3.11's stream callback reports a cancelled connection task as an error, so it ends here
            client_w.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            peer = socket.create_connection(self.target, timeout=10)
        except OSError:
            client_w.close()
            return
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer.setblocking(False)
        peer_r, peer_w = await asyncio.open_connection(sock=peer)
        with contextlib.suppress(OSError):
            client_w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self.up is not None and self.down is not None
        await asyncio.gather(
            self._pipe(client_r, peer_w, self.up), self._pipe(peer_r, client_w, self.down), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: Bottleneck) -> None:
        loop = asyncio.get_running_loop()
        deliveries: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

        async def deliver() -> None:
            last = 0.0
            while True:
                at, data = await deliveries.get()
                at = max(at, last)  # one connection's bytes arrive in order, jitter or not
                last = at
                delay = at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if data is None:
                    with contextlib.suppress(OSError):
                        writer.close()
                    return
                try:
                    writer.write(data)
                    await writer.drain()
                except (OSError, ConnectionError):
                    return
                finally:
                    async with link.room:
                        link.queued -= len(data)
                        link.room.notify_all()

        deliverer = asyncio.create_task(deliver())
        try:
            while True:
                async with link.room:
                    await link.room.wait_for(lambda: link.queued < link.limit)
                try:
                    data = await reader.read(min(16 * 1024, max(SEGMENT_BYTES, link.limit - link.queued)))
                except (OSError, ConnectionError):
                    data = b""
                if not data:
                    deliveries.put_nowait((loop.time() + link.one_way_s, None))
                    break
                link.queued += len(data)
                deliveries.put_nowait((link.schedule(loop.time(), len(data)), data))
            await deliverer
        finally:
            if not deliverer.done():
                deliverer.cancel()
