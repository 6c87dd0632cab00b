"""Fixtures shared by several test modules."""

# The etcd fixtures (`etcd`, `black_hole`): real clusters, made in tests/etcd_harness.py.
pytest_plugins = ["etcd_harness"]
