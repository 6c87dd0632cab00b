"""A deliberately non-deterministic guest: each reply tells the host's uptime and the
process's real pid, read from /proc, which ftproxy does not virtualize. The reply's
first bytes are the same on every host; the difference comes later."""

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
    with open("/proc/uptime") as uptime, open("/proc/self/stat") as stat:
        facts = f"host facts, read from /proc: uptime {uptime.read().split()[0]} s, "
        facts += f"pid {stat.read().split()[0]}\n"
    conn.sendall(facts.encode())
    conn.close()
