"""A unix-socket forwarder to the Docker engine, for tests: ``python engine_proxy.py SRC DST``.

Killing it cuts one client (the flow process) off the engine while the engine and the node agent
go on: the partition a TCP, TLS or SSH-forwarded engine connection can suffer.
"""

import asyncio
import os
import sys


async def _pipe(reader, writer) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except Exception:  # noqa: BLE001 - either side closing ends the pipe
        pass
    finally:
        writer.close()


async def _main(src: str, dst: str) -> None:
    async def handle(reader, writer) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(dst)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    if os.path.exists(src):
        os.unlink(src)
    server = await asyncio.start_unix_server(handle, src)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], sys.argv[2]))
