"""Output of the client commands: the SDK's result types as tables, text and JSON.

JSON is the results' own fields (`dataclasses.asdict`): the API's field names, numbers as
numbers, statuses and tiers as their lowercase names. Tables shorten versions to
sha256:<12 hex>; `adapter show` and --json print them whole.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from adapter_store.rollback import describe_policy
from adapter_store.spool import format_bytes
from lora_gateway.client import (
    Adapter,
    AdapterVersion,
    Evaluation,
    Evaluations,
    GenerateResult,
    Residency,
    ResidencyEntry,
    RetentionResult,
    RevokeResult,
    Rollback,
    RollbackPolicy,
    StreamDelta,
    TenantUsage,
    VersionServing,
)


def print_json(value: Any, *, lines: bool = False) -> None:
    """`value` as indented JSON, or on one line with `lines` (JSON lines, flushed)."""
    if lines:
        print(json.dumps(value, sort_keys=True), flush=True)
    else:
        print(json.dumps(value, indent=2, sort_keys=True))


def as_json(result: Any) -> dict[str, Any]:
    """A result dataclass as JSON-ready data."""
    data: dict[str, Any] = dataclasses.asdict(result)
    return data


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def short(version: str) -> str:
    """sha256:<first 12 hex> for tables; full versions are in `show` and --json."""
    return version[: len("sha256:") + 12] if version.startswith("sha256:") else version


def label(tenant: str, name: str) -> str:
    return f"{tenant}/{name}" if tenant else name


# --- generate ---------------------------------------------------------------------------------


def _usage(prompt_tokens: int | None, completion_tokens: int | None) -> dict[str, Any] | None:
    if prompt_tokens is None:
        return None
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


def result_json(result: GenerateResult | StreamDelta) -> dict[str, Any]:
    """A completion or one stream message: usage grouped, as in the API; logprobs when asked."""
    out: dict[str, Any] = {
        "text": result.text,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "adapter": dataclasses.asdict(result.adapter) if result.adapter else None,
        "usage": _usage(result.prompt_tokens, result.completion_tokens),
        "request_id": result.request_id,
    }
    for name in ("logprobs", "prompt_logprobs"):
        entries = getattr(result, name)
        if entries:
            out[name] = [dataclasses.asdict(e) for e in entries]
    return out


# --- adapters ---------------------------------------------------------------------------------


def print_version(info: AdapterVersion, verb: str) -> None:
    print(f"{verb} {label(info.tenant, info.name)} {info.version}")
    print(
        f"  rank {info.rank}, alpha {info.alpha:g}{', rsLoRA' if info.use_rslora else ''}, "
        f"dtype {info.dtype or '?'}, base {info.base_model or '?'}"
    )
    print(f"  targets {','.join(info.target_modules) or '-'}")
    for part in info.composed_from:
        print(f"  part {part.adapter} x {part.weight:g}")
    for f in info.files:
        print(f"  file {f.filename} {format_bytes(f.size)} sha256:{f.sha256}")


def usage_text(usage: TenantUsage) -> str:
    """ "tenant acme: 1.2 MiB of 16.0 GiB stored, 3 of 10000 adapters"."""
    return (
        f"tenant {usage.tenant}: {format_bytes(usage.stored_bytes)} of "
        f"{format_bytes(usage.max_stored_bytes)} stored, {usage.adapters} of "
        f"{usage.max_adapters} adapters"
    )


def print_adapters(adapters: Sequence[Adapter], usage: TenantUsage | None) -> None:
    rows = [
        (
            label(a.tenant, a.name),
            a.status,
            len(a.versions),
            short(a.aliases.get("latest", "")) or "-",
            ",".join(sorted(a.aliases)) or "-",
            ",".join(a.shared_with) or "-",
        )
        for a in adapters
    ]
    table(("ADAPTER", "STATUS", "VERSIONS", "LATEST", "ALIASES", "SHARED WITH"), rows)
    if usage is not None:
        print()
        print(f"usage       {usage_text(usage)}")


def alias_target(info: Adapter, alias: str) -> str:
    """ "sha256:<hex>" of a plain alias; "sha256:<hex> 0.9, sha256:<hex> 0.1" of a weighted
    one (a canary), in version order."""
    split = info.alias_weights.get(alias)
    if split is None:
        return info.aliases.get(alias, "-")
    return ", ".join(f"{version} {weight:g}" for version, weight in sorted(split.items()))


def print_adapter(info: Adapter) -> None:
    """`adapter show` without the evaluations."""
    print_overview(info, None)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


def _aliases_by_version(info: Adapter) -> dict[str, list[str]]:
    """version -> its aliases: `prod` for a plain alias, `prod=0.2` for a share of a weighted
    one."""
    by_version: dict[str, list[str]] = {}
    for alias, version in info.aliases.items():
        split = info.alias_weights.get(alias)
        if split is None:
            by_version.setdefault(version, []).append(alias)
        for weighted, weight in (split or {}).items():
            by_version.setdefault(weighted, []).append(f"{alias}={weight:g}")
    return {version: sorted(aliases) for version, aliases in by_version.items()}


def latest_evaluations(evaluations: Evaluations | None) -> dict[str, Evaluation]:
    """version -> its latest stored result (results are oldest first per version)."""
    latest: dict[str, Evaluation] = {}
    for result in evaluations.results if evaluations is not None else ():
        latest[result.version] = result
    return latest


def _kept(keep_last: int) -> str:
    if not keep_last:
        return "every version (no retention policy)"
    newest = "the newest version" if keep_last == 1 else f"the newest {keep_last} versions"
    return f"{newest} and every aliased one"


def retention_text(info: Adapter) -> str:
    """ "acme/bot keeps the newest 3 versions and every aliased one", or "... keeps every
    version (no retention policy)"."""
    return f"{label(info.tenant, info.name)} keeps {_kept(info.keep_last)}"


def _eval_cells(result: Evaluation | None, current: str | None) -> tuple[str, str, str]:
    if result is None:
        return "-", "-", "-"
    old = "" if current is not None and result.set_sha256 == current else " (old)"
    return (
        f"{result.score:g} ({result.passed}/{result.total})",
        result.set_sha256[:12] + old,
        result.finished_at,
    )


def _serving_cells(serving: VersionServing | None) -> tuple[object, ...]:
    if serving is None:
        return 0, 0, "-", "-", "-", 0
    return (
        serving.requests,
        f"{serving.errors} ({serving.error_rate:.1%})",
        _ms(serving.latency_p50_seconds),
        _ms(serving.latency_p99_seconds),
        _ms(serving.ttft_p50_seconds),
        serving.completion_tokens,
    )


def print_overview(info: Adapter, evaluations: Evaluations | None) -> None:
    """`adapter show`: the adapter, then one row per version (its aliases and weights, its
    latest evaluation, its recent calls on this replica), then each version's details."""
    print(f"adapter     {label(info.tenant, info.name)}")
    print(f"status      {info.status}")
    print(f"shared with {', '.join(info.shared_with) or '-'}")
    if info.usage is not None:
        print(f"usage       {usage_text(info.usage)}")
    print(f"retention   keeps {_kept(info.keep_last)}")
    current = evaluations.current_set if evaluations is not None else None
    if evaluations is not None:
        if current is None:
            print("eval set    none")
        else:
            print(
                f"eval set    {current.sha256} ({current.cases} cases, {current.uploaded_at}, "
                f"{current.uploaded_by})"
            )
        for alias, score in sorted(evaluations.alias_policies.items()):
            print(f"policy      {alias} requires an evaluation score >= {score:g}")
    for alias in sorted(info.aliases):
        print(f"alias       {alias} -> {alias_target(info, alias)}")

    aliases = _aliases_by_version(info)
    latest = latest_evaluations(evaluations)
    serving = {s.version: s for s in info.serving}
    versions = sorted(info.versions, key=lambda v: (v.created_at, v.version))
    current_sha = current.sha256 if current is not None else None
    rows: list[tuple[object, ...]] = [
        (
            short(v.version),
            v.created_at,
            v.status,
            ",".join(aliases.get(v.version, [])) or "-",
            *_eval_cells(latest.get(v.version), current_sha),
            *_serving_cells(serving.get(v.version)),
        )
        for v in versions
    ]
    if "other" in serving:  # versions without series of their own
        rows.append(("other", "-", "-", "-", "-", "-", "-", *_serving_cells(serving["other"])))
    window = max((s.window_seconds for s in info.serving), default=0.0)
    print()
    calls = f"this replica, last {window:.0f}s" if window else "this replica: none recently"
    print(f"versions (oldest first; recent calls: {calls})")
    headers = ("VERSION", "CREATED", "STATUS", "ALIASES", "EVAL", "EVAL SET", "EVALUATED")
    table((*headers, "REQUESTS", "ERRORS", "P50", "P99", "TTFT P50", "TOKENS"), rows)

    details = [
        (
            v.version,
            v.rank,
            f"{v.alpha:g}{' rsLoRA' if v.use_rslora else ''}",
            ",".join(v.target_modules) or "-",
            *_counts(serving.get(v.version)),
        )
        for v in versions
    ]
    print()
    table(("VERSION", "RANK", "ALPHA", "TARGETS", "ERROR CODES", "FINISH"), details)
    print_rollbacks(info)


def _counts(serving: VersionServing | None) -> tuple[str, str]:
    """A version's recent error codes and finish reasons, `NAME=count,...`."""
    if serving is None:
        return "-", "-"
    codes = ",".join(f"{code}={n}" for code, n in serving.error_codes.items())
    finish = ",".join(f"{reason}={n}" for reason, n in serving.finish_reasons.items())
    return codes or "-", finish or "-"


def overview_json(info: Adapter, evaluations: Evaluations | None) -> dict[str, Any]:
    """`adapter show --json`: the adapter (`as_json`), and its evaluation set, alias policies
    and each version's latest result (null / {} when the caller may not read them)."""
    data = as_json(info)
    data["evaluation_set"] = (
        as_json(evaluations.current_set)
        if evaluations is not None and evaluations.current_set is not None
        else None
    )
    data["alias_policies"] = dict(evaluations.alias_policies) if evaluations is not None else {}
    data["latest_evaluations"] = {
        version: as_json(result) for version, result in latest_evaluations(evaluations).items()
    }
    return data


# --- retention --------------------------------------------------------------------------------


def retention_json(info: Adapter, done: RetentionResult | None = None) -> dict[str, Any]:
    """The policy (`keep_last`, 0 = none) and, after a change, what it retired."""
    data: dict[str, Any] = {"tenant": info.tenant, "name": info.name, "keep_last": info.keep_last}
    if done is not None:
        data["retired_versions"] = list(done.retired_versions)
        data["aborted_requests"] = done.aborted_requests
    return data


def print_retention(done: RetentionResult) -> None:
    print(retention_text(done.adapter))
    for version in done.retired_versions:
        print(f"retired {version}")
    if not done.retired_versions:
        print("retired nothing")
    print(f"aborted {done.aborted_requests} in-flight request(s)")


def print_revoked(result: RevokeResult) -> None:
    revoked = ", ".join(result.revoked_versions) or "nothing (already revoked)"
    print(f"revoked {revoked}")
    print(f"aborted {result.aborted_requests} in-flight request(s)")


# --- residency --------------------------------------------------------------------------------


def print_residency(entries: Sequence[ResidencyEntry], figures: Residency | None = None) -> None:
    """A row per entry; with `figures`, the replica's capacity and disk cache after them."""
    rows = [
        (
            label(e.tenant, e.name),
            short(e.version),
            e.tier,
            "yes" if e.pinned else "no",
            e.lora_int_id or "-",
            format_bytes(e.size_bytes),
        )
        for e in entries
    ]
    table(("ADAPTER", "VERSION", "TIER", "PINNED", "LORA ID", "SIZE"), rows)
    if figures is not None:
        print(
            f"\nengine capacity {figures.engine_capacity}; disk cache "
            f"{format_bytes(figures.disk_used_bytes)} of {format_bytes(figures.disk_budget_bytes)}"
        )


# --- evaluations ------------------------------------------------------------------------------


def print_evaluation(result: Evaluation) -> None:
    """One evaluation: its score, then a row per case (failures with their reason)."""
    print(
        f"{short(result.version)} scored {result.score:g} ({result.passed}/{result.total}) on "
        f"set {result.set_sha256[:12]} ({result.engine}, {result.base_model}, "
        f"{result.finished_at})"
    )
    rows = [(c.id, "pass" if c.passed else "FAIL", c.reason or "-") for c in result.cases]
    table(("CASE", "RESULT", "REASON"), rows)


def print_evaluations(info: Evaluations) -> None:
    """The current set, the alias policies, then a row per stored result."""
    current = info.current_set
    if current is None:
        print("evaluation set  none (upload one: adapter eval upload NAME FILE)")
    else:
        print(
            f"evaluation set  {current.sha256} ({current.cases} cases, {current.uploaded_at}, "
            f"{current.uploaded_by})"
        )
    for alias, score in sorted(info.alias_policies.items()):
        print(f"policy          {alias} requires score >= {score:g}")
    rows = [
        (
            short(r.version),
            f"{r.score:g}",
            f"{r.passed}/{r.total}",
            r.set_sha256[:12] + ("" if current and r.set_sha256 == current.sha256 else " (old)"),
            r.finished_at,
            ",".join(c.id for c in r.failures) or "-",
        )
        for r in info.results
    ]
    print()
    table(("VERSION", "SCORE", "PASSED", "SET", "FINISHED", "FAILED"), rows)


# --- automatic rollback -----------------------------------------------------------------------


def policy_text(policy: RollbackPolicy) -> str:
    """ "error rate > 0.2 or length rate > 0.5 over 300s (>= 20 calls); evaluation score < 0.9
    (every 3600s)", as the gateway describes it in its audit records."""
    return describe_policy(policy)


def rollback_text(record: Rollback) -> str:
    """ "2026-01-01T00:00:00Z error_rate 0.5 > 0.2 (16 calls) on sha256:<12>: all weight back
    to sha256:<12> (replica gw-0)" """
    if record.reason == "quarantined":
        why = "quarantined"
    else:
        op = "<" if record.reason == "evaluation" else ">"
        why = f"{record.reason} {record.value:.3g} {op} {record.threshold:g}"
    if record.requests:
        why += f" ({record.requests} calls)"
    return (
        f"{record.at} {why} on {short(record.canary)}: all weight back to "
        f"{short(record.stable)} (replica {record.replica})"
    )


def print_rollbacks(info: Adapter) -> None:
    """Each alias's rollback policy, stable version and last automatic rollback (nothing when
    the adapter has none)."""
    aliases = sorted({*info.rollback_policies, *info.alias_stable, *info.rollbacks})
    if not aliases:
        return
    print()
    for alias in aliases:
        policy = info.rollback_policies.get(alias)
        if policy is not None:
            print(f"rollback    {alias}: {policy_text(policy)}")
        stable = info.alias_stable.get(alias)
        if stable is not None:
            canaries = [v for v in info.alias_weights.get(alias, {}) if v != stable]
            print(
                f"stable      {alias}: {short(stable)}, canary "
                f"{', '.join(short(v) for v in canaries) or '-'}"
            )
        record = info.rollbacks.get(alias)
        if record is not None:
            print(f"rolled back {alias}: {rollback_text(record)}")
