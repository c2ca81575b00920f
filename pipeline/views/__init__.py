"""Read-only views of runs: `plan` (what would run and why), `status` and `list`, `compare`, and `archive` (which
writes only its own bundle). None of them changes a run: no manifest write, no lock, no stop request touched."""
