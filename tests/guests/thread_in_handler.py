"""A socketserver service whose handler starts a thread per request.

socketserver catches Exception around every request: a refusal that were one
would become an empty reply and the server would serve on, having done nothing.
"""

import socketserver
import sys
import threading


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        worker = threading.Thread(target=print, args=("working on", line))
        worker.start()
        self.wfile.write(b"done\n")


with socketserver.TCPServer(("127.0.0.1", int(sys.argv[1])), Handler) as server:
    print("listening", flush=True)
    server.serve_forever()
print("serve_forever returned", flush=True)
