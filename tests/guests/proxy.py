"""An asyncio guest that is a client too: each line it receives is sent to an
upstream server (by host name, so getaddrinfo runs), and the answer returned."""

import asyncio
import sys


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    upstream_port = int(sys.argv[2])
    while line := await reader.readline():
        up_reader, up_writer = await asyncio.open_connection("localhost", upstream_port)
        up_writer.write(line)
        await up_writer.drain()
        answer = await up_reader.readline()
        up_writer.close()
        await up_writer.wait_closed()
        writer.write(b"upstream said: " + answer)
        await writer.drain()
    writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, "localhost", int(sys.argv[1]))
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
