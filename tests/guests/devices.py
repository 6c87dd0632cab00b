"""Answers every line with values from each virtualized device.

If any of these reached the host instead of a virtual device, the replay's
output would differ from the recording's and the replay would fail.
"""

import datetime
import os
import random
import secrets
import socket
import sys
import time
import uuid

rng = random.Random()


def values() -> bytes:
    parts = [
        time.time(),
        time.time_ns(),
        time.monotonic(),
        time.monotonic_ns(),
        time.perf_counter(),
        time.process_time(),
        time.strftime("%Y-%m-%d %H:%M:%S"),
        time.ctime(),
        time.localtime().tm_sec,
        datetime.datetime.now().isoformat(),
        datetime.date.today().isoformat(),
        random.random(),
        random.randint(0, 10**9),
        rng.random(),
        random.SystemRandom().random(),
        os.urandom(8).hex(),
        secrets.token_hex(8),
        uuid.uuid4(),
        os.getpid(),
        socket.gethostname(),
        hash("a string"),
    ]
    return (" ".join(map(str, parts)) + "\n").encode()


server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            if line.strip() == b"sleep":
                time.sleep(0.05)
            conn.sendall(values())
