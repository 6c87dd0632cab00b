"""The arbiter: a durable test-and-set service that prevents split brain."""
