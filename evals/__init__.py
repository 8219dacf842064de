"""Metrics over (checkpoint, cache, model): pure tensor functions plus thin drivers."""
