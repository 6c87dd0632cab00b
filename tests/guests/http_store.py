"""The standard library's http.server.HTTPServer with keep-alive (HTTP/1.1):

    GET /put?k=KEY&v=VALUE  -> "OK KEY"
    GET /get?k=KEY          -> "VAL KEY VALUE" (404 "NONE KEY" if absent)
    GET /big?k=KEY&n=N      -> N bytes of KEY repeated

Usage: http_store.py PORT
"""

import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

store: dict[str, str] = {}


class StoreHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {name: values[0] for name, values in parse_qs(url.query).items()}
        key = query.get("k", "")
        status = 200
        if url.path == "/put":
            store[key] = query.get("v", "")
            body = f"OK {key}".encode()
        elif url.path == "/get" and key in store:
            body = f"VAL {key} {store[key]}".encode()
        elif url.path == "/big":
            size = int(query.get("n", "0"))
            body = (key.encode() * (size // max(len(key), 1) + 1))[:size]
        else:
            status, body = 404, f"NONE {key}".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request on stderr is noise here


server = HTTPServer(("127.0.0.1", int(sys.argv[1])), StoreHandler)
print("listening", flush=True)
server.serve_forever()
