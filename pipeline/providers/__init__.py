"""Batch-inference provider clients (Fireworks) and their shared error, state and download helpers."""
