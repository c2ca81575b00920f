"""`python -m pipeline.emulator --state-dir D [--host H [--allow-remote]] [--port P --latency S --answer-key DIR
--idle-exit S --faults PLAN]`."""

from __future__ import annotations

from pipeline.emulator.server import main

raise SystemExit(main())
