"""A TCP proxy that adds a fixed first-byte latency to every request, as a remote object store has.

On loopback an S3 GET answers in about a millisecond, so concurrency has nothing to hide; in a
region, S3's first-byte latency is tens of milliseconds. The proxy holds back the first bytes
of each response until `delay_ms` after the request was sent, then streams the rest unchanged.

Run: python bench/latency_proxy.py LISTEN_PORT UPSTREAM_PORT DELAY_MS
"""

from __future__ import annotations

import asyncio
import sys
import time


async def _pipe_requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: list[float]) -> None:
    while data := await reader.read(65536):
        sent.append(time.monotonic())  # a request (or more of one) went out: the next answer waits
        writer.write(data)
        await writer.drain()
    writer.close()


async def _pipe_responses(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: list[float], delay: float
) -> None:
    while data := await reader.read(65536):
        if sent:
            wait = sent[-1] + delay - time.monotonic()
            sent.clear()
            if wait > 0:
                await asyncio.sleep(wait)
        writer.write(data)
        await writer.drain()
    writer.close()


async def main(listen: int, upstream: int, delay_ms: float) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream)
        sent: list[float] = []
        try:
            await asyncio.gather(
                _pipe_requests(client_reader, server_writer, sent),
                _pipe_responses(server_reader, client_writer, sent, delay_ms / 1000),
            )
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            client_writer.close()
            server_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
