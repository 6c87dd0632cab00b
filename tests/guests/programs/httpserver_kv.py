"""A key-value HTTP service on the standard library's ``http.server.HTTPServer``.

python httpserver_kv.py --port 8000
curl -X PUT --data-binary v http://127.0.0.1:8000/kv/k
curl http://127.0.0.1:8000/kv/k
curl -X POST http://127.0.0.1:8000/counter/hits
"""

import argparse
import contextlib
import json
from http.server import BaseHTTPRequestHandler, HTTPServer

store: dict[str, bytes] = {}
counters: dict[str, int] = {}


class Handler(BaseHTTPRequestHandler):
    def reply(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/kv/"):
            value = store.get(self.path[4:])
            if value is None:
                self.reply(404, b'{"error": "no such key"}')
            else:
                self.reply(200, value, "application/octet-stream")
        else:
            self.reply(404, b'{"error": "not found"}')

    def do_PUT(self) -> None:
        if not self.path.startswith("/kv/"):
            self.reply(404, b'{"error": "not found"}')
            return
        key = self.path[4:]
        store[key] = self.rfile.read(int(self.headers["Content-Length"]))
        self.reply(200, json.dumps({"key": key, "bytes": len(store[key])}).encode())

    def do_POST(self) -> None:
        if not self.path.startswith("/counter/"):
            self.reply(404, b'{"error": "not found"}')
            return
        name = self.path[9:]
        counters[name] = counters.get(name, 0) + 1
        self.reply(200, json.dumps({"name": name, "value": counters[name]}).encode())

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: one line per request is too many


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = HTTPServer((args.host, args.port), Handler)
    print(f"serving on http://{args.host}:{args.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
