"""TODO viz."""
