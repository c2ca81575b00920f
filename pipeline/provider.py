"""The provider backend of a run: the embedded emulator (default) or a real service.

Every backend is the same client code whatever it talks to; for the emulator only the base URL and a placeholder key
differ. The emulator keeps its state under the run (`.emulator/`), so a re-run after a crash finds the same batches.
"""

from __future__ import annotations

from pipeline.control import outcome
from pipeline.control.config import ConfigError
from pipeline.control.run import Run
from pipeline.providers.backend import Backend
from pipeline.providers.fireworks import FireworksBackend, FireworksClient

EMULATOR_POLL_S = 0.1
REMOTE_POLL_S = 30.0


def check_credentials(run: Run) -> None:
    """Pre-flight, read-only: ConfigError naming the environment variables the chosen provider needs and lacks."""
    if run.cfg.provider.name == "fireworks":
        missing = FireworksClient.missing_env()
        if missing:
            raise ConfigError(f"provider fireworks needs {' and '.join(missing)} in the environment (nothing was "
                              "frozen, built or sent); set them, or use provider.name: emulator for an offline run")


def emulator_url(run: Run) -> str:
    """The base URL of the run's emulator, started if it is not running."""
    from pipeline.emulator.process import ensure_emulator

    return ensure_emulator(run.layout.emulator_dir, answer_key=run.layout.prepared_dir,
                           latency_s=run.cfg.provider.latency_s, owner=outcome.session_pid() or None)


def make_client(run: Run) -> FireworksClient:
    if run.cfg.provider.name == "fireworks":
        return FireworksClient.from_env()
    return FireworksClient(emulator_url(run), "emulator-key", "emulator", allow_loopback_http=True, backoff_s=0.05)


def make_backend(run: Run) -> Backend:
    """The backend for the run's provider API (`provider.name`, or `provider.api` for the emulator)."""
    return FireworksBackend(make_client(run), poll_s=poll_interval(run))


def poll_interval(run: Run) -> float:
    if run.cfg.provider.poll_interval_s is not None:
        return run.cfg.provider.poll_interval_s
    return EMULATOR_POLL_S if run.cfg.provider.name == "emulator" else REMOTE_POLL_S
