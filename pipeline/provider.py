"""The provider client for a run: the embedded emulator (default) or the real Fireworks service.

Both are the same `FireworksClient`; only the base URL and the credentials differ. The emulator keeps its
state under the run (`.emulator/`), so a re-run after a crash finds the same datasets and jobs.
"""

from __future__ import annotations

from pipeline.control import outcome
from pipeline.control.config import ConfigError
from pipeline.control.run import Run
from pipeline.providers.fireworks import FireworksClient

EMULATOR_POLL_S = 0.1
FIREWORKS_POLL_S = 30.0


def check_credentials(run: Run) -> None:
    """Pre-flight, read-only: ConfigError naming the environment variables the chosen provider needs and lacks."""
    if run.cfg.provider.name == "fireworks":
        missing = FireworksClient.missing_env()
        if missing:
            raise ConfigError(f"provider fireworks needs {' and '.join(missing)} in the environment (nothing was "
                              "frozen, built or sent); set them, or use provider.name: emulator for an offline run")


def make_client(run: Run) -> FireworksClient:
    if run.cfg.provider.name == "fireworks":
        return FireworksClient.from_env()
    from pipeline.emulator.process import ensure_emulator

    base_url = ensure_emulator(run.layout.emulator_dir, answer_key=run.layout.prepared_dir,
                               latency_s=run.cfg.provider.latency_s, owner=outcome.session_pid() or None)
    return FireworksClient(base_url, "emulator-key", "emulator", allow_loopback_http=True, backoff_s=0.05)


def poll_interval(run: Run) -> float:
    if run.cfg.provider.poll_interval_s is not None:
        return run.cfg.provider.poll_interval_s
    return EMULATOR_POLL_S if run.cfg.provider.name == "emulator" else FIREWORKS_POLL_S
