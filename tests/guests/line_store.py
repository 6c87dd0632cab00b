"""A line-protocol key-value store on asyncio, as streams or as Protocols.

    PUT key value  -> OK key
    GET key        -> VAL key value  (or NONE key)
    BIG key n      -> n bytes of the key repeated, then a line END key

Usage: line_store.py PORT streams|protocol
"""

import asyncio
import sys

store: dict[str, str] = {}


def answer(line: bytes) -> bytes:
    words = line.decode().split()
    if len(words) == 3 and words[0] == "PUT":
        store[words[1]] = words[2]
        return f"OK {words[1]}\n".encode()
    if len(words) == 2 and words[0] == "GET":
        if words[1] in store:
            return f"VAL {words[1]} {store[words[1]]}\n".encode()
        return f"NONE {words[1]}\n".encode()
    if len(words) == 3 and words[0] == "BIG":
        key, size = words[1].encode(), int(words[2])
        body = (key * (size // len(key) + 1))[:size]
        return body + b"\nEND " + key + b"\n"
    return b"ERR " + line.strip() + b"\n"


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(answer(line))
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()


class LineProtocol(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            self.transport.write(answer(line))

    def eof_received(self) -> None:
        self.transport.close()


async def main(port: int, shape: str) -> None:
    if shape == "streams":
        server = await asyncio.start_server(handle, "127.0.0.1", port)
    else:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(LineProtocol, "127.0.0.1", port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
