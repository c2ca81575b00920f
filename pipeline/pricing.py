"""Rates for pricing tokens: which per-million-token rates apply to a trial's model, and where each came from.

Pricing config (original-compatible): `input_per_million` / `output_per_million` are fallback standard rates,
`batch_discount` is a multiplier on standard rates for batch use, and `providers[provider][model]` entries hold
`input_per_mtok`, `output_per_mtok`, `input_per_mtok_batch`, `output_per_mtok_batch`, `batch_discount`.

Rate rules (fixing the original):
- the model priced is the one the caller passes (the trial's), never a config-wide default;
- provider and model keys are looked up exactly, then case-insensitively;
- with `use_batch_api`, an explicit batch rate is used as is (never discounted again); a side without one gets
  its standard rate times the entry's discount (else the global one);
- a discount of None, 0 or 1 means "no discount" (0 never makes a run free);
- without `use_batch_api`, standard rates are used; an entry that only has batch rates is priced at those;
- a model served by a `local` server without an entry costs 0 (rate_type `local`): nothing is billed.

Cached prompt tokens (`cache_read_tokens` / `cache_write_tokens` of predictions.csv) have their own rates:
- an entry's `cache_read_per_mtok` / `cache_write_per_mtok` (and `*_batch` variants) follow the input/output rules
  above: with `use_batch_api` an explicit batch rate is used as is, else the standard one times the discount;
- a side without an explicit rate is the effective input rate (after the batch rule) times the entry's
  `cache_read_multiplier` / `cache_write_multiplier`, else the provider's default in `CACHE_MULTIPLIERS`:
  anthropic reads 0.1×, writes 1.25× (5-minute cache writes); openai cached input 0.5× (OpenAI bills no cache
  writes: 1×); any other provider 1× (a cached token costs what an input token does, as before caching was priced);
- without an entry the fallback input rate is used the same way (a local server's 0 stays 0).
"""

from __future__ import annotations

from typing import Any

# Same defaults as pipeline.control.config.Pricing, for plain dicts that omit a key.
DEFAULT_INPUT_PER_MILLION = 0.15
DEFAULT_OUTPUT_PER_MILLION = 0.60
DEFAULT_BATCH_DISCOUNT = 0.5
CACHE_MULTIPLIERS: dict[str, tuple[float, float]] = {"anthropic": (0.1, 1.25), "openai": (0.5, 1.0)}
"""Default (cache read, cache write) multipliers on the effective input rate, per provider; others: (1, 1)."""
CACHE_SIDES = ("cache_read", "cache_write")

def _lookup(table: Any, key: str) -> tuple[str, Any] | None:
    """(matched key, value) for `key` in `table`: exact match first, then case-insensitive (first in sorted order)."""
    if not isinstance(table, dict):
        return None
    if key in table:
        return key, table[key]
    lowered = key.lower()
    for candidate in sorted(table, key=str):
        if str(candidate).lower() == lowered:
            return candidate, table[candidate]
    return None


def _effective_discount(value: Any) -> float | None:
    """The multiplier to apply, or None when the configured value means "no discount" (None, 0, 1)."""
    if value is None:
        return None
    factor = float(value)
    return None if factor in (0.0, 1.0) else factor


def _rate(
    entry: dict[str, Any], side: str, where: str, use_batch_api: bool, discount: float | None, discount_where: str
) -> tuple[float, str, str]:
    """(rate, kind, source) for `side` ("input"/"output") of a table entry; kind is standard|batch|batch_discount."""
    standard_key, batch_key = f"{side}_per_mtok", f"{side}_per_mtok_batch"
    standard = entry.get(standard_key)
    batch = entry.get(batch_key)
    if batch is not None and use_batch_api:
        return float(batch), "batch", f"{where}.{batch_key}"
    if batch is not None and standard is None:
        return float(batch), "batch", f"{where}.{batch_key} (no {standard_key} in the table)"
    if standard is None:
        raise ValueError(f"{where} has neither {standard_key} nor {batch_key}")
    if use_batch_api and discount is not None:
        return float(standard) * discount, "batch_discount", f"{where}.{standard_key} × {discount_where} ({discount:g})"
    return float(standard), "standard", f"{where}.{standard_key}"


def _cache_rate(
    entry: dict[str, Any], side: str, where: str, use_batch_api: bool, discount: float | None, discount_where: str,
    *, provider: str, in_rate: float,
) -> tuple[float, str | None, str]:
    """(rate, kind, source) for `side` ("cache_read"/"cache_write"): an explicit rate of the entry by `_rate`'s rules
    (kind as there), else `in_rate` (the effective input rate) times the entry's or the provider's multiplier (kind
    None: it follows the input rate)."""
    if entry.get(f"{side}_per_mtok") is not None or entry.get(f"{side}_per_mtok_batch") is not None:
        return _rate(entry, side, where, use_batch_api, discount, discount_where)
    multiplier = entry.get(f"{side}_multiplier")
    if multiplier is not None:
        return in_rate * float(multiplier), None, f"input rate × {where}.{side}_multiplier ({float(multiplier):g})"
    default = CACHE_MULTIPLIERS.get(provider.lower(), (1.0, 1.0))[CACHE_SIDES.index(side)]
    return in_rate * default, None, f"input rate × {default:g} (default for provider {provider})"


def resolve_rates(pricing: dict[str, Any], *, provider: str, model: str, use_batch_api: bool) -> dict[str, Any]:
    """The rates used to price `model` served by `provider` (see module docstring for the rules).

    Returns `{provider, model_key, input_rate_per_mtok, output_rate_per_mtok, cache_read_rate_per_mtok,
    cache_write_rate_per_mtok, rate_type, table_found, use_batch_api, source}`; rate_type is standard | batch |
    batch_discount | default | default_batch | local (of the input/output rates and any explicit cache rate), and
    `source` names the config keys (and multipliers) each rate came from.
    """
    global_discount = pricing.get("batch_discount", DEFAULT_BATCH_DISCOUNT)
    provider_hit = _lookup(pricing.get("providers") or {}, provider)
    entry_hit = _lookup(provider_hit[1], model) if provider_hit else None
    result: dict[str, Any] = {"provider": provider_hit[0] if provider_hit else provider, "use_batch_api": use_batch_api}
    if provider_hit and entry_hit:
        model_key, entry = entry_hit
        where = f"pricing.providers.{provider_hit[0]}[{model_key!r}]"
        if entry.get("batch_discount") is not None:
            discount, discount_where = _effective_discount(entry["batch_discount"]), f"{where}.batch_discount"
        else:
            discount, discount_where = _effective_discount(global_discount), "pricing.batch_discount"
        in_rate, in_kind, in_source = _rate(entry, "input", where, use_batch_api, discount, discount_where)
        out_rate, out_kind, out_source = _rate(entry, "output", where, use_batch_api, discount, discount_where)
        cache = {side: _cache_rate(entry, side, where, use_batch_api, discount, discount_where,
                                   provider=str(provider_hit[0]), in_rate=in_rate) for side in CACHE_SIDES}
        kinds = {in_kind, out_kind, *(kind for _, kind, _ in cache.values() if kind)}
        # A mixed pair (one side explicit, the other derived) reports the most derived kind; `source` has the detail.
        rate_type = next(kind for kind in ("batch_discount", "batch", "standard") if kind in kinds)
        result.update(model_key=model_key, table_found=True)
    elif provider == "local":
        in_rate = out_rate = 0.0
        in_source = out_source = "a local server bills nothing (add pricing.providers.local to price it)"
        cache = {side: (0.0, None, in_source) for side in CACHE_SIDES}
        rate_type = "local"
        result.update(model_key=model, table_found=False)
    else:
        discount = _effective_discount(global_discount) if use_batch_api else None
        in_rate = float(pricing.get("input_per_million", DEFAULT_INPUT_PER_MILLION))
        out_rate = float(pricing.get("output_per_million", DEFAULT_OUTPUT_PER_MILLION))
        in_source, out_source = "pricing.input_per_million", "pricing.output_per_million"
        rate_type = "default"
        if discount is not None:
            in_rate, out_rate, rate_type = in_rate * discount, out_rate * discount, "default_batch"
            in_source += f" × pricing.batch_discount ({discount:g})"
            out_source += f" × pricing.batch_discount ({discount:g})"
        cache = {side: _cache_rate({}, side, "pricing", use_batch_api, None, "", provider=provider, in_rate=in_rate)
                 for side in CACHE_SIDES}
        result.update(model_key=model, table_found=False)
    (read_rate, _, read_source), (write_rate, _, write_source) = cache["cache_read"], cache["cache_write"]
    result.update(input_rate_per_mtok=in_rate, output_rate_per_mtok=out_rate, cache_read_rate_per_mtok=read_rate,
                  cache_write_rate_per_mtok=write_rate, rate_type=rate_type,
                  source=f"input: {in_source}; output: {out_source}; cache read: {read_source}; "
                         f"cache write: {write_source}")
    return {key: result[key] for key in ("provider", "model_key", "input_rate_per_mtok", "output_rate_per_mtok",
                                         "cache_read_rate_per_mtok", "cache_write_rate_per_mtok", "rate_type",
                                         "table_found", "use_batch_api", "source")}


def pricing_args(cfg: Any, model: str) -> dict[str, Any]:
    """`resolve_rates` keyword arguments for a trial's `model` under an ExperimentConfig: the emulator is priced as
    the provider whose API it speaks (`provider.api`), and `provider.pricing_key` (when set) replaces the model key."""
    provider = cfg.provider.api
    return {"pricing": cfg.pricing.model_dump(), "provider": provider, "model": cfg.provider.pricing_key or model,
            "use_batch_api": cfg.use_batch_api}


def unlisted_models(cfg: Any, models: Any) -> list[str]:
    """The models among `models` that `pricing.providers` has no entry for (they would get the fallback rates; a
    local server's models cost 0 without one)."""
    return sorted({m for m in models
                   if resolve_rates(**pricing_args(cfg, m))["rate_type"] in ("default", "default_batch")})


def unlisted_message(cfg: Any, models: list[str]) -> str:
    provider = pricing_args(cfg, models[0])["provider"]
    return (f"model(s) {', '.join(models)} have no rates in pricing.providers.{provider}: they would be priced at the "
            f"fallback rates (${cfg.pricing.input_per_million:g} / ${cfg.pricing.output_per_million:g} per 1M "
            "tokens), so the budget and costs could be wrong. Add them to the pricing table (or fix a misspelt "
            "model), or set pricing.allow_unlisted_models: true")
