"""Automatic rollback of canaries: each replica watches the weighted aliases it serves.

A tenant-admin sets a rollback policy on an alias (`SetRollbackPolicy`, stored in the manifest:
`adapter_store.rollback`). While the alias splits its weight between its **stable** version (the
one it pointed at before the split) and one or more **canaries** (every other version of the
split), this module rolls it back by itself, moving all weight to the stable version, when a
canary crosses the policy:

- `error_rate`: of the canary's calls in the last `window_s` seconds (at least `min_requests`
  of them), the share that failed on the server's side (`ERROR_CODES`: INTERNAL, UNKNOWN,
  DATA_LOSS, UNAVAILABLE, which is how the engine's own failures of a request reach the
  gateway) is above `max_error_rate`, and above the stable version's share over the same
  window (an outage of the whole engine fails both, and is not the canary's doing). The
  caller's mistakes and choices are not errors: INVALID_ARGUMENT, NOT_FOUND,
  RESOURCE_EXHAUSTED, CANCELLED, DEADLINE_EXCEEDED, ABORTED (revoked while running) ...
- `length_rate`: the share of those calls that finished by `length` (they ran into their
  max_tokens instead of stopping) is above `max_length_rate`;
- `evaluation`: the canary's latest evaluation on the adapter's current set scored below
  `min_eval_score`; such an evaluation is re-run on a schedule (`eval_interval_s`);
- `quarantined`: the runtime canary quarantined the canary version (with any policy).

What counts: the calls that the canary version served (through any alias, or named by its sha)
for its **owner tenant**, on this replica, since the alias's last automatic rollback. A grantee's
calls never count, so another tenant's traffic cannot move an alias; evaluation cases do not
count either. Each replica decides from its own calls (`CallWindows`, fed by the gateway core
with no I/O) for the manifests it has cached, every `rollback_check_interval_s`
(`RollbackGuard`). The move is a conditional manifest write that succeeds only if the split is
still the one decided on (`Registry.rollback`): two replicas deciding at once make one move,
and the loser re-reads and sees it done. Other replicas take it from the change feed within the
propagation bound, like any alias move.

Scheduled evaluations: a canary whose latest result on the current set is older than
`eval_interval_s` (or has none) is evaluated again, by the replica that first claims it in the
manifest (`Registry.claim_evaluation`): one run per interval across the replicas. They run
exactly like `EvaluateAdapter` (`Adapters.scheduled_evaluation`), at most
`evaluation_max_concurrent` at once on a gateway, one case at a time, as the owner tenant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from adapter_store import Manifest, StoreError
from adapter_store.evaluations import MAX_RESULTS_PER_VERSION
from adapter_store.model import utc_now
from adapter_store.rollback import RollbackPolicy, RollbackRecord, canaries, timestamp_us
from lora_gateway import errors
from lora_gateway.adapters import Adapters
from lora_gateway.metrics import VersionCall

__all__ = [
    "ERROR_CODES",
    "WINDOW_CALLS",
    "CallWindows",
    "Decision",
    "RollbackGuard",
    "WindowStats",
    "decide",
    "watched",
]

log = logging.getLogger(__name__)

#: The codes that count as the version's own failures (see the module docstring).
ERROR_CODES = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNAVAILABLE"})
#: Most recent calls kept per watched version (older ones fall out of the window early).
WINDOW_CALLS = 4096

_Key = tuple[str, str, str]  # owner, adapter name, version sha (hex)


@dataclass(frozen=True)
class WindowStats:
    """A version's calls since some time: how many, how many failed, how many hit `length`."""

    requests: int = 0
    errors: int = 0
    lengths: int = 0


def watched(manifest: Manifest, sha: str) -> bool:
    """Is `sha` in the split of a weighted alias that has a stable version and a policy?"""
    return any(
        sha in split and alias in manifest.rollback_policies and alias in manifest.alias_stable
        for alias, split in manifest.alias_weights.items()
    )


class CallWindows:
    """The recent calls of the versions a rollback policy watches, per (owner, name, sha):
    when, whether it failed (`ERROR_CODES`), whether it finished by `length`. Only the owner
    tenant's calls, never an evaluation's. In memory, on the event loop; at most
    `most` calls per version, and only versions `watched` at the call (the guard drops the
    others at each check)."""

    def __init__(self, most: int = WINDOW_CALLS, clock: Callable[[], float] = time.time) -> None:
        self.most = most
        self.clock = clock
        self._calls: dict[_Key, deque[tuple[float, bool, bool]]] = {}

    def record(self, call: VersionCall, manifest: Manifest | None) -> None:
        """`Gateway.version_observers`' signature: one finished call."""
        if manifest is None or call.evaluation or call.tenant != call.owner:
            return
        sha = call.version.removeprefix("sha256:")
        if not watched(manifest, sha):
            return
        key = (call.owner, call.name, sha)
        ring = self._calls.get(key)
        if ring is None:
            ring = self._calls[key] = deque(maxlen=self.most)
        ring.append((self.clock(), call.code in ERROR_CODES, call.finish_reason == "length"))

    def stats(self, owner: str, name: str, sha: str, since: float) -> WindowStats:
        """The version's calls recorded at `since` (wall-clock seconds) or later."""
        ring = self._calls.get((owner, name, sha), ())
        recent = [c for c in ring if c[0] >= since]
        return WindowStats(
            requests=len(recent),
            errors=sum(1 for c in recent if c[1]),
            lengths=sum(1 for c in recent if c[2]),
        )

    def keep(self, keys: set[_Key]) -> None:
        """Forget every version but these."""
        for key in [k for k in self._calls if k not in keys]:
            del self._calls[key]

    def __len__(self) -> int:
        return len(self._calls)


@dataclass(frozen=True)
class Decision:
    """Roll `alias` back to `stable`: `canary` crossed `reason`'s threshold."""

    alias: str
    canary: str
    stable: str
    reason: str
    value: float
    threshold: float
    requests: int = 0


def decide(
    manifest: Manifest,
    alias: str,
    policy: RollbackPolicy,
    stats: Callable[[str, float], WindowStats],
    now: float,
) -> Decision | None:
    """Should `alias` be rolled back now? `stats(sha, since)` gives a version's calls since a
    time. Pure: the rules of the module docstring, canaries in sha order, the first rule
    crossed wins. None when the alias is not split, has no stable version, or its stable
    version cannot serve (there is nothing to roll back to)."""
    split = manifest.alias_weights.get(alias)
    stable = manifest.alias_stable.get(alias)
    if split is None or stable is None or stable not in split:
        return None
    target = manifest.versions.get(stable)
    if target is None or target.status != "active":
        return None
    since = now - policy.window_s
    last = manifest.rollbacks.get(alias)
    if last is not None:
        since = max(since, last.at_us / 1_000_000)
    base = stats(stable, since)
    base_rate = base.errors / base.requests if base.requests else 0.0
    for sha in canaries(split, stable):
        version = manifest.versions.get(sha)
        if version is not None and version.status == "quarantined":
            return Decision(alias, sha, stable, "quarantined", 1.0, 0.0)
        seen = stats(sha, since)
        if seen.requests >= policy.min_requests:
            rate = seen.errors / seen.requests
            limit = policy.max_error_rate
            if limit is not None and rate > limit and rate > base_rate:
                return Decision(alias, sha, stable, "error_rate", rate, limit, seen.requests)
            share = seen.lengths / seen.requests
            limit = policy.max_length_rate
            if limit is not None and share > limit:
                return Decision(alias, sha, stable, "length_rate", share, limit, seen.requests)
        latest = _latest_score(manifest, sha)
        floor = policy.min_eval_score
        if floor is not None and latest is not None and latest < floor:
            return Decision(alias, sha, stable, "evaluation", latest, floor)
    return None


def _latest_score(manifest: Manifest, sha: str) -> float | None:
    current = manifest.evaluation_set
    if current is None:
        return None
    runs = [r for r in manifest.evaluations.get(sha, ()) if r.set_sha == current.sha]
    return runs[-1].score if runs else None


def _latest_finished(manifest: Manifest, sha: str) -> float | None:
    """Seconds since the epoch when `sha`'s latest result on the current set finished."""
    current = manifest.evaluation_set
    runs = [r for r in manifest.evaluations.get(sha, ()) if current and r.set_sha == current.sha]
    return timestamp_us(runs[-1].finished_at) / 1_000_000 if runs else None


class RollbackGuard:
    """Checks this replica's canaries every `rollback_check_interval_s` and rolls back, or
    starts a scheduled evaluation, through the admin core (`Adapters`)."""

    def __init__(self, adapters: Adapters, windows: CallWindows | None = None) -> None:
        self.adapters = adapters
        self.gateway = adapters.gateway
        self.windows = windows if windows is not None else CallWindows()
        #: Who decides, in records and claims: this host (a pod's name in Kubernetes).
        self.replica = socket.gethostname()[:64] or "gateway"
        self._evaluating: dict[_Key, asyncio.Task[None]] = {}
        self._full: set[_Key] = set()

    @property
    def evaluating(self) -> int:
        """Scheduled evaluations this replica is running now."""
        return len(self._evaluating)

    def attach(self) -> None:
        """Feed the call windows from the gateway core."""
        self.gateway.version_observers.append(self.windows.record)

    async def run(self, stop: asyncio.Event) -> None:
        every = self.gateway.settings.rollback_check_interval_s
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every)
                if stop.is_set():
                    return
                try:
                    await self.check_once()
                except Exception:  # a check's bug or a store hiccup: the next check runs
                    log.exception("automatic rollback check failed")
        finally:
            running = list(self._evaluating.values())
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def check_once(self, now: float | None = None) -> list[Decision]:
        """One pass over the cached manifests with a policy on a split alias: the rollbacks
        this replica wrote (decisions another replica or the tenant got to first are not
        returned)."""
        now = time.time() if now is None else now
        keep: set[_Key] = set()
        done: list[Decision] = []
        for manifest in list(self.gateway.residency.manifests.cached.values()):
            if manifest.status != "active" or not manifest.rollback_policies:
                continue
            for alias, policy in sorted(manifest.rollback_policies.items()):
                split = manifest.alias_weights.get(alias)
                stable = manifest.alias_stable.get(alias)
                if split is None or stable is None:
                    continue
                keep.update((manifest.tenant, manifest.name, sha) for sha in split)
                decision = decide(manifest, alias, policy, self._stats_of(manifest), now)
                if decision is None:
                    self._schedule(manifest, policy, canaries(split, stable), now)
                elif await self._roll_back(manifest, decision, split):
                    done.append(decision)
        self.windows.keep(keep)
        return done

    def _stats_of(self, manifest: Manifest) -> Callable[[str, float], WindowStats]:
        def stats(sha: str, since: float) -> WindowStats:
            return self.windows.stats(manifest.tenant, manifest.name, sha, since)

        return stats

    async def _roll_back(
        self, manifest: Manifest, decision: Decision, split: Mapping[str, float]
    ) -> bool:
        record = RollbackRecord(
            at=utc_now(),
            at_us=time.time_ns() // 1000,
            canary=decision.canary,
            stable=decision.stable,
            split=dict(split),
            reason=decision.reason,
            value=decision.value,
            threshold=decision.threshold,
            requests=decision.requests,
            by=self.replica,
        )
        try:
            return await self.adapters.auto_rollback(
                manifest.tenant, manifest.name, decision.alias, split, record
            )
        except (StoreError, errors.GatewayError) as exc:
            log.error(
                "automatic rollback of %s/%s@%s not written (tried again at the next check): %s",
                manifest.tenant,
                manifest.name,
                decision.alias,
                exc,
            )
            return False

    def _schedule(
        self, manifest: Manifest, policy: RollbackPolicy, watched: list[str], now: float
    ) -> None:
        """Start the scheduled evaluations that are due (the manifest's claim decides which
        replica runs each); never more than the evaluator has room for."""
        if policy.min_eval_score is None or manifest.evaluation_set is None:
            return
        for sha in watched:
            key = (manifest.tenant, manifest.name, sha)
            if key in self._evaluating:
                continue
            finished = _latest_finished(manifest, sha)
            if finished is not None and now - finished < policy.eval_interval_s:
                continue
            claim = manifest.evaluation_claims.get(sha)
            if claim is not None and now - claim.at_us / 1_000_000 < policy.eval_interval_s:
                continue
            if len(manifest.evaluations.get(sha, ())) >= MAX_RESULTS_PER_VERSION:
                if key not in self._full:
                    self._full.add(key)
                    log.warning(
                        "canary %s/%s@sha256:%s has %d evaluations, the most kept: its "
                        "scheduled evaluations stop (its other rollback rules still apply)",
                        *key,
                        MAX_RESULTS_PER_VERSION,
                    )
                continue
            if not self.adapters.evaluation_has_room(manifest.tenant):
                return
            task = asyncio.create_task(self._evaluate(key, policy))
            self._evaluating[key] = task

    async def _evaluate(self, key: _Key, policy: RollbackPolicy) -> None:
        tenant, name, sha = key
        try:
            await self.adapters.scheduled_evaluation(
                tenant,
                name,
                sha,
                interval_s=policy.eval_interval_s,
                by=self.replica,
                min_score=policy.min_eval_score or 0.0,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the next interval tries again
            log.warning(
                "scheduled evaluation of %s/%s@sha256:%s failed: %s", tenant, name, sha, exc
            )
        finally:
            self._evaluating.pop(key, None)
