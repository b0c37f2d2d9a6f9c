"""The one place registryd reaches into nats-py: how much it reads at a time.

nats-py reads at most DEFAULT_BUFFER_SIZE (32 KiB) from the socket each time
the event loop comes round, and its stream reader stops taking bytes from the
kernel past twice that. A client bursting megabyte requests at a daemon whose
loop is busy checking them outruns that, and nats-server cuts the daemon off
as a slow consumer. Reading up to 1 MiB a turn keeps reading far ahead.

nats-py has no option for it, so this sets its module constant, before any
connection is made; `enlarge_reads` fails loudly if a nats-py release renames
it (pyproject.toml pins the tested range, and tests/test_flood.py's burst
test is what shows it works).
"""

from __future__ import annotations

import nats.aio.client

READ_CHUNK = 1024 * 1024


def enlarge_reads() -> None:
    if not isinstance(getattr(nats.aio.client, "DEFAULT_BUFFER_SIZE", None), int):
        raise RuntimeError(
            "this nats-py has no nats.aio.client.DEFAULT_BUFFER_SIZE; "
            "see daemon/nats_reads.py before upgrading it"
        )
    nats.aio.client.DEFAULT_BUFFER_SIZE = READ_CHUNK
