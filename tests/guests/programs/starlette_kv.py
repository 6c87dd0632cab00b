"""A key-value HTTP service in Starlette (async endpoints), served by uvicorn.

uvicorn starlette_kv:app --port 8000
curl -X PUT --data-binary v http://127.0.0.1:8000/kv/k
curl http://127.0.0.1:8000/kv/k
curl -X POST http://127.0.0.1:8000/counter/hits
"""

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

store: dict[str, bytes] = {}
counters: dict[str, int] = {}


async def get(request: Request) -> Response:
    key = request.path_params["key"]
    if key not in store:
        return JSONResponse({"error": "no such key"}, status_code=404)
    return Response(store[key], media_type="application/octet-stream")


async def put(request: Request) -> Response:
    key = request.path_params["key"]
    store[key] = await request.body()
    return JSONResponse({"key": key, "bytes": len(store[key])})


async def count(request: Request) -> Response:
    name = request.path_params["name"]
    counters[name] = counters.get(name, 0) + 1
    return JSONResponse({"name": name, "value": counters[name]})


app = Starlette(
    routes=[
        Route("/kv/{key}", get, methods=["GET"]),
        Route("/kv/{key}", put, methods=["PUT"]),
        Route("/counter/{name}", count, methods=["POST"]),
    ]
)
