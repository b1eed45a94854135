"""Caps and rates as pure policy (no server): `Admission` rates and uploads, `RpcLimits`, the
reloadable `Tenants`, and the tenants file's error messages. The same policies are tested
through the real server in tests/faults/test_availability.py."""

from __future__ import annotations

import pytest

from lora_gateway import errors
from lora_gateway.config import TenantDefaults
from lora_gateway.interceptors import peer_address, trailing_metadata
from lora_gateway.tenancy import (
    Admission,
    KeyRing,
    Principal,
    Role,
    RpcLimits,
    Slot,
    TenantConfig,
    Tenants,
    hash_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def enter(slot: Slot) -> None:
    with slot:
        pass


def user(tenant: str) -> Principal:
    return Principal(tenant=tenant, role=Role.USER, key_id=f"{tenant}-key")


def test_requests_per_minute_refuses_with_retry_after_and_refills() -> None:
    clock = Clock()
    admission = Admission(100, clock=clock)
    acme = TenantConfig("acme", requests_per_minute=3)
    for _ in range(3):
        with admission.slot(user("acme"), acme):
            pass
    with pytest.raises(errors.ResourceExhausted) as info, admission.slot(user("acme"), acme):
        pytest.fail("admitted past the rate")
    assert str(info.value) == (
        "tenant acme is over its rate limit of 3 requests per minute; retry after 20 s"
    )
    assert info.value.retry_after_s == 20
    assert trailing_metadata(info.value) == (("retry-after", "20"),)
    clock.now += 19.0
    with pytest.raises(errors.ResourceExhausted) as info, admission.slot(user("acme"), acme):
        pass
    assert info.value.retry_after_s == 1
    clock.now += 1.0
    with admission.slot(user("acme"), acme):
        pass
    # another tenant's bucket is its own
    with admission.slot(user("globex"), TenantConfig("globex", requests_per_minute=1)):
        pass


def test_tokens_per_minute_reserves_max_tokens_and_refunds_what_was_not_generated() -> None:
    clock = Clock()
    admission = Admission(100, clock=clock)
    acme = TenantConfig("acme", tokens_per_minute=100)
    with admission.slot(user("acme"), acme, tokens=60) as slot:
        # 60 reserved: a second request asking 60 does not fit until this one ends
        with pytest.raises(errors.ResourceExhausted) as info:
            enter(admission.slot(user("acme"), acme, tokens=60))
        assert "100 generated tokens per minute" in str(info.value)
        assert info.value.retry_after_s == 12  # 20 tokens missing at 100/60 per second
        slot.generated(10)
    # 50 of the 60 came back: 90 left
    with admission.slot(user("acme"), acme, tokens=90) as slot:
        slot.generated(90)
    with pytest.raises(errors.ResourceExhausted), admission.slot(user("acme"), acme, tokens=1):
        pass
    clock.now += 60.0  # a minute refills the whole bucket, never more
    with admission.slot(user("acme"), acme, tokens=100):
        pass


def test_max_tokens_above_the_token_rate_can_never_pass() -> None:
    admission = Admission(100, clock=Clock())
    acme = TenantConfig("acme", tokens_per_minute=100)
    with pytest.raises(errors.ResourceExhausted) as info:
        enter(admission.slot(user("acme"), acme, tokens=101))
    assert str(info.value) == (
        "max_tokens 101 exceeds the rate limit of tenant acme (100 generated tokens per minute)"
    )
    assert info.value.retry_after_s is None


def test_zero_means_unlimited_and_refusals_take_nothing() -> None:
    clock = Clock()
    admission = Admission(2, clock=clock)
    free = TenantConfig("free", max_concurrent=1)
    for _ in range(1000):
        with admission.slot(user("free"), free, tokens=10_000):
            pass
    limited = TenantConfig("acme", max_concurrent=1, requests_per_minute=2)
    with admission.slot(user("acme"), limited):
        # refused by concurrency: the rate bucket is untouched
        for _ in range(5):
            with pytest.raises(errors.ResourceExhausted, match="in flight"):
                enter(admission.slot(user("acme"), limited))
    with admission.slot(user("acme"), limited):
        pass
    with pytest.raises(errors.ResourceExhausted, match="rate limit"):
        enter(admission.slot(user("acme"), limited))
    assert admission.total_in_flight == 0


def test_upload_cap_per_tenant() -> None:
    admission = Admission(10)
    acme = TenantConfig("acme", max_concurrent_uploads=2)
    first = admission.upload(user("acme"), acme)
    with admission.upload(user("acme"), acme):
        with pytest.raises(errors.ResourceExhausted) as info:
            admission.upload(user("acme"), acme)
        assert str(info.value) == (
            "tenant acme has 2 uploads or compositions in progress (limit 2); "
            "try again when one finishes"
        )
        # another tenant is not affected
        with admission.upload(user("globex"), TenantConfig("globex", max_concurrent_uploads=1)):
            pass
    first.release()
    first.release()  # idempotent
    assert admission.uploads_in_progress("acme") == 0


def test_public_streams_capped_per_peer_and_in_total() -> None:
    refused: list[str] = []
    limits = RpcLimits(
        max_public_streams=5,
        max_public_streams_per_peer=2,
        max_rpcs=10,
        max_rpcs_per_tenant=3,
        on_refused=refused.append,
    )
    held = [limits.public_stream("ipv4:10.0.0.1") for _ in range(2)]
    with pytest.raises(errors.ResourceExhausted, match="from this address"):
        limits.public_stream("ipv4:10.0.0.1")
    held += [limits.public_stream("ipv4:10.0.0.2"), limits.public_stream("ipv4:10.0.0.2")]
    held.append(limits.public_stream("ipv4:10.0.0.3"))
    with pytest.raises(errors.ResourceExhausted, match=r"streams \(limit 5\)"):
        limits.public_stream("ipv4:10.0.0.4")
    assert refused == ["public_streams_per_peer", "public_streams"]
    for hold in held:
        hold.release()
    assert limits.public_streams() == 0
    assert limits.public_streams("ipv4:10.0.0.1") == 0


def test_rpcs_capped_per_tenant_and_in_total() -> None:
    limits = RpcLimits(
        max_public_streams=1, max_public_streams_per_peer=1, max_rpcs=4, max_rpcs_per_tenant=3
    )
    acme = [limits.rpc("acme") for _ in range(3)]
    with pytest.raises(errors.ResourceExhausted, match=r"tenant acme has 3 RPCs .*limit 3"):
        limits.rpc("acme")
    globex = limits.rpc("globex")
    with pytest.raises(errors.ResourceExhausted, match="server is at capacity"):
        limits.rpc("initech")
    for hold in (*acme, globex):
        hold.release()
    assert limits.rpcs() == 0


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.0.0.7:51234", "ipv4:10.0.0.7"),
        ("ipv6:[::1]:51234", "ipv6:[::1]"),
        ("ipv6:%5B::1%5D:51234", "ipv6:%5B::1%5D"),
        ("unix:/run/lg.sock", "unix:/run/lg.sock"),
        ("", ""),
    ],
)
def test_peer_address_drops_the_port(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def _ring(*keys: str) -> KeyRing:
    doc = {
        "tenants": {
            "acme": {
                "max_tokens": 64,
                "keys": [
                    {"id": f"k{i}", "sha256": hash_key(key), "role": "user"}
                    for i, key in enumerate(keys)
                ],
            }
        }
    }
    return KeyRing.from_mapping(doc, TenantDefaults())


def test_tenants_replace_is_seen_by_every_reader() -> None:
    tenants = Tenants(_ring("old-key"))
    assert tenants.authenticate("Bearer old-key").tenant == "acme"
    tenants.replace(_ring("new-key"))
    with pytest.raises(errors.Unauthenticated):
        tenants.authenticate("Bearer old-key")
    assert tenants.authenticate("Bearer new-key").tenant == "acme"
    assert tenants.tenant("acme").max_tokens == 64
    assert tenants.generation == 1


def test_tenants_file_yaml_error_names_the_place_not_the_text() -> None:
    secret = "sk-live-0123456789abcdef"
    data = f"tenants:\n  acme:\n    keys: [{{id: a, sha256: {secret}\n".encode()
    with pytest.raises(errors.InvalidArgument) as info:
        KeyRing.parse(data, TenantDefaults(), where="/etc/t.yaml")
    text = str(info.value)
    assert text.startswith("tenants file /etc/t.yaml: not valid YAML at line ")
    assert secret not in text
