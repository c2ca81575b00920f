"""The provider backend of a run: the embedded emulator (default) or a real service.

Every backend is built from the environment its client reads (`<PROVIDER>_API_KEY`, `<PROVIDER>_BASE_URL`, ...).
For the emulator that environment names the run's emulator and a placeholder key: the client code is the same, and
nothing past this module knows whether it talks to the emulator. The emulator keeps its state under the run
(`.emulator/`), so a re-run after a crash finds the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pipeline.control import outcome
from pipeline.control.config import ConfigError
from pipeline.control.run import Run
from pipeline.control.stop import stop_requested
from pipeline.providers.backend import Backend

EMULATOR_POLL_S = 0.1
REMOTE_POLL_S = 30.0
EMULATOR_BACKOFF_S = 0.05
EMULATOR_KEY = "emulator-key"
LOCAL_BASE_URL = "http://127.0.0.1:11434/v1"


def required_env(api: str) -> tuple[str, ...]:
    """The environment variables a real provider's client cannot start without."""
    return {"fireworks": ("FIREWORKS_API_KEY", "FIREWORKS_ACCOUNT_ID"), "openai": ("OPENAI_API_KEY",),
            "anthropic": ("ANTHROPIC_API_KEY",)}.get(api, ())


def check_credentials(run: Run, environ: Mapping[str, str] = os.environ) -> None:
    """Pre-flight, read-only: ConfigError naming the environment variables the chosen provider needs and lacks."""
    name = run.cfg.provider.name
    missing = [] if name == "emulator" else [var for var in required_env(name) if not environ.get(var)]
    if missing:
        raise ConfigError(f"provider {name} needs {' and '.join(missing)} in the environment (nothing was "
                          "frozen, built or sent); set them, or use provider.name: emulator for an offline run")


def emulator_url(run: Run) -> str:
    """The base URL of the run's emulator, started if it is not running."""
    from pipeline.emulator.process import ensure_emulator

    return ensure_emulator(run.layout.emulator_dir, answer_key=run.layout.prepared_dir,
                           latency_s=run.cfg.provider.latency_s, owner=outcome.session_pid() or None)


def client_environ(run: Run) -> Mapping[str, str]:
    """What the run's client reads: the process environment, or for the emulator its URL and a placeholder key."""
    if run.cfg.provider.name != "emulator":
        return os.environ
    url = emulator_url(run)
    return {"FIREWORKS_API_KEY": EMULATOR_KEY, "FIREWORKS_ACCOUNT_ID": "emulator", "FIREWORKS_BASE_URL": url,
            "OPENAI_API_KEY": EMULATOR_KEY, "OPENAI_BASE_URL": f"{url}/v1",
            "ANTHROPIC_API_KEY": EMULATOR_KEY, "ANTHROPIC_BASE_URL": url, "LOCAL_BASE_URL": f"{url}/v1"}


def make_backend(run: Run) -> Backend:
    """The backend for the run's provider API (`provider.name`, or `provider.api` for the emulator)."""
    cfg = run.cfg.provider
    environ = client_environ(run)
    backend: Backend
    if cfg.api == "openai":
        from pipeline.providers.openai import OpenAIBackend, OpenAIClient

        backend = OpenAIBackend(OpenAIClient.from_env(environ))
    elif cfg.api == "anthropic":
        from pipeline.providers.anthropic import AnthropicBackend, AnthropicClient

        backend = AnthropicBackend(AnthropicClient.from_env(environ), prompt_caching=cfg.prompt_caching)
    elif cfg.api == "local":
        from pipeline.providers.local import LocalBackend, LocalClient

        base_url = (None if cfg.name == "emulator" else cfg.base_url) or environ.get("LOCAL_BASE_URL") or LOCAL_BASE_URL
        client = LocalClient(base_url, os.environ.get("LOCAL_API_KEY") or None, allow_http=True)
        backend = LocalBackend(client, cfg.max_concurrent_requests, should_stop=lambda: stop_requested(run.layout))
    else:
        from pipeline.providers.fireworks import FireworksBackend, FireworksClient

        backend = FireworksBackend(FireworksClient.from_env(environ), poll_s=poll_interval(run))
    if cfg.name == "emulator":
        backend.client.backoff_s = EMULATOR_BACKOFF_S  # type: ignore[attr-defined]
    return backend


def poll_interval(run: Run) -> float:
    if run.cfg.provider.poll_interval_s is not None:
        return run.cfg.provider.poll_interval_s
    return EMULATOR_POLL_S if run.cfg.provider.name == "emulator" else REMOTE_POLL_S
