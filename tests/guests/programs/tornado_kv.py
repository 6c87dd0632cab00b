"""A key-value HTTP service in tornado.

python tornado_kv.py --port 8000
curl -X PUT --data-binary v http://127.0.0.1:8000/kv/k
curl http://127.0.0.1:8000/kv/k
curl -X POST http://127.0.0.1:8000/counter/hits
"""

import argparse
import asyncio
import contextlib

import tornado.web

store: dict[str, bytes] = {}
counters: dict[str, int] = {}


class KeyHandler(tornado.web.RequestHandler):
    def get(self, key: str) -> None:
        if key not in store:
            raise tornado.web.HTTPError(404)
        self.set_header("Content-Type", "application/octet-stream")
        self.write(store[key])

    def put(self, key: str) -> None:
        store[key] = self.request.body
        self.write({"key": key, "bytes": len(store[key])})


class CounterHandler(tornado.web.RequestHandler):
    def post(self, name: str) -> None:
        counters[name] = counters.get(name, 0) + 1
        self.write({"name": name, "value": counters[name]})


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    app = tornado.web.Application([(r"/kv/(.+)", KeyHandler), (r"/counter/(.+)", CounterHandler)])
    app.listen(args.port, address=args.host)
    print(f"serving on http://{args.host}:{args.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
