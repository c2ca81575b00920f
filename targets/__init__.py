"""Manifest models, atomic persistence, fingerprints and the Luigi targets built on them."""
