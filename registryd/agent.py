"""A worker agent: register, heartbeat free VRAM, re-register, go offline.

For workers that are not LocalAI's (vLLM, SGLang, llama.cpp servers), as
`registryd agent`, or embedded in a Python worker:

    registry = await Registry.connect()
    agent = Agent(registry, "gpu-1", address="10.0.0.5:8000", vram=nvml_vram())
    task = asyncio.create_task(agent.run())
    ...
    agent.stop(); await task                   # the node is marked offline

The agent registers, then heartbeats every `interval` seconds on
`<prefix>.heartbeat.<node_id>` with the free VRAM its `VramSource` reads. It
sends the heartbeat as a request (every one by default, or one every
`confirm_every` seconds, publishing the others) so that it hears when the
registry no longer knows the node (deregistered by an admin, or the database
rebuilt) and registers again. Daemon and NATS restarts are ridden out:
nats-py reconnects for ever, and a request that finds no daemon, times out or
gets 503 is retried at the next heartbeat (registration with backoff). Other
errors (a wrong token or node key: 401; a bad field: 400) end `run` with the
error.

A worker that serves models names them (`models=`, `--model`): after every
registration the agent records each as a loaded replica (on its node's
own `replica_set.<id>`, state "loaded", at the worker's address or the
model's own), since a
registration clears the node's replicas (the registry takes it for a
restarted worker). Routers' `findlock` then finds them once the node is
healthy: approved by an admin, or at once with REGISTRY_AUTO_APPROVE. Going
offline clears them too, and a heartbeat brings an approved node back, so
every `replicas_check_every` seconds (60) the agent reads its own node and,
if it is healthy, records again each model it serves that has no replica row
at all. A replica that a scheduler set unloading or idle is left as it is,
with its routers' in-flight count.

`registryd agent` registers with a node key (contract v1.2) kept in a file,
`<REGISTRY_STATE_DIR>/agent/<name>.key` by default: `load_node_key` creates it
with a random key on the first start and returns the same key on every later
one. The first registration of the name binds the key, so no other host with
the registration token can take the name over.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import re
import secrets
import signal
import stat
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol
from urllib.parse import quote

from registryd.client import Registry
from registryd.errors import NoResponders, NotFound, RegistryError, Unavailable
from registryd.models import Node, OwnNode

log = logging.getLogger("registryd.agent")


# ---------------------------------------------------------------- free VRAM


@dataclass(frozen=True)
class Vram:
    """A reading: free and total VRAM in bytes (None: not known)."""

    available: int | None = None
    total: int | None = None


class VramSource(Protocol):
    """Where the agent reads free VRAM from, once per heartbeat."""

    description: str
    gpu_vendor: str | None

    async def read(self) -> Vram: ...

    def close(self) -> None: ...


class FixedVram:
    """Fixed figures (`--available-vram`, `--total-vram`), or none at all."""

    gpu_vendor: str | None = None

    def __init__(self, available: int | None = None, total: int | None = None) -> None:
        self.reading = Vram(available, total)
        self.description = "fixed figures" if available or total else "no VRAM figures"

    async def read(self) -> Vram:
        return self.reading

    def close(self) -> None:
        pass


class CommandVram:
    """A shell command that prints the free bytes (optionally then the total)."""

    gpu_vendor: str | None = None

    def __init__(self, command: str, total: int | None = None, timeout_s: float = 10.0) -> None:
        self.command = command
        self.total = total
        self.timeout_s = timeout_s
        self.description = f"the command {command!r}"

    async def read(self) -> Vram:
        proc = await asyncio.create_subprocess_shell(
            self.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a group of its own, so a timeout ends all of it
        )
        try:
            async with asyncio.timeout(self.timeout_s):
                out, err = await proc.communicate()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            log.warning("VRAM command %r took over %gs; no reading", self.command, self.timeout_s)
            return Vram(None, self.total)
        numbers = re.findall(rb"\d+", out)
        if proc.returncode != 0 or not numbers:
            detail = (err or out).decode(errors="replace").strip()[:200]
            log.warning(
                "VRAM command %r failed (exit %s): %s", self.command, proc.returncode, detail
            )
            return Vram(None, self.total)
        total = int(numbers[1]) if len(numbers) > 1 else self.total
        return Vram(int(numbers[0]), total)

    def close(self) -> None:
        pass


class NvmlVram:
    """Free and total VRAM of every NVIDIA GPU of this host, summed (NVML,
    through `pynvml` from the `nvidia-ml-py` package: the `nvml` extra)."""

    gpu_vendor: str | None = "nvidia"

    def __init__(self, nvml: ModuleType) -> None:
        self._nvml = nvml
        nvml.nvmlInit()
        self.devices = int(nvml.nvmlDeviceGetCount())
        self.description = f"NVML ({self.devices} GPU{'s' if self.devices != 1 else ''})"

    def _read(self) -> Vram:
        free = total = 0
        for index in range(self.devices):
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._nvml.nvmlDeviceGetHandleByIndex(index))
            free += int(info.free)
            total += int(info.total)
        return Vram(free, total)

    async def read(self) -> Vram:
        try:
            # NVML calls block (a GPU that fell off the bus can take seconds).
            return await asyncio.to_thread(self._read)
        except Exception as exc:
            log.warning("NVML could not read GPU memory: %s", exc)
            return Vram()

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvmlShutdown failed: %s", exc)


def nvml_vram() -> NvmlVram | None:
    """NVML when `pynvml` is installed and finds a driver; else None."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        return NvmlVram(pynvml)
    except Exception as exc:  # no driver, no GPU: NVMLError of some kind
        log.info("NVML not usable (%s); not reading VRAM from it", exc)
        return None


def vram_source(
    available: int | None = None, total: int | None = None, command: str | None = None
) -> VramSource:
    """What the agent reads: a command or fixed figures when given, else NVML
    when it works, else nothing (heartbeats then carry no VRAM figures)."""
    if command:
        return CommandVram(command, total)
    if available is not None or total is not None:
        return FixedVram(available, total)
    return nvml_vram() or FixedVram()


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def total_ram() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ---------------------------------------------------------------- the node key


NODE_KEY_LENGTHS = range(16, 257)  # what `register` accepts (contract v1.2)


class NodeKeyError(Exception):
    """A node key file that holds no usable key."""


def node_key_path(state_dir: Path, name: str) -> Path:
    """Where `registryd agent` keeps the key of the node `name` by default:
    `<state_dir>/agent/<name>.key`, the name escaped to one safe file name."""
    stem = quote(name, safe="-_.")
    if stem.startswith("."):  # no hidden files, no "." or ".."
        stem = "%2E" + stem[1:]
    if len(stem) > 200:  # a file name is at most 255 bytes
        stem = f"{stem[:100]}-{sha256(name.encode()).hexdigest()[:32]}"
    return state_dir / "agent" / f"{stem}.key"


def load_node_key(path: Path) -> str:
    """The node key in `path`; on the first start (no file yet) a random one
    (`secrets.token_urlsafe(32)`) is written there first, mode 0600.

    The key is written to a temporary file in the same directory and linked to
    `path` only if `path` does not exist, so `path` never holds half a key and
    two agents starting at once end up with the same one (the second link
    fails and both read the first). Raises OSError or NodeKeyError."""
    try:
        return _read_node_key(path)
    except FileNotFoundError:
        pass
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=directory)
    try:
        with os.fdopen(fd, "w") as out:  # mkstemp: mode 0600, whatever the umask
            out.write(key + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            log.info("another start created the node key in %s first; using it", path)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
            _create_exclusively(path, key)  # a file system without hard links
        else:
            _fsync_directory(directory)
            log.info("generated a node key in %s", path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return _read_node_key(path)


def _read_node_key(path: Path) -> str:
    with path.open() as file:
        mode = os.fstat(file.fileno()).st_mode
        key = file.read().strip()
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s can be read by other users (mode %o): chmod 600 it", path, mode & 0o777)
    if len(key) not in NODE_KEY_LENGTHS:
        raise NodeKeyError(f"{path} holds {len(key)} characters; a node key is 16-256 characters")
    return key


def _create_exclusively(path: Path, key: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
        out.flush()
        os.fsync(out.fileno())
    log.info("generated a node key in %s", path)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot sync a directory
        log.debug("fsync of %s failed: %s", directory, exc)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- served models


@dataclass(frozen=True)
class Served:
    """A model the worker serves, recorded as a loaded replica of its node."""

    model: str
    replica_index: int
    address: str


Models = Mapping[str, str | None] | Iterable[str | tuple[str, str | None]]
MAX_MODEL_NAME = 255  # what `replica_set` accepts
MAX_REPLICA_ADDRESS = 512


def served_models(models: Models | None, address: str | None) -> tuple[Served, ...]:
    """The replicas to record for `models`: names (served at `address`), or
    (name, address) pairs, or a mapping of name to address (None: `address`).
    A model named more than once (two servers of it) gets replica indexes 0,
    1, ... in the order given."""
    if models is None:
        return ()
    pairs = models.items() if isinstance(models, Mapping) else models
    served: list[Served] = []
    for item in pairs:
        model, at = (item, None) if isinstance(item, str) else item
        at = at or address
        if not 1 <= len(model) <= MAX_MODEL_NAME:
            raise ValueError(f"a model's name is 1-{MAX_MODEL_NAME} characters: {model!r}")
        if not at:
            raise ValueError(f"model {model!r} has no address: give the node's or its own")
        if len(at) > MAX_REPLICA_ADDRESS:
            raise ValueError(f"the address of {model!r} is over {MAX_REPLICA_ADDRESS} characters")
        index = sum(1 for s in served if s.model == model)
        served.append(Served(model, index, at))
    return tuple(served)


# ---------------------------------------------------------------- the agent


OWN_REPLICAS = 1000  # what registry.self.<id> names at most (API.md)


def missing_replicas(served: Sequence[Served], own: OwnNode) -> list[Served]:
    """What the worker serves that its node has no replica of, in any state.

    `own.replicas` names at most the first OWN_REPLICAS, by model (bytewise)
    and index: when it is full, a replica that would sort past its last one
    may be there unnamed, and is not taken for missing. A daemon older than
    the names (None) gives only its count of loaded replicas: fewer than
    served, and every one is recorded again."""
    if own.replicas is None:
        return list(served) if own.model_count < len(served) else []
    named = [(r.model_name, r.replica_index) for r in own.replicas]
    recorded = set(named)
    past = named[-1] if len(named) >= OWN_REPLICAS else None
    return [
        s
        for s in served
        if (s.model, s.replica_index) not in recorded
        and (past is None or (s.model, s.replica_index) < past)
    ]


class Backoff:
    """Waits that double from `first` to `cap`, with jitter so that a fleet
    does not retry in step after a daemon restart."""

    def __init__(self, first: float = 0.2, cap: float = 10.0) -> None:
        self.first = first
        self.cap = cap
        self._next = first

    def next(self) -> float:
        wait = self._next
        self._next = min(self._next * 2, self.cap)
        return wait * random.uniform(0.75, 1.25)

    def reset(self) -> None:
        self._next = self.first


class Outage:
    """Logs a failing call once when it starts failing and once when it works
    again, instead of at every attempt."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None

    def failed(self, exc: RegistryError) -> None:
        if self.since is None:
            self.since = time.monotonic()
            log.warning("%s failed: %s; retrying", self.what, exc.message)

    def ok(self) -> None:
        if self.since is not None:
            log.info("%s works again after %.0fs", self.what, time.monotonic() - self.since)
            self.since = None


class Agent:
    """Keeps one worker registered and heartbeating until `stop()`.

    `node_key` (16-256 characters) is sent with every registration, binding the
    name to it; None registers without one (v1). `load_node_key` reads (or
    first creates) one kept in a file.

    `models` are the models the worker serves (see `served_models`): after
    each registration they are recorded as loaded replicas, so that routers
    find them once the node is healthy. `registered` is set at the first
    registration, `serving` whenever all of them are recorded after the
    latest (cleared by each registration until then)."""

    def __init__(
        self,
        registry: Registry,
        name: str,
        *,
        address: str | None = None,
        http_address: str | None = None,
        node_type: Literal["backend", "agent"] | None = None,
        labels: Mapping[str, str] | None = None,
        token: str | None = None,
        node_key: str | None = None,
        gpu_vendor: str | None = None,
        max_replicas_per_model: int | None = None,
        vram: VramSource | None = None,
        models: Models | None = None,
        interval: float = 5.0,
        confirm_every: float | None = None,
        report_ram: bool = True,
        offline_within: float = 5.0,
        replicas_check_every: float = 60.0,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.registry = registry
        self.name = name
        self.vram = vram or FixedVram()
        self.models = served_models(models, address)
        self.interval = interval
        self.confirm_every = confirm_every
        self.report_ram = report_ram
        self.offline_within = offline_within
        self.replicas_check_every = replicas_check_every
        self._replicas_checked = float("-inf")
        self._own_replica_subject = True
        self._registration: dict[str, Any] = {
            "address": address,
            "http_address": http_address,
            "node_type": node_type,
            "labels": labels,
            "token": token,
            "node_key": node_key,
            "gpu_vendor": gpu_vendor or self.vram.gpu_vendor,
            "max_replicas_per_model": max_replicas_per_model,
        }
        self.node: Node | None = None
        self.registrations = 0  # how many times it registered (re-registrations too)
        self.confirmed = 0  # heartbeats the registry answered
        self.registered = asyncio.Event()
        self._stopping = asyncio.Event()
        self._last_confirmed = float("-inf")
        self._heartbeats = Outage("heartbeat")
        self._registering = Outage("registration")
        self._serving = Outage("recording the served models")
        self._unrecorded: list[Served] = []  # since the last registration
        self.serving = asyncio.Event()  # every served model recorded since then

    @property
    def node_id(self) -> str | None:
        return self.node.id if self.node is not None else None

    @property
    def heartbeats_failing(self) -> bool:
        """Whether the last heartbeat that asked for a reply got none (or a 503)."""
        return self._heartbeats.since is not None

    def stop(self) -> None:
        """Ask `run` to mark the node offline and return."""
        self._stopping.set()

    async def run(self) -> None:
        """Register and heartbeat until stop(); then mark the node offline."""
        try:
            while not self._stopping.is_set():
                if self.node is None:
                    await self._register()
                    continue
                if not self.serving.is_set():
                    await self._record_models()
                    if self.node is None:  # deregistered meanwhile: register again
                        continue
                await self._beat()
                if self.node is not None and self._replicas_due():
                    await self._check_replicas()
                if self.node is not None:  # else: forgotten, so register again now
                    await self._pause(self.interval)
        finally:
            if self.node is not None:
                await self._go_offline(self.node)
            self.vram.close()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on stop()."""
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            pass

    async def _register(self) -> None:
        backoff = Backoff(cap=max(self.interval, 1.0))
        while not self._stopping.is_set():
            reading = await self.vram.read()
            try:
                node = await self.registry.register(
                    self.name,
                    **self._registration,
                    total_vram=reading.total,
                    available_vram=reading.available,
                    total_ram=total_ram() if self.report_ram else None,
                    available_ram=available_ram() if self.report_ram else None,
                )
            except Unavailable as exc:
                self._registering.failed(exc)
                await self._pause(backoff.next())
                continue
            self._registering.ok()
            self.node = node
            self.registrations += 1
            self._last_confirmed = time.monotonic()  # registering counts as being known
            log.info("registered %s as node %s, %s", self.name, node.id, node.status)
            # The registration cleared the node's replicas: record them again.
            self._unrecorded = list(self.models)
            self._replicas_checked = time.monotonic()
            self.serving.clear()
            if node.status == "pending":
                log.info(
                    "%s waits for approval (registryd approve %s); routers pick its "
                    "replicas once it is healthy",
                    self.name,
                    self.name,
                )
            self.registered.set()
            return

    async def _record_models(self) -> None:
        """Record the served models not recorded since the last registration
        as loaded replicas. A 503 or no reply leaves the rest for the next
        heartbeat; a 404 (the node deregistered meanwhile) sets `node` to None."""
        assert self.node is not None
        while self._unrecorded and not self._stopping.is_set():
            served = self._unrecorded[0]
            try:
                await self._record(served)
            except NotFound:
                self._forgotten()
                return
            except Unavailable as exc:
                self._serving.failed(exc)
                return
            self._serving.ok()
            self._unrecorded.pop(0)
            log.info(
                "%s serves %s (replica %d) at %s",
                self.name,
                served.model,
                served.replica_index,
                served.address,
            )
        if not self._unrecorded:
            self.serving.set()

    async def _record(self, served: Served) -> None:
        """On the node's own subject (`<prefix>.replica_set.<id>`, which a NATS
        user confined to its node may publish); on the shared one for a
        daemon older than that subject. The shared one sets `in_flight` too,
        so the routers' count of a replica already there is read and written
        back, and a loaded one is left alone."""
        assert self.node is not None
        node_id, model, index = self.node.id, served.model, served.replica_index
        if self._own_replica_subject:
            try:
                await self.registry.replica_set_self(
                    node_id, model, index, state="loaded", address=served.address
                )
                return
            except NoResponders:
                self._own_replica_subject = False
        try:
            there = await self.registry.replica_get(node_id, model, index)
        except (NotFound, Unavailable):
            # None there; or no reply, as for a user allowed to write
            # replicas but not to read them: written as before, from zero.
            in_flight = 0
        else:
            if there.state == "loaded" and there.address == served.address:
                return
            in_flight = there.in_flight
        await self.registry.replica_set(
            node_id, model, index, state="loaded", address=served.address, in_flight=in_flight
        )

    def _replicas_due(self) -> bool:
        return (
            bool(self.models)
            and self.serving.is_set()
            and time.monotonic() - self._replicas_checked >= self.replicas_check_every
        )

    async def _check_replicas(self) -> None:
        """Record the served models again when the registry lost them while
        the node stayed registered: taken offline (by an admin, or by the
        sweep after a silence), which clears a node's replicas, and brought
        back by a later heartbeat, the node is healthy with nothing to route
        to. Its own node (`<prefix>.self.<id>`) says how many replicas it has."""
        assert self.node is not None
        self._replicas_checked = time.monotonic()
        try:
            own = await self.registry.own_node(self.node.id)
        except NotFound:
            self._forgotten()
            return
        except Unavailable:
            return  # asked again at the next check
        if own.status != "healthy":
            return
        missing = missing_replicas(self.models, own)
        if missing:
            log.warning(
                "node %s is healthy without %d of the %d replica(s) it serves (cleared while "
                "it was offline): %s; recording them again",
                self.name,
                len(missing),
                len(self.models),
                ", ".join(f"{s.model} (replica {s.replica_index})" for s in missing),
            )
            self._unrecorded = missing
            self.serving.clear()

    def _forgotten(self) -> None:
        """The registry answered 404 for our node: register again from scratch."""
        assert self.node is not None
        log.warning(
            "the registry does not know node %s (deregistered, or its database was "
            "rebuilt); registering %s again",
            self.node.id,
            self.name,
        )
        self.node = None

    async def _beat(self) -> None:
        assert self.node is not None
        reading = await self.vram.read()
        fields: dict[str, Any] = {
            "available_vram": reading.available,
            "total_vram": reading.total,
            "available_ram": available_ram() if self.report_ram else None,
        }
        now = time.monotonic()
        confirm = self.confirm_every is None or now - self._last_confirmed >= self.confirm_every
        try:
            await self.registry.heartbeat(self.node.id, **fields, wait=confirm)
        except NotFound:
            self._forgotten()
            return
        except Unavailable as exc:
            self._heartbeats.failed(exc)
            return
        if confirm:
            self._heartbeats.ok()
            self._last_confirmed = now
            self.confirmed += 1

    async def _go_offline(self, node: Node) -> None:
        """Mark the node offline on its own subject (`<prefix>.offline.<id>`;
        the shared `offline` for a daemon older than v1.2), retrying 503s for
        `offline_within` seconds at most."""
        backoff = Backoff(first=0.1, cap=1.0)
        deadline = time.monotonic() + self.offline_within
        own_subject = True
        while True:
            try:
                if own_subject:
                    await self.registry.offline_self(node.id)
                else:
                    await self.registry.offline(node.id)
                log.info("node %s (%s) marked offline", self.name, node.id)
                return
            except NoResponders as exc:
                if own_subject:
                    own_subject = False  # perhaps a daemon without per-node subjects
                    continue
                failure: RegistryError = exc
            except Unavailable as exc:
                failure = exc
            except RegistryError as exc:  # 404: deregistered meanwhile; nothing to mark
                log.warning("could not mark %s offline: %s", node.id, exc)
                return
            own_subject = True
            wait = min(backoff.next(), deadline - time.monotonic())
            if wait <= 0:
                log.warning("could not mark %s offline: %s", node.id, failure.message)
                return
            await asyncio.sleep(wait)


# ---------------------------------------------------------------- sizes


_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kib": 2**10,
    "kb": 10**3,
    "m": 2**20,
    "mib": 2**20,
    "mb": 10**6,
    "g": 2**30,
    "gib": 2**30,
    "gb": 10**9,
    "t": 2**40,
    "tib": 2**40,
    "tb": 10**12,
}


def parse_bytes(text: str) -> int:
    """A byte count: 25769803776, 24GiB, 24G (binary), 24GB (decimal), 1.5GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a byte count: {text!r} (e.g. 25769803776, 24GiB, 24GB)")
    return int(float(match.group(1)) * _UNITS[unit])
