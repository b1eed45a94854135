"""What each caller may hold at once and how fast it may go; never queues, full means refused.

Fairness between tenants comes from per-tenant caps (`Admission`): one tenant can hold at most its
own `max_concurrent` of the server's `max_concurrent_requests` slots, so a busy tenant is refused
(RESOURCE_EXHAUSTED) before it starves the others. Nothing queues in the gateway: a refused
request is answered at once, and the client's retry policy decides what happens next.

What each caller may hold at once, and what stops it (DESIGN invariant 11):

- anyone (no credentials): Health/Watch and reflection streams open at once, per peer address
  and in total (`RpcLimits.public_stream`);
- a tenant: Generate requests in flight, its `max_concurrent` and the server's total
  (`Admission.slot`);
- a tenant: Generate requests and generated tokens per minute (`Admission.slot`, token buckets);
- a tenant: other RPCs in progress (admin, reads), per tenant and in total (`RpcLimits.rpc`);
- a tenant: uploads and compositions in progress, `max_concurrent_uploads` (`Admission.upload`).

A tenant's own limits are a `TenantConfig`: the fields of `config.TenantDefaults`, from its entry
in the tenants file or the defaults (`keys.KeyRing.tenant`). Storage quotas (`max_stored_bytes`,
`max_adapters`) are enforced by the store (`adapter_store.quota`), engine slots and pins by
residency: this module holds what is counted in memory.

Rates are token buckets holding one minute's worth: `requests_per_minute` takes one token per
Generate, `tokens_per_minute` reserves the request's `max_tokens` at admission and gives back
what was not generated when the request ends. A refusal carries `retry_after_s`, the time until
the bucket holds enough again (sent as `retry-after` trailing metadata).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

from pydantic import BaseModel

from lora_gateway.config import TenantDefaults
from lora_gateway.errors import InvalidArgument, ResourceExhausted
from lora_gateway.tenancy.policy import Principal

__all__ = [
    "Admission",
    "Hold",
    "RpcLimits",
    "Slot",
    "TenantConfig",
    "check_max_tokens",
    "retry_after_seconds",
]


class TenantConfig(TenantDefaults):
    """One tenant's limits: the fields of `config.TenantDefaults`, and the tenant's name.

    `TenantConfig("acme", max_concurrent=8)`: the name, then any limits (the others take the
    model's defaults; `from_defaults` takes the server's).
    """

    name: str
    """The tenant these limits are of."""

    def __init__(self, name: str, /, **limits: int) -> None:
        BaseModel.__init__(self, name=name, **limits)

    @classmethod
    def from_defaults(cls, name: str, defaults: TenantDefaults, **limits: int) -> TenantConfig:
        """The limits of tenant `name`: `limits` where given, else `defaults`."""
        return cls(name, **{**defaults.model_dump(include=set(_LIMITS)), **limits})


_LIMITS = frozenset(TenantDefaults.model_fields)


def check_max_tokens(requested: int, tenant: TenantConfig) -> None:
    """Raise ResourceExhausted if a request asks for more tokens than its tenant allows."""
    if requested > tenant.max_tokens:
        raise ResourceExhausted(
            f"max_tokens {requested} exceeds the limit of tenant {tenant.name} "
            f"({tenant.max_tokens} tokens per request)"
        )


def _check_cap(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"{what} must be an integer >= 1, got {value!r}")


class _Scoped:
    """A sync and async context manager: `_enter` on entry, `_exit` on exit, whatever the exit
    (error, cancellation)."""

    def _enter(self) -> None:
        pass

    def _exit(self) -> None:
        pass

    def __enter__(self) -> Self:
        self._enter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._exit()

    async def __aenter__(self) -> Self:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self._exit()


class Hold(_Scoped):
    """Something counted while in use (an upload, an RPC, a stream); a sync and async context
    manager. Released on exit, whatever the exit (error, cancellation); `release` is idempotent.
    """

    def __init__(self, release: Callable[[], object]) -> None:
        self._release: Callable[[], object] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def _exit(self) -> None:
        self.release()


class _Counts:
    """In-flight counts per key under a per-key cap and a total cap. Single event loop (or one
    thread): no awaits between check and increment, so no lock is needed."""

    def __init__(self, total_cap: int | None = None) -> None:
        self.total_cap = total_cap
        self.by_key: dict[str, int] = {}
        self.total = 0

    def full(self, key: str, cap: int) -> str | None:
        """Why one more for `key` is refused: "key" (its own cap), "total", or None (room)."""
        if self.by_key.get(key, 0) >= cap:
            return "key"
        if self.total_cap is not None and self.total >= self.total_cap:
            return "total"
        return None

    def hold(self, key: str, cap: int, refusal: Callable[[str], Exception]) -> Hold:
        """Count one for `key` until the returned hold is released, or raise `refusal(why)`
        (`why` as from `full`) when there is no room."""
        full = self.full(key, cap)
        if full is not None:
            raise refusal(full)
        self.add(key)
        return Hold(functools.partial(self.remove, key))

    def add(self, key: str) -> int:
        count = self.by_key.get(key, 0) + 1
        self.by_key[key] = count
        self.total += 1
        return count

    def remove(self, key: str) -> int:
        count = self.by_key[key] - 1
        if count:
            self.by_key[key] = count
        else:
            del self.by_key[key]
        self.total -= 1
        return count


@dataclass
class _Bucket:
    """A token bucket holding at most one minute's worth of `per_minute`."""

    level: float
    stamp: float

    def refill(self, per_minute: int, now: float) -> None:
        elapsed = max(0.0, now - self.stamp)
        self.level = min(float(per_minute), self.level + elapsed * per_minute / 60.0)
        self.stamp = now

    def wait_for(self, amount: float, per_minute: int) -> float:
        """Seconds until the bucket holds `amount` (0 when it already does)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / per_minute


def retry_after_seconds(seconds: float) -> int:
    """A `retry-after` value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(round(seconds, 6)))


class Admission:
    """Per-tenant and global caps on concurrent requests, per-tenant rates, and per-tenant caps
    on uploads in progress. Never queues: full means refused.

    Single event loop, no awaits between check and increment, so no lock is needed. `on_change`
    (e.g. `Metrics.set_inflight`) is called with (tenant, in-flight count) on every change.
    `clock` (monotonic seconds) drives the rate buckets. `on_refused` (e.g. `Metrics.refused`)
    is called with "rate" or "uploads" when a rate or the upload cap refuses.
    """

    def __init__(
        self,
        max_total: int,
        on_change: Callable[[str, int], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        _check_cap("max_total", max_total)
        self.max_total = max_total
        self._on_change = on_change
        self._on_refused = on_refused
        self._clock = clock
        self._requests = _Counts(max_total)
        self._uploads = _Counts()
        self._request_rate: dict[str, _Bucket] = {}
        self._token_rate: dict[str, _Bucket] = {}

    def slot(self, principal: Principal, tenant: TenantConfig, *, tokens: int = 0) -> Slot:
        """A slot for one request of `principal`, limited by `tenant` (its own tenant's config).

        `tokens` is the request's max_tokens: reserved from the tenant's `tokens_per_minute`
        bucket on entry; what was not generated (`Slot.generated`) goes back on exit.

        Use as `async with admission.slot(p, keyring.tenant(p.tenant), tokens=n):` (or plain
        `with`). Entering raises ResourceExhausted at once when the tenant or the server is full,
        or the tenant is over its rate (then with `retry_after_s`); the slot is released on exit,
        whatever the exit (error, cancellation).
        """
        if tenant.name != principal.tenant:
            raise ValueError("slot(): tenant config must be the principal's own tenant's")
        return Slot(self, tenant, tokens)

    def upload(self, principal: Principal, tenant: TenantConfig) -> Hold:
        """Count one upload or composition of `principal`'s tenant while it runs.

        Raises ResourceExhausted at once when the tenant already has `max_concurrent_uploads`.
        """
        if tenant.name != principal.tenant:
            raise ValueError("upload(): tenant config must be the principal's own tenant's")
        name, cap = tenant.name, tenant.max_concurrent_uploads

        def refusal(_: str) -> ResourceExhausted:
            self._refused("uploads")
            return ResourceExhausted(
                f"tenant {name} has {self._uploads.by_key.get(name, 0)} uploads or compositions "
                f"in progress (limit {cap}); try again when one finishes"
            )

        return self._uploads.hold(name, cap, refusal)

    def in_flight(self, tenant: str) -> int:
        return self._requests.by_key.get(tenant, 0)

    def uploads_in_progress(self, tenant: str) -> int:
        return self._uploads.by_key.get(tenant, 0)

    @property
    def total_in_flight(self) -> int:
        return self._requests.total

    def _acquire(self, tenant: TenantConfig, tokens: int) -> None:
        name = tenant.name
        full = self._requests.full(name, tenant.max_concurrent)
        if full == "key":
            raise ResourceExhausted(
                f"tenant {name} has {self.in_flight(name)} requests in flight "
                f"(limit {tenant.max_concurrent})"
            )
        if full == "total":
            raise ResourceExhausted(
                f"server is at capacity ({self._requests.total} requests in flight)"
            )
        self._take_rates(tenant, tokens)
        self._notify(name, self._requests.add(name))

    def _take_rates(self, tenant: TenantConfig, tokens: int) -> None:
        """Take one request and `tokens` tokens from the tenant's buckets, or refuse."""
        now = self._clock()
        rpm, tpm = tenant.requests_per_minute, tenant.tokens_per_minute
        if tpm and tokens > tpm:
            raise ResourceExhausted(
                f"max_tokens {tokens} exceeds the rate limit of tenant {tenant.name} "
                f"({tpm} generated tokens per minute)"
            )
        requests = self._bucket(self._request_rate, tenant.name, rpm, now) if rpm else None
        generated = self._bucket(self._token_rate, tenant.name, tpm, now) if tpm else None
        waits: list[tuple[float, str]] = []
        if requests is not None:
            wait = requests.wait_for(1, rpm)
            if wait > 0:
                waits.append((wait, f"{rpm} requests per minute"))
        if generated is not None and tokens > 0:
            wait = generated.wait_for(tokens, tpm)
            if wait > 0:
                waits.append((wait, f"{tpm} generated tokens per minute"))
        if waits:
            self._refused("rate")
            wait, what = max(waits)
            after = retry_after_seconds(wait)
            raise ResourceExhausted(
                f"tenant {tenant.name} is over its rate limit of {what}; retry after {after} s",
                retry_after_s=after,
            )
        if requests is not None:
            requests.level -= 1
        if generated is not None:
            generated.level -= tokens

    def _bucket(
        self, buckets: dict[str, _Bucket], tenant: str, per_minute: int, now: float
    ) -> _Bucket:
        bucket = buckets.get(tenant)
        if bucket is None:
            bucket = buckets[tenant] = _Bucket(float(per_minute), now)
        bucket.refill(per_minute, now)
        return bucket

    def _release(self, tenant: TenantConfig, unused_tokens: int) -> None:
        name = tenant.name
        if unused_tokens > 0 and tenant.tokens_per_minute:
            bucket = self._token_rate.get(name)
            if bucket is not None:
                bucket.refill(tenant.tokens_per_minute, self._clock())
                bucket.level = min(float(tenant.tokens_per_minute), bucket.level + unused_tokens)
        self._notify(name, self._requests.remove(name))

    def _notify(self, tenant: str, count: int) -> None:
        if self._on_change is not None:
            self._on_change(tenant, count)

    def _refused(self, limit: str) -> None:
        if self._on_refused is not None:
            self._on_refused(limit)


class Slot(_Scoped):
    """One admitted request; a sync and async context manager. Single use.

    `generated(n)` records tokens produced, so that the unused part of the `tokens_per_minute`
    reservation goes back to the tenant's bucket on exit.
    """

    def __init__(self, admission: Admission, tenant: TenantConfig, tokens: int = 0) -> None:
        self._admission = admission
        self._tenant = tenant
        self._tokens = max(0, tokens)
        self._generated = 0
        self._held = False
        self._used = False

    def generated(self, count: int) -> None:
        self._generated += count

    def _enter(self) -> None:
        if self._held or self._used:
            raise RuntimeError("slot already entered")
        self._admission._acquire(self._tenant, self._tokens)
        self._held = self._used = True

    def _exit(self) -> None:
        if self._held:
            self._held = False
            self._admission._release(self._tenant, self._tokens - self._generated)


# --- RPC limits (every RPC but Generate, which `Admission` limits) ---------------------------


class RpcLimits:
    """What unauthenticated callers and tenants' non-Generate RPCs may hold at once.

    - Public streams (Health/Watch, reflection: no credentials, and they stay open) are capped
      per peer address and in total, so they can never use up what authenticated traffic and
      probes need. Unary public calls (Health/Check) hold nothing and are not capped.
    - Authenticated RPCs other than Generate (admin, reads, uploads) are capped per tenant and
      in total; Generate has its own admission (`Admission`), so a flood of one RPC kind from
      one tenant starves neither another tenant nor anyone's Generate.

    gRPC's own `maximum_concurrent_rpcs` is not used: when it is reached, grpc.aio stops taking
    new calls, which then wait until their deadline (measured: 256 Watch streams made Generate
    and Health/Check end in DEADLINE_EXCEEDED). These caps answer RESOURCE_EXHAUSTED at once.
    """

    def __init__(
        self,
        *,
        max_public_streams: int,
        max_public_streams_per_peer: int,
        max_rpcs: int,
        max_rpcs_per_tenant: int,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        for what, value in (
            ("max_public_streams", max_public_streams),
            ("max_public_streams_per_peer", max_public_streams_per_peer),
            ("max_rpcs", max_rpcs),
            ("max_rpcs_per_tenant", max_rpcs_per_tenant),
        ):
            _check_cap(what, value)
        self.max_public_streams_per_peer = max_public_streams_per_peer
        self.max_rpcs_per_tenant = max_rpcs_per_tenant
        self._public = _Counts(max_public_streams)
        self._rpcs = _Counts(max_rpcs)
        self._on_refused = on_refused

    def public_stream(self, peer: str) -> Hold:
        """Count one open public stream of `peer` (an address without its port)."""
        return self._public.hold(peer, self.max_public_streams_per_peer, self._public_refusal)

    def rpc(self, tenant: str) -> Hold:
        """Count one RPC (other than Generate) of `tenant` while it runs."""
        return self._rpcs.hold(
            tenant, self.max_rpcs_per_tenant, functools.partial(self._rpc_refusal, tenant)
        )

    def _public_refusal(self, full: str) -> ResourceExhausted:
        if full == "key":
            self._refused("public_streams_per_peer")
            return ResourceExhausted(
                f"too many open health/reflection streams from this address "
                f"(limit {self.max_public_streams_per_peer})"
            )
        self._refused("public_streams")
        return ResourceExhausted(
            f"too many open health/reflection streams (limit {self._public.total_cap})"
        )

    def _rpc_refusal(self, tenant: str, full: str) -> ResourceExhausted:
        if full == "key":
            self._refused("tenant_rpcs")
            return ResourceExhausted(
                f"tenant {tenant} has {self._rpcs.by_key.get(tenant, 0)} RPCs in progress "
                f"(limit {self.max_rpcs_per_tenant})"
            )
        self._refused("rpcs")
        return ResourceExhausted(f"server is at capacity ({self._rpcs.total} RPCs in progress)")

    def public_streams(self, peer: str | None = None) -> int:
        return self._public.total if peer is None else self._public.by_key.get(peer, 0)

    def rpcs(self, tenant: str | None = None) -> int:
        return self._rpcs.total if tenant is None else self._rpcs.by_key.get(tenant, 0)

    def _refused(self, limit: str) -> None:
        if self._on_refused is not None:
            self._on_refused(limit)
