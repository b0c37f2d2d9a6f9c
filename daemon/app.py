"""The daemon's lifecycle, as phases.

Start: settings → PostgreSQL pool (schema applied) → NATS (reconnecting for
ever) → the `registry` service → background tasks → READY=1.
Stop (first SIGTERM/SIGINT): STOPPING=1 → stop taking requests and let those in
progress finish → stop background tasks → drain NATS → close the pool → exit 0.
A second signal while stopping exits at once. A background task that dies
unexpectedly stops the daemon with a non-zero exit code, so systemd restarts it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping

import nats
import nats.js.errors
from nats.aio.client import Client as NATS

from daemon import __version__
from daemon.delivery import Delivery
from daemon.nats_reads import enlarge_reads
from daemon.sdnotify import Notifier
from daemon.service import RegistryService
from daemon.sweep import Sweep
from infra import db, tasks
from infra.config import Settings, nats_options
from infra.errors import Unavailable
from infra.events import Events
from infra.heartbeats import Heartbeats
from infra.intent_stream import IntentStore
from infra.retry import retrying
from infra.wire import error_reply
from subjects import nodes, routing
from subjects.base import Context

log = logging.getLogger("registryd")

# How long in-flight requests may take to finish after SIGTERM. systemd's
# TimeoutStopSec (90 s by default) must stay above it.
STOP_GRACE = 30.0


class Daemon:
    def __init__(self, settings: Settings, env: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.notifier = Notifier(env if env is not None else os.environ)
        self.db: db.Database | None = None
        self.nc: NATS | None = None
        # Published heartbeats arrive on a connection of their own: a flood of
        # them, beyond what we take in, backs up there (and at worst gets that
        # connection cut off by nats-server), not in front of routers' requests.
        self.heartbeat_nc: NATS | None = None
        # The intent stream (JetStream) and the requests that deliver intents
        # to workers use a third, which never answers a request: the one that
        # does needs no JetStream rights at all (systemd/nats-server.conf).
        self.intents_nc: NATS | None = None
        self.service: RegistryService | None = None
        self.delivery: Delivery | None = None
        self.sweep: Sweep | None = None
        self.heartbeats: Heartbeats | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._failure: str | None = None

    # ------------------------------------------------------------ start

    async def start(self) -> None:
        s = self.settings
        log.info("registryd %s starting", __version__)
        self.db = await db.connect(s)
        log.info("database ready, schema applied")
        self.nc = await connect_nats(s)
        self.heartbeat_nc = await connect_nats(s, "heartbeats")
        self.intents_nc = await connect_nats(s, "intents")
        events = Events(self.nc, s.subject_prefix)
        intents = IntentStore(self.intents_nc, s)
        await ensure_stream(intents)
        self.heartbeats = Heartbeats(
            functools.partial(nodes.write_heartbeats, self.db), limit=s.heartbeat_buffer
        )
        ctx = Context(
            settings=s,
            db=self.db,
            events=events,
            intents=intents,
            heartbeats=self.heartbeats,
            batches=routing.Batches(self.db),
            payload_limit=functools.partial(payload_limit, self.nc),
        )
        self.service = RegistryService(self.nc, ctx, heartbeat_nc=self.heartbeat_nc)
        self._spawn("heartbeat-writer", self.heartbeats.run)
        await self.service.start()
        self.sweep = Sweep(s, self.db, events, intents)
        self._spawn("health-sweep", self.sweep.run)
        self.delivery = Delivery(self.intents_nc, s, self.db, intents, events)
        self._spawn("intent-delivery", self.delivery.run)
        if self.notifier.watchdog_interval:
            self._spawn("watchdog", self._watchdog)
        log.info(
            "serving %s.* on %s",
            s.subject_prefix,
            self.nc.connected_url.netloc if self.nc.connected_url else s.nats_url,
        )
        self.notifier.ready(f"serving {s.subject_prefix}.*")

    def _spawn(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.create_task(loop(), name=name)
        self._tasks[name] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stop.is_set():
            return
        exc = task.exception()
        self._failure = f"background task {task.get_name()} ended: {exc!r}"
        log.error(self._failure, exc_info=exc)
        self._stop.set()

    async def _watchdog(self) -> None:
        # Pinged only while the loop runs and our connections are usable: a
        # wedged loop or a closed pool stops the pings and systemd restarts us.
        # A NATS or database outage does not: restarting would not end it.
        assert self.notifier.watchdog_interval
        while True:
            connections = (self.nc, self.heartbeat_nc, self.intents_nc)
            if (
                all(nc is not None and not nc.is_closed for nc in connections)
                and self.db is not None
                and not self.db.pool.is_closing()
            ):
                self.notifier.watchdog()
            await asyncio.sleep(self.notifier.watchdog_interval)

    # ------------------------------------------------------------ run / stop

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    @property
    def failure(self) -> str | None:
        return self._failure

    async def stop(self, grace: float = STOP_GRACE) -> None:
        self._stop.set()
        self.notifier.stopping()
        log.info("stopping: finishing requests in progress")
        if self.service is not None:
            await self.service.stop(grace)
        await tasks.cancel(self._tasks.values())
        if self.delivery is not None:
            await self.delivery.stop()
        if self.heartbeats is not None:
            await self.heartbeats.flush(wait=self.settings.db_timeout)
        for nc in (self.heartbeat_nc, self.intents_nc, self.nc):
            if nc is not None and not nc.is_closed:
                try:
                    await nc.drain()
                except Exception as exc:
                    log.warning("NATS drain failed (%s); closing", exc)
                    await nc.close()
        if self.db is not None:
            await self.db.close()
        log.info("stopped")


def payload_limit(nc: NATS) -> int:
    return nc.max_payload or 1024 * 1024


async def run(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT; the exit code for the process."""
    daemon = Daemon(settings)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    stopping = False

    def on_signal(signum: int) -> None:
        nonlocal stopping
        if stopping:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        stopping = True
        log.info("%s received", signal.Signals(signum).name)
        daemon.request_stop()

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    starting = asyncio.create_task(daemon.start())
    waiting = asyncio.create_task(daemon.wait())
    done, _ = await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if starting not in done:  # a signal while we were still connecting
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await daemon.stop()
        return 0
    starting.result()  # start-up failures propagate to the entry point
    await waiting
    await daemon.stop()
    return 1 if daemon.failure else 0


# ---------------------------------------------------------------- NATS


async def ensure_stream(intents: IntentStore) -> None:
    """Create or update the intent stream, waiting while JetStream is not there."""
    await retrying(
        intents.ensure_stream,
        retry_on=(
            nats.errors.TimeoutError,
            nats.js.errors.ServiceUnavailableError,
            nats.errors.NoRespondersError,
        ),
        log=log,
        what="JetStream not available",
    )


class Drops:
    """Messages nats-py dropped because a subscription's queue was full.

    nats-py reports every one of them. Under an overload that would mean a log
    line per message, which costs the CPU we are short of; instead the first
    drop is logged, and then a count per subject every `every` seconds while
    drops go on. A dropped request is answered 503, so its sender hears at once
    rather than waiting out its timeout.
    """

    def __init__(self, every: float = 10.0) -> None:
        self._every = every
        self._counts: dict[str, int] = {}
        self._flush: asyncio.TimerHandle | None = None

    def note(self, subject: str) -> None:
        if self._flush is None:
            log.warning("NATS: dropping messages on %s: more than the daemon can take in", subject)
            self._flush = asyncio.get_running_loop().call_later(self._every, self._report)
        else:
            self._counts[subject] = self._counts.get(subject, 0) + 1

    def _report(self) -> None:
        if not self._counts:
            self._flush = None  # quiet for a whole period: the next drop is news
            return
        counts = ", ".join(f"{n:,} on {subject}" for subject, n in self._counts.items())
        log.warning("NATS: dropped in the last %.0fs: %s", self._every, counts)
        self._counts.clear()
        self._flush = asyncio.get_running_loop().call_later(self._every, self._report)


async def connect_nats(s: Settings, purpose: str = "") -> NATS:
    """A connection that reconnects for ever; `purpose` names a second one in logs."""
    drops = Drops()
    which = f"NATS ({purpose})" if purpose else "NATS"

    async def disconnected() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("%s connection lost; reconnecting", which)

    async def reconnected() -> None:
        where = nc.connected_url.netloc if nc.connected_url else "?"
        log.info("%s reconnected to %s", which, where)

    async def error(exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            drops.note(exc.sub.subject if exc.sub else exc.subject)
            if exc.reply and exc.reply.startswith(s.reply_prefix_list):
                body, headers = error_reply(Unavailable("the registry is overloaded; retry later"))
                await nc.publish(exc.reply, body, headers=headers)
            return
        log.warning("NATS: %s", exc or type(exc).__name__)

    async def closed() -> None:
        log.info("%s connection closed", which)

    nc: NATS

    enlarge_reads()

    async def attempt() -> NATS:
        nonlocal nc
        options = nats_options(s, intents=purpose == "intents")
        if purpose:
            options["name"] += f" ({purpose})"
        nc = await nats.connect(
            **options,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            connect_timeout=5,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
            closed_cb=closed,
            # Reconnecting, keep up to 64 MiB of replies and events to send.
            pending_size=64 * 1024 * 1024,
        )
        return nc

    return await retrying(
        attempt,
        retry_on=(OSError, TimeoutError, nats.errors.NoServersError),
        log=log,
        what=f"{which} not reachable",
    )
