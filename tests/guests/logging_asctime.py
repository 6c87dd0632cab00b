"""A line server that logs every request with logging's %(asctime)s and sends the line back.

logging stores time.localtime as a class attribute (Formatter.converter): the
virtual clock must behave like the builtin there. The reply carries the
formatted record, so a replay that formats another time diverges.
"""

import io
import logging
import socketserver
import sys

captured = io.StringIO()
log = logging.getLogger("requests")
log.setLevel(logging.INFO)
for stream in (sys.stderr, captured):
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
utc = logging.Formatter("%(asctime)s", datefmt="%Y-%m-%dT%H:%M:%S")
utc.converter = __import__("time").gmtime


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            log.info("got %r", line.strip().decode())
            formatted = captured.getvalue().splitlines()[-1]
            record = log.makeRecord("requests", logging.INFO, __file__, 0, "", (), None)
            self.wfile.write(f"{formatted} | {utc.format(record)}\n".encode())


with socketserver.TCPServer(("127.0.0.1", int(sys.argv[1])), Handler) as server:
    print("listening", flush=True)
    server.serve_forever()
