"""Which parts each trial needs, who owns them, and their deterministic remote ids (pure, light).

A part is the unit of remote work: one type-homogeneous slice of a shard, sent as one batch job with the
trial's model and sampling parameters. Its identity is content-addressed: `request_checksum` over the exact request
bytes, model and parameters decides its remote ids, and results are reused only for the same checksum.
Two trials whose part has the same requests share it (typically the control condition of trials that differ only
in the treatment prompt): the first trial in config order owns it, keeps its files under its results dir, and the
others read them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.control.config import Trial
from pipeline.control.run import Run
from pipeline.naming import CONDITIONS, job_key, remote_id, temp_label, temp_str
from targets.fingerprint import request_checksum
from targets.manifest import BuildManifest


@dataclass(frozen=True)
class PartRef:
    """One part as one trial sees it."""

    trial: str
    owner: str
    jkey: str
    group: str
    temp: float
    condition: str
    index: int
    type: str
    prompt_set: str
    path: Path
    lines: int
    sha256: str
    model: str
    inference_parameters: dict[str, Any]
    request_sha256: str

    @property
    def uid(self) -> str:
        """The part's content address, short: the first 16 hex digits of its request checksum."""
        return self.request_sha256[:16]

    @property
    def shared(self) -> bool:
        return self.owner != self.trial


def prompt_set_suffix(run: Run, prompt_set: str) -> str:
    """Original rule: `_<name>` unless the config has exactly one prompt set and it is called `default`."""
    return "" if (len(run.cfg.prompt_sets) == 1 and prompt_set == "default") else f"_{prompt_set}"


def build_key(prompt_set: str, temp: float) -> str:
    return f"{prompt_set}|{temp_str(temp)}"


def temp_for_label(run: Run, label: str) -> float:
    for t in run.cfg.temps:
        if temp_label(t) == label:
            return t
    raise KeyError(f"run {run.rid} has no temperature with label t{label}")


def inference_parameters(run: Run, trial: Trial, temp: float, type_: str) -> dict[str, Any]:
    """A part's job-level parameters under their Fireworks names, plus `api` (`Provider.served_by`) for anything but
    the real Fireworks API: who answers is part of what a request is (the same messages sent elsewhere, or to the
    emulator, are other requests, so simulated answers are never taken for a real provider's), so it is in the part's
    content address (`request_checksum`) without changing the address of any Fireworks part."""
    params: dict[str, Any] = {"maxTokens": trial.max_tokens_for(type_), "temperature": temp, "n": 1}
    if trial.top_p is not None:
        params["topP"] = trial.top_p
    if trial.top_k is not None:
        params["topK"] = trial.top_k
    if run.cfg.stop:
        params["extraBody"] = json.dumps({"stop": list(run.cfg.stop)})
    if run.cfg.provider.served_by != "fireworks":
        params["api"] = run.cfg.provider.served_by
    return params


def wire_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters a backend sends: `inference_parameters` without the `api` it was addressed with."""
    return {key: value for key, value in params.items() if key != "api"}


def _refs_for(run: Run, build: BuildManifest, trial: Trial) -> list[PartRef]:
    refs: list[PartRef] = []
    for temp in trial.temps:
        entry = build.builds.get(build_key(trial.prompt_set, temp))
        if entry is None:
            raise KeyError(f"batch inputs for prompt set {trial.prompt_set} at T={temp_str(temp)} are not built yet")
        for cond in CONDITIONS:
            for part in entry["parts"][cond]:
                params = inference_parameters(run, trial, temp, part["type"])
                refs.append(PartRef(
                    trial=trial.slug, owner=trial.slug, jkey=job_key(temp, cond, part["index"]),
                    group=f"t{temp_label(temp)}_{cond}", temp=temp, condition=cond, index=part["index"],
                    type=part["type"], prompt_set=trial.prompt_set, path=run.layout.run_dir / part["path"],
                    lines=part["lines"], sha256=part["sha256"], model=trial.model_id,
                    inference_parameters=params,
                    request_sha256=request_checksum(part["sha256"], trial.model_id, params)))
    return refs


def all_parts(run: Run, build: BuildManifest) -> dict[str, list[PartRef]]:
    """Every trial's parts, with owners resolved in config order."""
    owners: dict[str, PartRef] = {}
    out: dict[str, list[PartRef]] = {}
    for trial in run.trials:
        refs = []
        for ref in _refs_for(run, build, trial):
            owner = owners.setdefault(ref.uid, ref)
            refs.append(owner if owner.trial == ref.trial else _as_seen_by(owner, ref.trial))
        out[trial.slug] = refs
    return out


def _as_seen_by(owner: PartRef, trial: str) -> PartRef:
    return PartRef(**{**owner.__dict__, "trial": trial})


def remote_ids(run: Run, ref: PartRef, generation: int, variant: str = "") -> dict[str, str]:
    """Deterministic dataset / job / output dataset ids and display names for one part generation; a `variant`
    (e.g. `resend`, the follow-up batch of a generation's failed requests) gets ids of its own."""
    readable = f"ex-t{temp_label(ref.temp)}-{ref.condition[:4]}-p{ref.index:02d}" + (f"-{variant}" if variant else "")
    tail = f"|{variant}" if variant else ""
    job_key_ = f"{run.rid}|{ref.uid}|{generation}{tail}"
    return {
        "dataset_id": remote_id(readable, key=f"{run.rid}|{ref.sha256}|{generation}{tail}", suffix="in"),
        "job_id": remote_id(readable, key=job_key_),
        "output_dataset_id": remote_id(readable, key=job_key_, suffix="out"),
        "dataset_display_name": f"{readable}-{run.rid[-8:]}"[:63],
        "job_display_name": (f"excellence-t{temp_label(ref.temp)}-{ref.condition}-{run.rid}-p{ref.index:02d}"
                             + (f"-{variant}" if variant else ""))[:63],
    }
