"""Admission: local, approximate protection of capacity (rate limits, load shedding)."""
