"""The guest runtime: runs inside the user's process, in front of its program.

``python -m ftproxy.guest SCRIPT ARGS`` replaces the non-deterministic parts of
the standard library with virtual devices, then runs SCRIPT unmodified. Nothing
here may import trio, msgspec or structlog.
"""
