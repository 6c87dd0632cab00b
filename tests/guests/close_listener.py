"""Listens, and closes the listener without accepting once a datagram says so."""

import socket
import sys
import time

port = int(sys.argv[1])
listener = socket.create_server(("127.0.0.1", port))
control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
control.bind(("127.0.0.1", port + 1))
print("listening", flush=True)
_, peer = control.recvfrom(100)
listener.close()
control.sendto(b"closed", peer)
print("closed", flush=True)
while True:
    time.sleep(3600)
