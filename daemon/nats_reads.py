"""The one place registryd reaches into nats-py: how much it reads at a time,
and how much the kernel holds that it has not read yet.

nats-py reads at most DEFAULT_BUFFER_SIZE (32 KiB) from the socket each time
the event loop comes round, and its stream reader stops taking bytes from the
kernel past twice that. A client bursting megabyte requests at a daemon whose
loop is busy checking them outruns that, and nats-server cuts the daemon off
as a slow consumer. Reading up to 1 MiB a turn keeps reading far ahead.

How far ahead is not up to us, though: the loop comes round only when the
request being checked is done. So before checking a large body the turns ask
`unread` how much the kernel holds for the request connection, and let the
reader at it first (daemon/turns.py).

nats-py has no option for either, so this sets its module constant, before any
connection is made, and reads its transport's socket; `enlarge_reads` fails
loudly if a nats-py release renames the constant, and `unread` answers 0 if
the socket cannot be found (pyproject.toml pins the tested range, and
tests/test_flood.py's burst tests are what show it works).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import termios

import nats.aio.client
from nats.aio.client import Client as NATS

READ_CHUNK = 1024 * 1024


def enlarge_reads() -> None:
    if not isinstance(getattr(nats.aio.client, "DEFAULT_BUFFER_SIZE", None), int):
        raise RuntimeError(
            "this nats-py has no nats.aio.client.DEFAULT_BUFFER_SIZE; "
            "see daemon/nats_reads.py before upgrading it"
        )
    nats.aio.client.DEFAULT_BUFFER_SIZE = READ_CHUNK


def unread(nc: NATS) -> int:
    """Bytes the kernel has received on `nc`'s socket that nats-py has not
    read; 0 when there is no socket (reconnecting) or it cannot be asked."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    sock = writer.get_extra_info("socket") if writer is not None else None
    if sock is None:
        return 0
    held = array.array("i", [0])
    with contextlib.suppress(OSError, ValueError):
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, held)
    return held[0]
