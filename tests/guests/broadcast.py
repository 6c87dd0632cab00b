"""Broadcasts each message to a set of connections, on a selectors loop.

Iterating a set of socket objects follows their id(), so this replays only if
the backup allocates exactly as the primary did.
"""

import selectors
import socket
import sys

selector = selectors.DefaultSelector()
members: set[socket.socket] = set()
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
server.setblocking(False)
selector.register(server, selectors.EVENT_READ)
print("listening", flush=True)
while True:
    for key, _ in selector.select():
        sock = key.fileobj
        if sock is server:
            conn, _ = server.accept()
            conn.setblocking(False)
            members.add(conn)
            selector.register(conn, selectors.EVENT_READ)
            continue
        data = sock.recv(4096)
        if not data:
            members.discard(sock)
            selector.unregister(sock)
            sock.close()
            continue
        order = b",".join(str(m.fileno()).encode() for m in members)
        for member in members:
            member.sendall(b"[" + order + b"] " + data)
