"""The admin core (`lora_gateway.adapters.Adapters`) without gRPC: a local store in tmp_path, a
real `Residency` on the fake engine (tests/support/fake_engine.py), a real audit file.

Each write is checked for what must follow it on this replica: residency sees the change at once
(not after a poll: the poll interval here is a minute) and exactly one audit record says who did
what. The end-to-end behaviour over gRPC and the real engine is tests/test_gateway.py's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from adapter_store import (
    AdapterNotFound,
    AdapterRef,
    AdapterVersion,
    BaseModelSpec,
    DiskCache,
    FileEntry,
    Limits,
    LocalBackend,
    Quarantined,
    Registry,
    StoreUnavailable,
)
from lora_gateway import devtools, errors
from lora_gateway.adapters import Adapters, UploadChunk, UploadHeader, UploadMessage
from lora_gateway.audit import AuditLog
from lora_gateway.config import Settings, TenantDefaults
from lora_gateway.gateway import Gateway
from lora_gateway.residency import Residency, key_of
from lora_gateway.tenancy import Admission, KeyRing, Principal, Role, Tenants
from tests.conftest import AdapterFactory
from tests.support.fake_engine import FakeEngine

ACME_ADMIN = Principal("acme", Role.TENANT_ADMIN, "acme-admin")
GLOBEX_ADMIN = Principal("globex", Role.TENANT_ADMIN, "globex-admin")
OPERATOR = Principal("platform", Role.OPERATOR, "ops")
#: Longer than any test: a change seen at once was told to residency, not polled.
POLL_S = 60.0


@dataclass
class Core:
    adapters: Adapters
    residency: Residency
    registry: Registry
    engine: FakeEngine
    audit: AuditLog
    audit_path: Path
    make_adapter: AdapterFactory

    def events(self) -> list[dict[str, str]]:
        """The audit file's records so far."""
        self.audit.flush()
        return [json.loads(line) for line in self.audit_path.read_text().splitlines()]

    async def upload(
        self, principal: Principal, name: str, *, seed: int = 1, aliases: tuple[str, ...] = ()
    ) -> AdapterVersion:
        folder = self.make_adapter(seed=seed, rank=8)
        return await self.adapters.upload(principal, messages(folder, name, aliases))


def messages(
    folder: Path, name: str, aliases: tuple[str, ...] = (), tenant: str = ""
) -> AsyncIterator[UploadMessage]:
    """An upload stream of `folder`: the header, then each file in two chunks (the files are
    small and read here, before the stream starts)."""
    files = [(p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.name != "README.md"]
    declared = tuple(
        FileEntry(filename, len(data), hashlib.sha256(data).hexdigest()) for filename, data in files
    )
    return _stream([UploadHeader(tenant, name, declared, aliases)], files)


async def _stream(
    first: list[UploadMessage], files: list[tuple[str, bytes]]
) -> AsyncIterator[UploadMessage]:
    for message in first:
        yield message
    for filename, data in files:
        half = len(data) // 2
        yield UploadChunk(filename, data[:half])
        yield UploadChunk(filename, data[half:])


@pytest.fixture(scope="module")
def spec(tiny_model: Path) -> BaseModelSpec:
    return BaseModelSpec.from_hf_config(
        tiny_model, max_rank=16, aliases=(devtools.TINY_MODEL_NAME,)
    )


@pytest.fixture
def core(tmp_path: Path, spec: BaseModelSpec, make_test_adapter: AdapterFactory) -> Iterator[Core]:
    engine = FakeEngine(max_loras=2, max_cpu_loras=3)
    registry = Registry(LocalBackend(tmp_path / "store"), spec)
    cache = DiskCache(tmp_path / "cache", 10**8, registry.fetch_file)
    residency = Residency(engine, registry, cache, spec, Limits(), poll_interval_s=POLL_S)
    settings = Settings(model=str(tmp_path / "unused-model"))
    keyring = KeyRing.from_mapping(None, TenantDefaults(max_pins=2, max_engine_slots=2))
    gateway = Gateway(settings, engine, registry, residency, Tenants(keyring), Admission(8))
    audit_path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(audit_path))
    yield Core(
        Adapters(gateway, audit), residency, registry, engine, audit, audit_path, make_test_adapter
    )
    audit.close()


def allowed(events: list[dict[str, str]], rpc: str) -> list[dict[str, str]]:
    return [e for e in events if e["rpc"] == rpc and e["decision"] == "allow"]


async def test_upload_is_audited_and_residency_reads_the_manifest_again(core: Core) -> None:
    first = await core.upload(ACME_ADMIN, "bot")
    assert await core.residency.resolve("acme", AdapterRef.parse("bot")) == first  # now cached
    second = await core.upload(ACME_ADMIN, "bot", seed=2)
    assert second.sha != first.sha
    # `latest` moved in the store; without the core's `forget` the cached manifest would say v1.
    assert await core.residency.resolve("acme", AdapterRef.parse("bot")) == second
    (one, two) = allowed(core.events(), "UploadAdapter")
    assert (one["version"], two["version"]) == (first.version_id, second.version_id)
    assert {e["principal_tenant"] for e in (one, two)} == {"acme"}
    assert {e["key_id"] for e in (one, two)} == {"acme-admin"}
    assert {e["tenant"] for e in (one, two)} == {"acme"}
    assert {e["adapter"] for e in (one, two)} == {"bot"}
    assert second.created_by == "acme:acme-admin"


async def test_a_refused_upload_keeps_nothing_and_is_not_audited(core: Core) -> None:
    chunk_first = _stream([], [("adapter_config.json", b"{}")])
    with pytest.raises(errors.InvalidArgument, match="first UploadAdapter message"):
        await core.adapters.upload(ACME_ADMIN, chunk_first)

    async def two_headers() -> AsyncIterator[UploadMessage]:
        async for message in messages(core.make_adapter(seed=1, rank=8), "bot"):
            yield message
            if isinstance(message, UploadHeader):
                yield message

    with pytest.raises(errors.InvalidArgument, match="only one header per upload"):
        await core.adapters.upload(ACME_ADMIN, two_headers())
    with pytest.raises(errors.InvalidArgument, match="first UploadAdapter message"):
        await core.adapters.upload(ACME_ADMIN, _stream([], []))
    # Another tenant's name is answered like a missing adapter, before anything is spooled.
    with pytest.raises(errors.NotFound, match=errors.ADAPTER_NOT_FOUND_TEXT):
        await core.adapters.upload(
            GLOBEX_ADMIN, messages(core.make_adapter(seed=1, rank=8), "bot", tenant="acme")
        )
    assert await asyncio.to_thread(core.registry.list_adapters, "acme") == []
    assert core.events() == []


async def test_an_alias_move_applies_here_at_once_and_is_audited(core: Core) -> None:
    first = await core.upload(ACME_ADMIN, "bot", aliases=("prod",))
    second = await core.upload(ACME_ADMIN, "bot", seed=2)
    prod = AdapterRef.parse("bot@prod")
    assert await core.residency.resolve("acme", prod) == first
    manifest = await core.adapters.set_alias(ACME_ADMIN, "", "bot", "prod", second.version_id)
    assert manifest.aliases["prod"] == second.sha
    assert await core.residency.resolve("acme", prod) == second
    (event,) = allowed(core.events(), "SetAlias")
    assert (event["tenant"], event["adapter"], event["version"]) == (
        "acme",
        "bot",
        second.version_id,
    )


async def test_alias_weights_apply_here_at_once_and_are_audited(core: Core) -> None:
    first = await core.upload(ACME_ADMIN, "bot", aliases=("prod",))
    second = await core.upload(ACME_ADMIN, "bot", seed=2)
    prod = AdapterRef.parse("bot@prod")
    assert await core.residency.resolve("acme", prod, routing_key="k") == first  # now cached
    split = {first.version_id: 0.5, second.version_id: 0.5}
    manifest = await core.adapters.set_alias_weights(ACME_ADMIN, "", "bot", "prod", split)
    assert manifest.alias_weights == {"prod": {first.sha: 0.5, second.sha: 0.5}}
    served = {
        (await core.residency.resolve("acme", prod, routing_key=f"k{i}")).sha for i in range(40)
    }
    assert served == {first.sha, second.sha}  # without a poll: told to residency at once
    with pytest.raises(errors.NotFound, match=errors.ADAPTER_NOT_FOUND_TEXT):
        await core.adapters.set_alias_weights(GLOBEX_ADMIN, "acme", "bot", "prod", split)
    ended = await core.adapters.set_alias_weights(
        ACME_ADMIN, "", "bot", "prod", {second.version_id: 1.0}
    )
    assert (ended.alias_weights, ended.aliases["prod"]) == ({}, second.sha)
    served = {
        (await core.residency.resolve("acme", prod, routing_key=f"k{i}")).sha for i in range(40)
    }
    assert served == {second.sha}
    one, two = allowed(core.events(), "SetAliasWeights")
    ordered = sorted([first.sha, second.sha])
    assert (one["tenant"], one["adapter"], one["principal_tenant"]) == ("acme", "bot", "acme")
    assert one["version"] == ",".join(f"sha256:{sha}" for sha in ordered)
    assert one["detail"] == f"prod: {ordered[0][:12]}=0.5, {ordered[1][:12]}=0.5"
    assert (two["version"], two["detail"]) == (second.version_id, f"prod: {second.sha[:12]}=1")


async def test_share_and_unshare_apply_to_the_grantee_at_once_and_are_audited(
    core: Core,
) -> None:
    version = await core.upload(ACME_ADMIN, "bot")
    ref = AdapterRef.parse("acme/bot")
    with pytest.raises(errors.NotFound):
        await core.residency.resolve("globex", ref)  # globex's share index is now cached
    await core.adapters.share(ACME_ADMIN, "", "bot", "globex")
    assert await core.residency.resolve("globex", ref) == version
    with pytest.raises(errors.NotFound, match=errors.ADAPTER_NOT_FOUND_TEXT):
        await core.adapters.share(GLOBEX_ADMIN, "acme", "bot", "initech")  # not its adapter
    await core.adapters.unshare(ACME_ADMIN, "", "bot", "globex")
    with pytest.raises(errors.NotFound):
        await core.residency.resolve("globex", ref)
    events = core.events()
    assert [e["adapter"] for e in allowed(events, "ShareAdapter")] == ["bot"]
    assert [e["adapter"] for e in allowed(events, "UnshareAdapter")] == ["bot"]
    assert all(e["principal_tenant"] == "acme" for e in events)  # the refusal: not here


async def test_revoke_unloads_purges_and_is_audited(core: Core) -> None:
    version = await core.upload(ACME_ADMIN, "bot")
    await core.adapters.prefetch(ACME_ADMIN, "", "bot")
    assert core.residency.is_resident(key_of(version))
    revoked = await core.adapters.revoke(ACME_ADMIN, "", "bot")
    assert revoked.shas == [version.sha]
    assert not core.residency.is_resident(key_of(version))
    assert core.engine.held == {}
    assert core.engine.removes
    assert not core.residency.cache.contains(version.sha)
    with pytest.raises(errors.NotFound):
        await core.residency.resolve("acme", AdapterRef.parse("bot"))
    with pytest.raises(AdapterNotFound):
        await asyncio.to_thread(core.registry.get_manifest, "acme", "bot")
    (event,) = allowed(core.events(), "RevokeAdapter")
    assert (event["tenant"], event["adapter"], event["version"]) == ("acme", "bot", version.sha)


async def test_compose_is_audited_and_residency_reads_the_manifest_again(core: Core) -> None:
    part = await core.upload(ACME_ADMIN, "bot")
    assert await core.residency.resolve("acme", AdapterRef.parse("bot")) == part
    with pytest.raises(errors.InvalidArgument, match="at least one part"):
        await core.adapters.compose(ACME_ADMIN, "", "bot", [])
    composed = await core.adapters.compose(ACME_ADMIN, "", "bot", [("bot", 0.5)])
    ((source, weight),) = composed.composed_from
    assert (part.sha in source, weight) == (True, 0.5)
    assert await core.residency.resolve("acme", AdapterRef.parse("bot")) == composed
    (event,) = allowed(core.events(), "ComposeAdapter")
    assert (event["adapter"], event["version"]) == ("bot", composed.version_id)


async def test_pins_are_the_owners_and_audited(core: Core) -> None:
    version = await core.upload(ACME_ADMIN, "bot")
    await core.adapters.share(ACME_ADMIN, "", "bot", "globex")
    with pytest.raises(errors.NotFound, match=errors.ADAPTER_NOT_FOUND_TEXT):
        await core.adapters.pin(GLOBEX_ADMIN, "", "acme/bot")  # may use it, not pin it
    entry = await core.adapters.pin(ACME_ADMIN, "", "bot")
    assert (entry.tier, entry.pinned, entry.version) == ("engine", True, version)
    assert core.residency.pins("acme") == 1
    entry = await core.adapters.unpin(ACME_ADMIN, "", "bot")
    assert not entry.pinned
    assert core.residency.pins() == 0
    events = core.events()
    for rpc in ("PinAdapter", "UnpinAdapter"):
        (event,) = allowed(events, rpc)
        assert (event["key_id"], event["version"]) == ("acme-admin", version.version_id)


async def test_quarantine_refuses_here_persists_and_is_audited(core: Core) -> None:
    version = await core.upload(ACME_ADMIN, "bot")
    await core.adapters.prefetch(OPERATOR, "acme", "bot")
    await core.adapters.quarantine([version], ["prompt 0"])
    # Residency took the quarantined manifest (`remember`), so the answer says why.
    with pytest.raises(Quarantined):
        await core.residency.resolve("acme", AdapterRef.parse("bot"))
    manifest = await asyncio.to_thread(core.registry.get_manifest, "acme", "bot")
    assert manifest.versions[version.sha].status == "quarantined"
    (event,) = [e for e in core.events() if e["rpc"] == "runtime-canary/quarantine"]
    assert (event["decision"], event["code"], event["principal_tenant"]) == (
        "deny",
        "FAILED_PRECONDITION",
        "",
    )
    assert event["detail"] == "quarantined: canary mismatch prompt 0"


async def test_reads_show_a_grantee_only_what_the_sharing_rule_allows(core: Core) -> None:
    await core.upload(ACME_ADMIN, "bot")
    await core.upload(ACME_ADMIN, "private")
    await core.adapters.share(ACME_ADMIN, "", "bot", "globex")
    page = await core.adapters.list_adapters(
        GLOBEX_ADMIN, "", include_shared=True, page_size=0, page_token=""
    )
    while page.next_page_token and not page.adapters:
        page = await core.adapters.list_adapters(
            GLOBEX_ADMIN, "", include_shared=True, page_size=0, page_token=page.next_page_token
        )
    assert [(m.tenant, m.name) for m in page.adapters] == [("acme", "bot")]
    assert page.usage is not None
    assert page.usage.tenant == "globex"
    own = await core.adapters.get_adapter(ACME_ADMIN, "", "bot")
    assert own.usage is not None
    assert own.usage.adapters == 2
    with pytest.raises(errors.NotFound, match=errors.ADAPTER_NOT_FOUND_TEXT):
        await core.adapters.get_adapter(GLOBEX_ADMIN, "acme", "bot")
    residency = await core.adapters.get_residency(ACME_ADMIN, "", page_size=0, page_token="")
    assert {e.version.name for e in residency.entries} == {"bot", "private"}
    assert {e.tier for e in residency.entries} == {"store"}
    with pytest.raises(errors.PermissionDenied):
        await core.adapters.get_residency(ACME_ADMIN, "*", page_size=0, page_token="")


async def test_a_quarantine_the_store_cannot_persist_is_refused_here_with_its_reason(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = await core.upload(ACME_ADMIN, "bot")
    assert await core.residency.resolve("acme", AdapterRef.parse("bot")) == version

    def store_down(*args: object) -> None:
        raise StoreUnavailable("store unreachable")

    monkeypatch.setattr(core.registry, "quarantine", store_down)
    await core.adapters.quarantine([version], ["prompt 1"])
    with pytest.raises(errors.FailedPrecondition, match="quarantined: the runtime canary"):
        await core.residency.resolve("acme", AdapterRef.parse("bot"))
    (event,) = [e for e in core.events() if e["rpc"] == "runtime-canary/quarantine"]
    assert event["detail"] == "quarantined (not persisted): canary mismatch prompt 1"
