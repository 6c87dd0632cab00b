"""Counts requests; on SIGTERM prints the count and exits 0 through its handler."""

import signal
import socket
import sys

count = 0


def stop(signum, frame):
    print(f"stopping after {count} requests", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    while data := conn.recv(1024):
        count += 1
        conn.sendall(b"%d\n" % count)
    conn.close()
