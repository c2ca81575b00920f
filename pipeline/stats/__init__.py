"""Paired statistics for control vs treatment comparisons (numpy/scipy, vectorized)."""
