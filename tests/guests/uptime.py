"""A deliberately non-deterministic guest: it reads the host's uptime from /proc,
which ftproxy does not virtualize, and sends it to each client."""

import socket
import sys

server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    conn.recv(100)
    with open("/proc/uptime") as uptime:
        conn.sendall(uptime.read().encode())
    conn.close()
