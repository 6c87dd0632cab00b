"""A UDP echo service that numbers the datagrams it answers."""

import socket
import sys

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", int(sys.argv[1])))
print("listening", flush=True)
count = 0
while True:
    data, peer = sock.recvfrom(2048)
    count += 1
    sock.sendto(b"%d:" % count + data, peer)
