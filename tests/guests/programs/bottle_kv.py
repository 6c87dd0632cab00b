"""A key-value HTTP service in bottle, on its built-in ``wsgiref`` server.

python bottle_kv.py --port 8000
curl -X PUT --data-binary v http://127.0.0.1:8000/kv/k
curl http://127.0.0.1:8000/kv/k
curl -X POST http://127.0.0.1:8000/counter/hits
"""

import argparse

import bottle
from bottle import abort, request, response

app = bottle.Bottle()
store: dict[str, bytes] = {}
counters: dict[str, int] = {}


@app.get("/kv/<key>")
def get(key: str):
    if key not in store:
        abort(404, "no such key")
    response.content_type = "application/octet-stream"
    return store[key]


@app.put("/kv/<key>")
def put(key: str):
    store[key] = request.body.read()
    return {"key": key, "bytes": len(store[key])}


@app.post("/counter/<name>")
def count(name: str):
    counters[name] = counters.get(name, 0) + 1
    return {"name": name, "value": counters[name]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    app.run(host=args.host, port=args.port, server="wsgiref", quiet=True)
