"""Computes for a while between exits, so that its supervisor can die while it runs."""

import time

while True:
    print("busy", flush=True)
    sum(i * i for i in range(2_000_000))
    time.sleep(0.001)
