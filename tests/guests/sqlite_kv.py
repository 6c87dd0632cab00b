"""An HTTP key-value store that keeps its state in a sqlite file in its working directory.

GET /put?k=K&v=V stores V and answers the write's sequence number (an
AUTOINCREMENT row id, so a second writer to the same file shows at once);
GET /get?k=K answers the value.
"""

import sqlite3
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

db = sqlite3.connect("kv.sqlite3", isolation_level=None)
db.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT)")
db.execute("CREATE TABLE IF NOT EXISTS writes (id INTEGER PRIMARY KEY AUTOINCREMENT, k TEXT)")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {name: values[0] for name, values in parse_qs(url.query).items()}
        if url.path == "/put":
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (query["k"], query["v"]))
            seq = db.execute("INSERT INTO writes (k) VALUES (?)", (query["k"],)).lastrowid
            body = f"ok {seq}\n"
        elif url.path == "/get":
            row = db.execute("SELECT v FROM kv WHERE k = ?", (query["k"],)).fetchone()
            body = "nil\n" if row is None else f"{row[0]}\n"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


with HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler) as server:
    print("listening", flush=True)
    server.serve_forever()
