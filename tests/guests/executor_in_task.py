"""An asyncio service that hands each request's work to a thread pool.

asyncio keeps an exception raised in a task inside the task (and the server
goes on); the refusal must stop the program instead.
"""

import asyncio
import concurrent.futures
import sys

pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()
    answer = await asyncio.get_running_loop().run_in_executor(pool, line.upper)
    writer.write(answer)
    await writer.drain()
    writer.close()


async def main() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
print("asyncio.run returned", flush=True)
