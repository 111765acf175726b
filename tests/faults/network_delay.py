"""A TCP forwarder to a Redis server that partitions the network for a while at each client chunk
holding a pattern, for tests:
``python network_delay.py LISTEN_PORT REDIS_PORT PATTERN HOLD_S [replies]``.

Bytes go through as they come, until a client's chunk holding PATTERN: from it on, nothing goes
either way on any connection for HOLD_S seconds, and then everything that was sent meanwhile is
delivered, in order. That is a partition that heals, as a congested or flapping network makes:
what a client sent before it timed out still lands. It is not once only: the next chunk holding
PATTERN that the forwarder reads after the network healed partitions it again, for HOLD_S (one read
during a partition neither lengthens it nor starts another), so a test that wants one partition
sends PATTERN once, e.g. a value only one command carries. With ``replies``, only what the server
sends is held: the commands (that chunk's among them) reach Redis and run, their replies come late.
It prints ``ready`` once it listens.
"""

import asyncio
import sys

from engine_proxy import _pipe  # this script's directory is on sys.path

PATTERN, HOLD_S = sys.argv[3].encode(), float(sys.argv[4])
REPLIES_ONLY = sys.argv[5:] == ["replies"]


class _Gated:
    """A stream reader whose chunks wait while the network is partitioned; a client's chunk holding
    PATTERN (`watch`), read while it is not, partitions it for HOLD_S, each time."""

    def __init__(self, reader, gate: asyncio.Event, *, watch: bool) -> None:
        self.reader, self.gate, self.watch = reader, gate, watch

    async def read(self, n: int) -> bytes:
        data = await self.reader.read(n)
        if self.watch and PATTERN in data and self.gate.is_set():
            self.gate.clear()
            asyncio.get_running_loop().call_later(HOLD_S, self.gate.set)
        if not (self.watch and REPLIES_ONLY):
            await self.gate.wait()
        return data


async def _main(listen: int, upstream: int) -> None:
    gate = asyncio.Event()
    gate.set()

    async def handle(reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(_pipe(_Gated(reader, gate, watch=True), up_writer),
                             _pipe(_Gated(up_reader, gate, watch=False), writer))

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(int(sys.argv[1]), int(sys.argv[2])))
