"""A key-value HTTP service in aiohttp (``web.Application``).

python aiohttp_kv.py --port 8000
curl -X PUT --data-binary v http://127.0.0.1:8000/kv/k
curl http://127.0.0.1:8000/kv/k
curl -X POST http://127.0.0.1:8000/counter/hits
"""

import argparse

from aiohttp import web

routes = web.RouteTableDef()
store: dict[str, bytes] = {}
counters: dict[str, int] = {}


@routes.get("/kv/{key}")
async def get(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    if key not in store:
        raise web.HTTPNotFound(text="no such key")
    return web.Response(body=store[key], content_type="application/octet-stream")


@routes.put("/kv/{key}")
async def put(request: web.Request) -> web.Response:
    key = request.match_info["key"]
    store[key] = await request.read()
    return web.json_response({"key": key, "bytes": len(store[key])})


@routes.post("/counter/{name}")
async def count(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    counters[name] = counters.get(name, 0) + 1
    return web.json_response({"name": name, "value": counters[name]})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 1024 * 1024)  # values up to 64 MiB
    app.add_routes(routes)
    web.run_app(app, host=args.host, port=args.port, access_log=None)
