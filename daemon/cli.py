"""The `registryd` command: serve (default), migrate, call, --version."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import orjson
from pydantic import SecretStr

from daemon import __version__, config, logs

log = logging.getLogger("registryd")

EXIT_BAD_SETTING = 2


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    config.add_flags(common)

    top = argparse.ArgumentParser(
        prog="registryd",
        description="Node and replica registry for distributed LLM inference, over NATS.",
        parents=[common],
    )
    top.add_argument("--version", action="version", version=f"registryd {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", parents=[common], help="serve requests (the default)")
    commands.add_parser("migrate", parents=[common], help="apply schema.sql and exit")
    call = commands.add_parser(
        "call",
        parents=[common],
        help="send one request and print the reply",
        description="Send one request to registry.OP and print the JSON reply "
        '(exit 0) or the error (exit 1). Example: registryd call get \'{"name":"gpu-1"}\'',
    )
    call.add_argument("op", help="operation, e.g. list, register, heartbeat.<node_id>")
    call.add_argument("body", nargs="?", default="{}", help="JSON request body ('-' for stdin)")
    call.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (10)")
    # The worker agent and the admin commands, built on the Python client.
    from registryd import commands as client_commands

    client_commands.add(commands, common)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k in config.FIELDS}
    try:
        settings = config.load(flags)
    except config.SettingError as exc:
        print(f"registryd: invalid setting {exc}", file=sys.stderr)
        return EXIT_BAD_SETTING
    command = args.command or "serve"
    from registryd import commands as client_commands

    if command in client_commands.NAMES:
        return client_commands.run(command, args, settings, flags)
    if command == "call":
        return asyncio.run(call(settings, args.op, args.body, args.timeout, explicit=flags))
    logs.setup(settings.log_format, settings.log_level)
    _use_uvloop()
    try:
        if command == "migrate":
            return asyncio.run(migrate(settings))
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        log.error("registryd could not start: %s", exc, exc_info=settings.log_level == "debug")
        return 1


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(settings: config.Settings) -> int:
    from daemon import app, embedded

    if not settings.embedded:
        return await app.run(settings)
    # Starting the servers takes a while (initdb on first use) and cannot be
    # cut short: a SIGINT/SIGTERM meanwhile would otherwise leave nats-server
    # running, orphaned. So note the signal, let them come up, stop them, exit.
    # app.run installs its own handlers in place of these.
    interrupted: list[signal.Signals] = []
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, interrupted.append, sig)
    servers = await asyncio.to_thread(embedded.start, settings.state_dir)
    if interrupted:
        log.info("%s received while starting; stopping", interrupted[0].name)
        await asyncio.to_thread(servers.stop)
        return 0
    try:
        settings = settings.model_copy(
            update={"nats_url": servers.nats.url, "database_url": SecretStr(servers.postgres.url)}
        )
        print(
            f"registryd (embedded) on {servers.nats.url}. Try, from another shell in this "
            "directory:\n  registryd call register "
            '\'{"name":"gpu-1","address":"10.0.0.5:50051"}\'\n  registryd call list',
            file=sys.stderr,
        )
        return await app.run(settings)
    finally:
        await asyncio.to_thread(servers.stop)


async def migrate(settings: config.Settings) -> int:
    from daemon import db

    database = await db.connect(settings, wait=False)
    await database.close()
    log.info("schema applied")
    return 0


async def call(
    settings: config.Settings, op: str, body: str, wait_s: float, *, explicit: dict[str, Any]
) -> int:
    import nats
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from daemon.app import nats_options
    from daemon.embedded import running_nats_url
    from daemon.service import ERROR_CODE_HEADER, ERROR_HEADER

    if body == "-":
        body = sys.stdin.read()
    # With no NATS URL given, a daemon started with --embedded from this
    # directory is the one the user means.
    if "nats_url" not in explicit and "REGISTRY_NATS_URL" not in os.environ:
        url = running_nats_url(settings.state_dir)
        if url:
            settings = settings.model_copy(update={"nats_url": url})
    subject = f"{settings.subject_prefix}.{op}"
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
        print(f"registryd: cannot reach NATS at {settings.nats_url}: {detail}", file=sys.stderr)
        return 1
    try:
        reply = await nc.request(subject, body.encode(), timeout=wait_s)
    except NoRespondersError:
        print(f"registryd: no registryd is serving {subject}", file=sys.stderr)
        return 1
    except NatsTimeout:
        print(f"registryd: no reply on {subject} within {wait_s:g}s", file=sys.stderr)
        return 1
    finally:
        await nc.close()
    headers = reply.headers or {}
    if ERROR_CODE_HEADER in headers:
        print(
            f"error {headers[ERROR_CODE_HEADER]}: {headers.get(ERROR_HEADER, '')}", file=sys.stderr
        )
        return 1
    try:
        parsed = orjson.loads(reply.data) if reply.data else {}
        sys.stdout.write(orjson.dumps(parsed, option=orjson.OPT_INDENT_2).decode() + "\n")
    except orjson.JSONDecodeError:
        sys.stdout.write(reply.data.decode(errors="replace") + "\n")
    if "Registry-Next" in headers:
        print(f'(more: add "after": "{headers["Registry-Next"]}")', file=sys.stderr)
    return 0
