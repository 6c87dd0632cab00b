"""Ignores Ctrl-C: it catches KeyboardInterrupt and goes on serving."""

import socket
import sys

server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
print("listening", flush=True)
while True:
    try:
        conn, _ = server.accept()
        conn.close()
    except KeyboardInterrupt:
        print("not stopping", flush=True)
