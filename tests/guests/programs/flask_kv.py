"""A key-value HTTP service in Flask, served by the standard library's ``wsgiref``.

python flask_kv.py --port 8000
curl -X PUT --data-binary v http://127.0.0.1:8000/kv/k
curl http://127.0.0.1:8000/kv/k
curl -X POST http://127.0.0.1:8000/counter/hits
"""

import argparse
import contextlib
from wsgiref.simple_server import WSGIRequestHandler, make_server

from flask import Flask, abort, request

app = Flask(__name__)
store: dict[str, bytes] = {}
counters: dict[str, int] = {}


@app.get("/kv/<key>")
def get(key: str):
    if key not in store:
        abort(404)
    return store[key], 200, {"Content-Type": "application/octet-stream"}


@app.put("/kv/<key>")
def put(key: str):
    store[key] = request.get_data()
    return {"key": key, "bytes": len(store[key])}


@app.post("/counter/<name>")
def count(name: str):
    counters[name] = counters.get(name, 0) + 1
    return {"name": name, "value": counters[name]}


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with make_server(args.host, args.port, app, handler_class=QuietHandler) as server:
        print(f"serving on http://{args.host}:{args.port}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
