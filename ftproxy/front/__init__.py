"""Network fronts: how a supervisor connects its guest to the real network."""
