"""Serving runtime: adapter registry, per-batch metadata, engine."""
