"""The sans-I/O cores, in the style of h11: bytes and ``now`` in, events and deadlines out.

Replication (roles, generations, the output gate, lag, catch-up), the log channel
and the session it opens (HMAC opening, sealed frames, framing), and the log's
records. Nothing here imports trio, opens a socket or sleeps (tests/test_layers.py
checks it), so every rule can be tested with plain calls.
"""
