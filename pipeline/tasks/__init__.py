"""Luigi tasks, one module per phase; each is a thin shell around pure domain functions."""
