"""Offline Fireworks-compatible batch-inference emulator (HTTP server, simulated model, process helper)."""
