"""The `registryd` command: serve (default), migrate, call, why, --version."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import SecretStr

from daemon import __version__, logs
from infra import config
from infra.wire import ERROR_CODE_HEADER, ERROR_HEADER, NEXT_HEADER

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg

log = logging.getLogger("registryd")

EXIT_BAD_SETTING = 2
EMBEDDED_NATS_URL = "nats://127.0.0.1:4222"  # with --embedded, when the port is free


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
    # The worker agent, the admin commands, call and why are the daemon's
    # clients: they take only the settings a client uses.
    from daemon import commands as client_commands

    client = client_commands.client_flags()
    call = commands.add_parser(
        "call",
        parents=[client],
        help="send one request and print the reply",
        description="Send one request to registry.OP and print the JSON reply "
        '(exit 0) or the error (exit 1). Example: registryd call get \'{"name":"gpu-1"}\'',
    )
    call.add_argument("op", help="operation, e.g. list, register, heartbeat.<node_id>")
    call.add_argument("body", nargs="?", default="{}", help="JSON request body ('-' for stdin)")
    call.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (10)")
    client_commands.add(commands, client)
    why = commands.add_parser(
        "why",
        parents=[client],
        help="explain where a model can and cannot go",
        description="Ask registry.explain why MODEL can or cannot take a new replica on "
        "each node: print the summary and the nodes that cannot, with their reasons "
        "(exit 0), or the error (exit 1). Example: registryd why qwen3-8b --min-bytes 8GiB "
        "--selector zone=eu",
    )
    why.add_argument("model", help="the model's name")
    why.add_argument(
        "--min-bytes",
        type=byte_count,
        help="effectively free VRAM a replica needs: bytes, or e.g. 8GiB",
    )
    why.add_argument(
        "--selector",
        type=label_pair,
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="label pairs a node must carry (default: the model's scheduling config's)",
    )
    why.add_argument("--json", action="store_true", help="print the reply as JSON")
    why.add_argument("--timeout", type=float, default=10.0, help="seconds to wait per page (10)")
    return top


def byte_count(text: str) -> int:
    """A byte count as `--min-bytes` takes it: 8589934592, 8GiB, 7.5GiB, 8GB."""
    from registryd.agent import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def label_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"not a label pair k=v: {text!r}")
    return key, value


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k in config.FIELDS}
    try:
        settings = config.load(flags)
    except config.SettingError as exc:
        print(f"registryd: invalid setting {exc}", file=sys.stderr)
        return EXIT_BAD_SETTING
    command = args.command or "serve"
    from daemon import commands as client_commands

    if command in client_commands.NAMES:
        return client_commands.run(command, args, settings, flags)
    if command == "call":
        return asyncio.run(call(settings, args.op, args.body, args.timeout, explicit=flags))
    if command == "why":
        selector = None if args.selector is None else dict(args.selector)
        return asyncio.run(
            why(
                settings,
                args.model,
                args.min_bytes,
                selector,
                args.timeout,
                as_json=args.json,
                explicit=flags,
            )
        )
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
    from infra import db

    database = await db.connect(settings, wait=False)
    await database.close()
    log.info("schema applied")
    return 0


async def ask(nc: NATS, subject: str, body: bytes, wait_s: float) -> Msg:
    """One request's reply (an error reply too: see `error_reply`)."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from daemon.commands import Unanswered

    try:
        return await nc.request(subject, body, timeout=wait_s)
    except NoRespondersError:
        raise Unanswered(f"no registryd is serving {subject}") from None
    except NatsTimeout:
        raise Unanswered(f"no reply on {subject} within {wait_s:g}s") from None


def error_reply(reply: Msg) -> bool:
    """Whether the reply is an error; if so, it is printed to stderr."""
    headers = reply.headers or {}
    if ERROR_CODE_HEADER not in headers:
        return False
    print(f"error {headers[ERROR_CODE_HEADER]}: {headers.get(ERROR_HEADER, '')}", file=sys.stderr)
    return True


async def call(
    settings: config.Settings, op: str, body: str, wait_s: float, *, explicit: dict[str, Any]
) -> int:
    from daemon.commands import Unanswered, connection

    if body == "-":
        body = sys.stdin.read()
    try:
        async with connection(settings, explicit) as nc:
            reply = await ask(nc, f"{settings.subject_prefix}.{op}", body.encode(), wait_s)
    except Unanswered as exc:
        print(f"registryd: {exc}", file=sys.stderr)
        return 1
    if error_reply(reply):
        return 1
    headers = reply.headers or {}
    try:
        parsed = orjson.loads(reply.data) if reply.data else {}
        sys.stdout.write(orjson.dumps(parsed, option=orjson.OPT_INDENT_2).decode() + "\n")
    except orjson.JSONDecodeError:
        sys.stdout.write(reply.data.decode(errors="replace") + "\n")
    if NEXT_HEADER in headers:
        print(f'(more: add "after": "{headers[NEXT_HEADER]}")', file=sys.stderr)
    return 0


# Nodes per registry.explain request of `why`, which follows the pages to the end.
WHY_PAGE = 1000


async def why(
    settings: config.Settings,
    model: str,
    min_bytes: int | None,
    selector: dict[str, str] | None,
    wait_s: float,
    *,
    as_json: bool,
    explicit: dict[str, Any],
) -> int:
    from daemon.commands import Unanswered, connection

    body: dict[str, Any] = {"model": model, "limit": WHY_PAGE}
    if min_bytes is not None:
        body["min_bytes"] = min_bytes
    if selector is not None:
        body["selector"] = selector
    pages: list[dict[str, Any]] = []
    try:
        async with connection(settings, explicit) as nc:
            while True:
                reply = await ask(
                    nc, f"{settings.subject_prefix}.explain", orjson.dumps(body), wait_s
                )
                if error_reply(reply):
                    return 1
                pages.append(orjson.loads(reply.data))
                after = (reply.headers or {}).get(NEXT_HEADER)
                if after is None:
                    break
                body["after"] = after
    except Unanswered as exc:
        print(f"registryd: {exc}", file=sys.stderr)
        return 1
    # The first page's summary, with every page's nodes: the reply one
    # request without `limit` would give, for clusters of any size.
    explained = {**pages[0], "nodes": [node for page in pages for node in page["nodes"]]}
    if as_json:
        sys.stdout.write(orjson.dumps(explained, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(why_text(explained))
    return 0


def why_text(explained: dict[str, Any]) -> str:
    """The summary, what routers can reach, and a table of the nodes that
    cannot take the model: one reason a line, the node's name on its first."""
    routable = explained["routable"]
    lines = [
        explained["summary"],
        f"{routable} loaded replica{'' if routable == 1 else 's'} on healthy nodes can serve it",
    ]
    if explained["unsatisfiable_until"] is not None:
        lines[-1] += (
            f"; scale-ups skipped until {explained['unsatisfiable_until']}"
            f" ({explained['unsatisfiable_ticks']} ticks without room)"
        )
    rows = [("NODE", "STATUS", "REASON")]
    for node in explained["nodes"]:
        for i, reason in enumerate(node["reasons"]):
            first = i == 0
            rows.append(
                (
                    node["name"] if first else "",
                    node["status"] if first else "",
                    f"{reason['code']}: {reason['message']}",
                )
            )
    if len(rows) > 1:
        name_width = max(len(r[0]) for r in rows)
        status_width = max(len(r[1]) for r in rows)
        lines.append("")
        lines += [f"{a:<{name_width}}  {b:<{status_width}}  {c}" for a, b, c in rows]
    return "\n".join(lines) + "\n"
