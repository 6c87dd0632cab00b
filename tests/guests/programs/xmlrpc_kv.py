"""A key-value service over XML-RPC, on the standard library's ``xmlrpc.server``.

python xmlrpc_kv.py --port 8000
python -c "import xmlrpc.client as x; print(x.ServerProxy('http://127.0.0.1:8000').incr('n'))"
"""

import argparse
import contextlib
from xmlrpc.server import SimpleXMLRPCServer

store: dict[str, str] = {}
counters: dict[str, int] = {}


def put(key: str, value: str) -> bool:
    store[key] = value
    return True


def get(key: str) -> str:
    return store[key]  # a missing key is a Fault for the caller


def incr(name: str) -> int:
    counters[name] = counters.get(name, 0) + 1
    return counters[name]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    with SimpleXMLRPCServer((args.host, args.port), logRequests=False) as server:
        server.register_function(put)
        server.register_function(get)
        server.register_function(incr)
        print(f"serving XML-RPC on http://{args.host}:{args.port}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
