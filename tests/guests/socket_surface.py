"""A line server that answers with what the less common socket calls real programs make return.

Each request is an 8-byte command, and exercises one part of the surface:
descriptors handed to ``os`` (read, write, sendfile, set_inheritable),
``sendmsg``/``recvmsg_into``, a socket's ``sendfile`` and ``timeout``, the
resolver calls built on the devices, what ``select`` does not offer, and
``recv``'s flags (``MSG_PEEK`` as ``socket.MsgFlag`` and as a plain int,
``MSG_DONTWAIT`` on a blocking socket; any other flag is refused, which stops
the guest).
"""

import os
import select
import socket
import sys
import tempfile

listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen()
print("listening", flush=True)
payload = tempfile.TemporaryFile()  # noqa: SIM115 - open for the server's life
payload.write(b"file bytes " * 1000)
payload.flush()


def read_command(conn: socket.socket) -> bytes:
    halves = [bytearray(4), bytearray(4)]
    got = 0
    while got < 8:
        view = memoryview(halves[0] + halves[1])
        n, _, _, _ = conn.recvmsg_into([view[got:]])
        if n == 0:
            return b""
        halves = [bytearray(view[:4]), bytearray(view[4:])]
        got += n
    return bytes(halves[0] + halves[1])


while True:
    conn, _ = listener.accept()
    conn.set_inheritable(True)
    first = conn.get_inheritable()
    os.set_inheritable(conn.fileno(), False)
    now = os.get_inheritable(conn.fileno())
    conn.sendall(f"inheritable {first} {now} {conn.timeout}\n".encode())
    while command := read_command(conn):
        if command == b"osio   \n":
            os.write(conn.fileno(), b"os.write " + command)
        elif command == b"msg    \n":
            conn.sendmsg([b"sendmsg ", command])
        elif command == b"file   \n":
            sent = conn.sendfile(payload, 0, 50)
            conn.sendall(b" sent %d\n" % sent)
            offset = 0
            while offset < 110:
                offset += os.sendfile(conn.fileno(), payload.fileno(), offset, 110 - offset)
            conn.sendall(b"\n")
        elif command == b"names  \n":
            name, aliases, addresses = socket.gethostbyname_ex("localhost")
            flags = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
            host, port = socket.getnameinfo(("127.0.0.1", 80), flags)
            conn.sendall(f"{name} {addresses} {host} {port}\n".encode())
        elif command == b"select \n":
            conn.sendall(f"{hasattr(select, 'epoll')} {select.poll.__name__}\n".encode())
        elif command == b"peek   \n":  # the client sent 4 more bytes with the command
            peeked = conn.recv(4, socket.MSG_PEEK)
            again = conn.recv(4, int(socket.MSG_PEEK))
            taken = conn.recv(4)
            try:
                conn.recv(4, socket.MSG_DONTWAIT)  # nothing more was sent
            except BlockingIOError:
                taken += b" (then none)"
            conn.sendall(b"peek %s %s %s\n" % (peeked, again, taken))
        elif command == b"oob    \n":
            conn.recv(1, socket.MSG_OOB)
    socket.close(conn.fileno())
