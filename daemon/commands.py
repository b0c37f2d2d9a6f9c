"""The `registryd` subcommands built on the client: the worker agent, and the
admin commands for people.

daemon/cli.py adds them to its parser (`add`) and hands them their parsed
arguments and settings (`run`). Exit codes are those of `registryd call`: 0
done, 1 an error reply or no registry reachable, 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.protocol.parser import PERMISSIONS_ERR

from daemon import logs
from infra.config import Settings, add_flags, nats_options
from registryd import admin
from registryd.admin import STATUSES
from registryd.agent import (
    Agent,
    NodeKeyError,
    load_node_key,
    node_key_path,
    parse_bytes,
    served_models,
    vram_source,
)
from registryd.client import Registry
from registryd.errors import NoResponders, RegistryError, Unauthorized

log = logging.getLogger("registryd.agent")

EXIT_ERROR = 1


# ---------------------------------------------------------------- argument types


def _bytes(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _model(text: str) -> tuple[str, str | None]:
    name, sep, address = text.partition("=")
    if not name or (sep and not address):
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=HOST:PORT, got {text!r}")
    return name, address or None


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


# ---------------------------------------------------------------- the parser


# The settings a client of the daemon uses (call, why, the admin commands):
# how to reach NATS, the subject prefix, logging, and the state directory
# where a daemon started with --embedded leaves its NATS URL. The daemon's
# others (database, stream, sweeps, ...) are not its business.
CLIENT_SETTINGS = (
    "nats_url",
    "nats_creds",
    "nats_nkey",
    "nats_user",
    "nats_password",
    "nats_token",
    "nats_tls_ca",
    "nats_tls_cert",
    "nats_tls_key",
    "subject_prefix",
    "log_format",
    "log_level",
    "state_dir",
)
# An agent also registers, with the registration token; its node key lives
# in the state directory.
AGENT_SETTINGS = (*CLIENT_SETTINGS, "registration_token")


def client_flags() -> argparse.ArgumentParser:
    """A parent parser with the flags of CLIENT_SETTINGS."""
    parent = argparse.ArgumentParser(add_help=False)
    add_flags(parent, CLIENT_SETTINGS)
    return parent


def add(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the client's subcommands to `registryd`'s subparsers; `common`
    holds the flags of CLIENT_SETTINGS."""
    agent_settings = argparse.ArgumentParser(add_help=False)
    add_flags(agent_settings, AGENT_SETTINGS)
    agent = commands.add_parser(
        "agent",
        parents=[agent_settings],
        help="register this worker and heartbeat its free VRAM until stopped",
        description="Register a worker (vLLM, SGLang, llama.cpp server, ...) with the "
        "registry, heartbeat its free VRAM every --interval, register it again when the "
        "registry forgets it, and mark it offline on SIGTERM/SIGINT. Free VRAM comes from "
        "--vram-command or --available-vram when given, else from NVML when nvidia-ml-py "
        "is installed (pip install 'registryd[nvml]'). Each --model is recorded as a "
        "loaded replica after every registration, for routers to find once the node is "
        "approved.",
    )
    agent.add_argument("--name", default=socket.gethostname(), help="node name (the host name)")
    agent.add_argument("--address", help="host:port of the worker's server (backend nodes)")
    agent.add_argument("--http-address", help="host:port of the worker's HTTP API")
    agent.add_argument(
        "--model",
        type=_model,
        action="append",
        default=[],
        metavar="NAME[=HOST:PORT]",
        help="a model the worker serves, at --address or at HOST:PORT (repeatable)",
    )
    agent.add_argument("--node-type", choices=("backend", "agent"), help="backend by default")
    agent.add_argument(
        "--label", type=_pair, action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    agent.add_argument("--token", help="registration token (default REGISTRY_REGISTRATION_TOKEN)")
    keys = agent.add_mutually_exclusive_group()
    keys.add_argument(
        "--node-key-file",
        type=Path,
        metavar="PATH",
        help="file holding this node's key, 16-256 characters, created with a random key "
        "if absent (default: REGISTRY_STATE_DIR/agent/NAME.key)",
    )
    keys.add_argument(
        "--no-node-key",
        action="store_true",
        help="register without a node key (v1), e.g. for a name bound elsewhere",
    )
    agent.add_argument("--gpu-vendor", help="nvidia, amd, ... (nvidia with NVML)")
    agent.add_argument("--max-replicas", type=int, help="replicas per model this node can host")
    agent.add_argument("--interval", type=_seconds, default=5.0, help="heartbeat period (5 s)")
    agent.add_argument(
        "--confirm-every",
        type=_seconds,
        help="seconds between heartbeats sent as requests, the others being published "
        "(default: every heartbeat is a request)",
    )
    agent.add_argument("--available-vram", type=_bytes, metavar="BYTES", help="e.g. 20GiB")
    agent.add_argument("--total-vram", type=_bytes, metavar="BYTES", help="e.g. 24GiB")
    agent.add_argument(
        "--vram-command", metavar="COMMAND", help="shell command printing the free bytes"
    )

    def admin_parser(name: str, summary: str, description: str = "") -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(
            name,
            parents=[common],
            help=summary,
            description=(description or summary)
            + ". Exit 0 done, 1 an error reply (e.g. 404) or no registry reachable, 2 bad usage.",
        )
        sub.add_argument("--json", action="store_true", help="machine output: JSON")
        sub.add_argument("--timeout", type=_seconds, default=10.0, help="seconds per request (10)")
        return sub

    listed = admin_parser(
        "nodes",
        "list the nodes: status, VRAM, replicas, in flight, heartbeat, labels",
        "One row per node, by name (every page of registry.list)",
    )
    listed.add_argument(
        "--status", action="append", default=[], choices=STATUSES, help="only these (repeatable)"
    )
    listed.add_argument(
        "--label",
        type=_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only nodes with this label (repeatable: all of them)",
    )
    one = admin_parser("node", "everything about one node: fields, labels, replicas, intents")
    one.add_argument("node", metavar="NAME|ID")
    admin_parser("models", "each model loaded on a healthy node: replicas, nodes, in flight")
    queued = admin_parser("intents", "queued backend intents")
    queued.add_argument("--dead", action="store_true", help="abandoned intents too")
    for action, summary in (
        ("approve", "approve a pending node: it becomes healthy and takes work"),
        ("drain", "drain a node: no new work, its replicas cleared"),
        ("deregister", "remove a node, its replicas and labels"),
    ):
        admin_parser(action, summary).add_argument("node", metavar="NAME|ID")
    for name, summary in (
        ("status", "the service at a glance: instances, nodes, replicas, intents"),
        ("metrics", "the same figures as Prometheus text, for node_exporter's textfile collector"),
    ):
        sub = admin_parser(name, summary)
        sub.add_argument(
            "--wait",
            type=_seconds,
            default=0.5,
            help="seconds to gather the instances' $SRV.STATS replies (0.5)",
        )
        if name == "metrics":
            sub.add_argument(
                "--output", metavar="FILE", help="write FILE atomically instead of stdout (*.prom)"
            )


ADMIN = (
    "nodes",
    "node",
    "models",
    "intents",
    "approve",
    "drain",
    "deregister",
    "status",
    "metrics",
)
NAMES = ("agent", *ADMIN)


def run(
    command: str, args: argparse.Namespace, settings: Settings, explicit: Mapping[str, Any]
) -> int:
    """Run one of the subcommands in NAMES; its exit code."""
    if command == "agent":
        logs.setup(settings.log_format, settings.log_level)
        return asyncio.run(agent_main(embedded_daemon(settings, explicit), args))
    if command in ADMIN:
        return asyncio.run(admin_main(command, args, settings, explicit))
    raise ValueError(f"not a client command: {command}")


# ---------------------------------------------------------------- admin commands


async def admin_main(
    command: str, args: argparse.Namespace, settings: Settings, explicit: Mapping[str, Any]
) -> int:
    out = sys.stdout
    try:
        async with connection(settings, dict(explicit)) as nc:
            registry = Registry(nc, settings.subject_prefix, timeout=args.timeout)
            return await _admin(command, args, registry, settings, out)
    except Unanswered as exc:
        print(f"registryd: {exc}", file=sys.stderr)
        return EXIT_ERROR


async def _admin(
    command: str, args: argparse.Namespace, registry: Registry, settings: Settings, out: Any
) -> int:
    try:
        if command == "nodes":
            return await admin.nodes(
                registry, out, statuses=args.status, labels=args.label, as_json=args.json
            )
        if command == "node":
            return await admin.node(registry, out, args.node, as_json=args.json)
        if command == "models":
            return await admin.models(registry, out, as_json=args.json)
        if command == "intents":
            return await admin.intents(registry, out, dead=args.dead, as_json=args.json)
        if command in ("approve", "drain", "deregister"):
            return await admin.change(registry, out, command, args.node, as_json=args.json)
        if command == "status":
            return await admin.status(registry, out, window_s=args.wait, as_json=args.json)
        if command == "metrics":
            return await admin.metrics(registry, out, window_s=args.wait, output=args.output)
        raise ValueError(command)
    except NoResponders:
        print(f"registryd: no registryd is serving {settings.subject_prefix}.*", file=sys.stderr)
        return EXIT_ERROR
    except RegistryError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_ERROR


class Unanswered(Exception):
    """A request that got no reply: NATS unreachable, nobody serving, or too slow."""


def embedded_daemon(settings: Settings, explicit: Mapping[str, Any]) -> Settings:
    """With no NATS URL given, a daemon started with --embedded from this
    directory is the one the user means (daemon.embedded.found)."""
    from daemon.embedded import found

    return settings if "nats_url" in explicit else found(settings)


@contextlib.asynccontextmanager
async def connection(settings: Settings, explicit: dict[str, Any]) -> AsyncIterator[NATS]:
    """A NATS connection for one command (`call`, `why`), with the daemon's settings:
    no reconnecting, two tries per server, and a daemon started with --embedded
    from this directory when no NATS URL is given."""
    settings = embedded_daemon(settings, explicit)
    last_error: list[Exception] = []

    async def connect_error(exc: Exception) -> None:
        # nats-py's default prints a traceback for every failed attempt.
        last_error[:] = [exc]

    try:
        # allow_reconnect=False does not bound the first connect: nats-py
        # retries each server max_reconnect_attempts times (60, 2 s apart, by
        # default) before it gives up. Two tries per server, then the error.
        nc = await nats.connect(
            **nats_options(settings),
            allow_reconnect=False,
            connect_timeout=5,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.5,
            error_cb=connect_error,
        )
    except Exception as exc:
        reason = last_error[0] if last_error else exc
        detail = str(reason) or type(reason).__name__
        raise Unanswered(f"cannot reach NATS at {settings.nats_url}: {detail}") from None
    try:
        yield nc
    finally:
        await nc.close()


# ---------------------------------------------------------------- registryd agent


async def agent_main(settings: Settings, args: argparse.Namespace) -> int:
    token = args.token
    if token is None and settings.registration_token is not None:
        token = settings.registration_token.get_secret_value()
    node_key: str | None = None
    key_file: Path | None = None
    if not args.no_node_key:
        key_file = args.node_key_file or node_key_path(settings.state_dir, args.name)
        try:
            node_key = load_node_key(key_file)
        except (OSError, NodeKeyError) as exc:
            log.error("cannot read or create the node key in %s: %s", key_file, exc)
            return 2
        log.info("node key of %s from %s", args.name, key_file.absolute())
    homeless = [model for model, address in args.model if address is None]
    if homeless and not args.address:
        model = homeless[0]
        log.error("--model %s needs --address, or its own: --model %s=HOST:PORT", model, model)
        return 2
    try:
        served_models(args.model, args.address)
    except ValueError as exc:
        log.error("--model: %s", exc)
        return 2
    vram = vram_source(args.available_vram, args.total_vram, args.vram_command)
    log.info("agent for %s: free VRAM from %s", args.name, vram.description)

    stop = asyncio.Event()
    signals: list[int] = []

    def on_signal(signum: int) -> None:
        if signals:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        signals.append(signum)
        log.info("%s received; stopping", signal.Signals(signum).name)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    connecting = asyncio.create_task(_connect(settings, args.name))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({connecting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():  # stopped before NATS was ever reached
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            vram.close()
            return 0
        registry = connecting.result()
        agent = Agent(
            registry,
            args.name,
            address=args.address,
            http_address=args.http_address,
            node_type=args.node_type,
            labels=dict(args.label) or None,
            token=token,
            node_key=node_key,
            gpu_vendor=args.gpu_vendor,
            max_replicas_per_model=args.max_replicas,
            vram=vram,
            models=args.model,
            interval=args.interval,
            confirm_every=args.confirm_every,
        )
        running = asyncio.create_task(agent.run(), name="agent")
        await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
        agent.stop()
        try:
            await running
        except RegistryError as exc:
            log.error("the registry refused %s: %s", args.name, exc)
            if isinstance(exc, Unauthorized) and "node key" in exc.message:
                if key_file is None:
                    log.error(
                        "%s is bound to a node key and --no-node-key sends none: give the "
                        "node's key with --node-key-file",
                        args.name,
                    )
                else:
                    log.error(
                        "%s is bound to a node key other than the one in %s. If this host "
                        "is that node and lost its key, an admin unbinds it with: registryd "
                        'call node_key_reset \'{"node_id":"<id>"}\' (the id: registryd node '
                        "%s); the next start then binds this key",
                        args.name,
                        key_file.absolute(),
                        args.name,
                    )
            return EXIT_ERROR
        finally:
            # nats-py raises from close() when the server went away meanwhile.
            with contextlib.suppress(ConnectionError):
                await registry.close()
        return 0
    finally:
        stopped.cancel()


async def _connect(settings: Settings, name: str) -> Registry:
    """A connection that waits for NATS and reconnects for ever, logging each
    loss and recovery once."""
    nc_state: dict[str, bool] = {"up": False}
    connected: list[Registry] = []

    async def disconnected() -> None:
        closing = connected and (connected[0].nc.is_closed or connected[0].nc.is_draining)
        if nc_state["up"] and not closing:
            nc_state["up"] = False
            nc_state["told"] = True  # no "not reachable" line for its retries
            log.warning("NATS connection lost; reconnecting")

    async def reconnected() -> None:
        nc_state["up"] = True
        nc_state["told"] = False
        log.info("NATS reconnected")

    refused: set[str] = set()

    async def error(exc: Exception) -> None:
        # A publish the agent's NATS user may not make (say registry.replica_set
        # for --model) gets no reply: say why, once per subject.
        if PERMISSIONS_ERR in str(exc).lower():
            if str(exc) not in refused:
                refused.add(str(exc))
                log.warning("NATS refused: %s (the agent's NATS user lacks that right)", exc)
            return
        # nats-py reports every failed attempt: log the first of an outage.
        if nc_state["up"] or nc_state.get("told"):
            log.debug("NATS: %s", exc or type(exc).__name__)
            return
        nc_state["told"] = True
        log.warning("NATS not reachable yet (%s); retrying", exc or type(exc).__name__)

    registry = await Registry.connect(
        settings,
        name=f"registryd agent {name}",
        request_timeout=5.0,
        reconnect_time_wait=1,
        connect_timeout=5,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
    )
    nc_state["up"] = True
    connected.append(registry)
    return registry
