"""Principals, roles, the method -> permission table, the tenants file, policy and admission."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from adapter_store.model import Manifest, can_use
from lora_gateway import errors, tenancy
from lora_gateway.config import Settings, TenantDefaults
from lora_gateway.tenancy import (
    METHOD_PERMISSIONS,
    ROLE_PERMISSIONS,
    Admission,
    KeyRing,
    Permission,
    Policy,
    Principal,
    Role,
    TenantConfig,
    check_max_tokens,
    hash_key,
    is_public,
    permission_for,
)
from lora_gateway.v1 import admin_pb2, inference_pb2

KEYS = {
    "acme-user": "k-acme-user-0123",
    "acme-admin": "k-acme-admin-4567",
    "globex-user": "k-globex-user-89ab",
    "ops": "k-ops-cdef",
}


def tenants_doc() -> dict[str, Any]:
    return {
        "tenants": {
            "acme": {
                "max_concurrent": 2,
                "max_tokens": 100,
                "keys": [
                    {"id": "acme-user", "sha256": hash_key(KEYS["acme-user"]), "role": "user"},
                    {
                        "id": "acme-admin",
                        "sha256": hash_key(KEYS["acme-admin"]),
                        "role": "tenant-admin",
                    },
                ],
            },
            "globex": {
                "keys": [
                    {"id": "globex-user", "sha256": hash_key(KEYS["globex-user"]), "role": "user"}
                ]
            },
            "platform": {
                "keys": [{"id": "ops", "sha256": hash_key(KEYS["ops"]), "role": "operator"}]
            },
        }
    }


def ring(doc: Any = None) -> KeyRing:
    return KeyRing.from_mapping(
        tenants_doc() if doc is None else doc, TenantDefaults(max_concurrent=16, max_tokens=2048)
    )


def principal(tenant: str, role: Role) -> Principal:
    return Principal(tenant=tenant, role=role, key_id=f"{tenant}-{role.value}")


# --- the permission table (invariant 6) ------------------------------------------------------


def _descriptor_methods(*modules: Any) -> list[str]:
    return [
        f"/{service.full_name}/{method.name}"
        for module in modules
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


def test_every_rpc_of_every_served_service_has_a_permission() -> None:
    methods = _descriptor_methods(inference_pb2, admin_pb2, health_pb2, reflection_pb2)
    assert len(methods) >= 14 + 3 + 1
    missing = [m for m in methods if m not in METHOD_PERMISSIONS]
    assert not missing, f"RPCs without an entry in METHOD_PERMISSIONS: {missing}"


def test_table_has_no_stale_gateway_entries() -> None:
    served = set(_descriptor_methods(inference_pb2, admin_pb2))
    ours = {m for m in METHOD_PERMISSIONS if m.startswith("/lora_gateway.")}
    assert ours == served


def test_method_permissions() -> None:
    assert permission_for("/lora_gateway.v1.Inference/Generate") is Permission.GENERATE
    assert permission_for("/lora_gateway.v1.Inference/GenerateStream") is Permission.GENERATE
    for rpc in ("GetAdapter", "ListAdapters", "GetResidency"):
        assert permission_for(f"/lora_gateway.v1.Admin/{rpc}") is Permission.READ_ADAPTERS
    for rpc in ("UploadAdapter", "SetAlias", "SetAliasWeights", "ShareAdapter", "ComposeAdapter"):
        assert permission_for(f"/lora_gateway.v1.Admin/{rpc}") is Permission.MANAGE_ADAPTERS
    for rpc in ("UnshareAdapter", "RevokeAdapter", "PinAdapter", "UnpinAdapter", "PrefetchAdapter"):
        assert permission_for(f"/lora_gateway.v1.Admin/{rpc}") is Permission.MANAGE_ADAPTERS
    for rpc in ("PutEvaluationSet", "EvaluateAdapter", "SetAliasPolicy", "SetRollbackPolicy"):
        assert permission_for(f"/lora_gateway.v1.Admin/{rpc}") is Permission.MANAGE_ADAPTERS
    assert permission_for("/lora_gateway.v1.Admin/GetEvaluations") is Permission.READ_ADAPTERS
    assert is_public("/grpc.health.v1.Health/Check")
    assert is_public("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert not is_public("/lora_gateway.v1.Inference/Generate")
    assert permission_for("/lora_gateway.v1.Admin/DropEverything") is None
    assert not is_public("/nope/Nope")


def test_role_permissions() -> None:
    assert ROLE_PERMISSIONS[Role.USER] >= {Permission.GENERATE, Permission.READ_ADAPTERS}
    assert Permission.MANAGE_ADAPTERS not in ROLE_PERMISSIONS[Role.USER]
    assert Permission.OPERATE not in ROLE_PERMISSIONS[Role.TENANT_ADMIN]
    assert ROLE_PERMISSIONS[Role.TENANT_ADMIN] > ROLE_PERMISSIONS[Role.USER]
    assert ROLE_PERMISSIONS[Role.OPERATOR] == frozenset(Permission)
    assert principal("a", Role.TENANT_ADMIN).has(Permission.MANAGE_ADAPTERS)


@pytest.mark.parametrize(
    ("role", "method", "allowed"),
    [
        (Role.USER, "/lora_gateway.v1.Inference/Generate", True),
        (Role.USER, "/lora_gateway.v1.Admin/ListAdapters", True),
        (Role.USER, "/lora_gateway.v1.Admin/UploadAdapter", False),
        (Role.USER, "/lora_gateway.v1.Admin/RevokeAdapter", False),
        (Role.USER, "/lora_gateway.v1.Admin/SetAliasWeights", False),
        (Role.TENANT_ADMIN, "/lora_gateway.v1.Admin/SetAliasWeights", True),
        (Role.TENANT_ADMIN, "/lora_gateway.v1.Admin/RevokeAdapter", True),
        (Role.TENANT_ADMIN, "/lora_gateway.v1.Admin/PinAdapter", True),
        (Role.OPERATOR, "/lora_gateway.v1.Admin/PrefetchAdapter", True),
        (Role.USER, "/lora_gateway.v1.Admin/EvaluateAdapter", False),
        (Role.TENANT_ADMIN, "/lora_gateway.v1.Admin/EvaluateAdapter", True),
        (Role.USER, "/lora_gateway.v1.Admin/GetEvaluations", True),
        (Role.OPERATOR, "/lora_gateway.v1.Admin/Unknown", False),
        (Role.OPERATOR, "", False),
    ],
)
def test_authorize(role: Role, method: str, allowed: bool) -> None:
    p = principal("acme", role)
    if allowed:
        Policy.authorize(p, method)
    else:
        with pytest.raises(errors.PermissionDenied, match=r"^permission denied$"):
            Policy.authorize(p, method)


# --- the key ring -------------------------------------------------------------------------


def test_authenticate_maps_keys_to_principals() -> None:
    keys = ring()
    p = keys.authenticate(f"Bearer {KEYS['acme-admin']}")
    assert p == Principal("acme", Role.TENANT_ADMIN, "acme-admin")
    assert keys.authenticate(f"bearer   {KEYS['ops']} ").role is Role.OPERATOR
    assert keys.authenticate(f"BEARER {KEYS['globex-user']}").tenant == "globex"
    assert keys.key_count == 4
    assert KEYS["ops"] not in repr(keys)


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_credentials(value: str | None) -> None:
    with pytest.raises(errors.Unauthenticated, match=r"^missing credentials$"):
        ring().authenticate(value)


@pytest.mark.parametrize(
    "value",
    [
        "Bearer wrong-key",
        "Bearer",
        "Bearer ",
        f"Basic {KEYS['ops']}",
        KEYS["ops"],
        f"Bearer{KEYS['ops']}",
        f"Bearer {hash_key(KEYS['ops'])}",  # the stored hash is not a key
        "Bearer " + "x" * 10_000,
    ],
)
def test_invalid_credentials_all_answer_alike(value: str) -> None:
    with pytest.raises(errors.Unauthenticated) as info:
        ring().authenticate(value)
    assert str(info.value) == "invalid credentials"
    assert info.value.public_message == "invalid credentials"


def test_empty_ring_authenticates_nobody() -> None:
    keys = ring({"tenants": {}})
    with pytest.raises(errors.Unauthenticated, match="invalid credentials"):
        keys.authenticate(f"Bearer {KEYS['ops']}")
    assert ring(None).key_count == 4
    assert KeyRing.from_mapping(None, TenantDefaults(max_concurrent=1, max_tokens=1)).key_count == 0


def test_tenant_limits_and_defaults() -> None:
    keys = ring()
    assert keys.tenant("acme") == TenantConfig("acme", max_concurrent=2, max_tokens=100)
    assert keys.tenant("globex") == TenantConfig("globex", max_concurrent=16, max_tokens=2048)
    assert keys.tenant("unknown") == TenantConfig("unknown", max_concurrent=16, max_tokens=2048)


def test_load_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text(
        f"""
tenants:
  acme:
    max_concurrent: 8
    max_tokens: 1024
    keys:
      - id: acme-backend
        sha256: "{hash_key("secret-1")}"
        role: user
""",
        encoding="utf-8",
    )
    keys = KeyRing.load(path, TenantDefaults(max_concurrent=4, max_tokens=64))
    assert keys.authenticate("Bearer secret-1") == Principal("acme", Role.USER, "acme-backend")
    assert keys.tenant("acme") == TenantConfig("acme", max_concurrent=8, max_tokens=1024)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"tenants file .*missing.yaml"):
        KeyRing.load(tmp_path / "missing.yaml", TenantDefaults(max_concurrent=1, max_tokens=1))
    with pytest.raises(errors.InvalidArgument, match="no tenants file configured"):
        KeyRing.load("", TenantDefaults(max_concurrent=1, max_tokens=1))
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants: [unclosed", encoding="utf-8")
    with pytest.raises(errors.InvalidArgument, match="not valid YAML"):
        KeyRing.load(bad, TenantDefaults(max_concurrent=1, max_tokens=1))


def _with_key(**fields: Any) -> dict[str, Any]:
    key = {"id": "k1", "sha256": hash_key("x"), "role": "user", **fields}
    return {"tenants": {"acme": {"keys": [{k: v for k, v in key.items() if v is not None}]}}}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "expected a mapping"),
        ({"tenant": {}}, "unknown field"),
        ({"tenants": ["acme"]}, "must be a mapping"),
        ({"tenants": {"../etc": {}}}, "invalid tenant name"),
        ({"tenants": {"acme": {"max_tokens": 0}}}, "max_tokens must be an integer >= 1"),
        ({"tenants": {"acme": {"max_concurrent": "8"}}}, "max_concurrent must be an integer"),
        ({"tenants": {"acme": {"max_concurrent": True}}}, "max_concurrent must be an integer"),
        ({"tenants": {"acme": {"quota": 1}}}, "unknown field"),
        ({"tenants": {"acme": {"keys": {"id": "x"}}}}, "must be a list"),
        ({"tenants": {"acme": {"keys": ["abc"]}}}, "expected a mapping"),
        (_with_key(key="plaintext-secret"), "store `sha256: <hex>`"),
        (_with_key(api_key="plaintext-secret"), "never store API keys"),
        (_with_key(sha256=hash_key("x").upper()), "64 lowercase hex"),
        (_with_key(sha256="abc"), "64 lowercase hex"),
        (_with_key(sha256=None), "missing field"),
        (_with_key(role="admin"), "role must be one of user, tenant-admin, operator"),
        (_with_key(id="has space"), "invalid key id"),
        (_with_key(extra=1), "unknown field"),
    ],
)
def test_invalid_tenants_documents(doc: Any, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message) as info:
        ring(doc)
    assert "plaintext-secret" not in str(info.value)


def test_every_problem_is_named_by_tenant_key_and_field() -> None:
    """All problems at once, each with its place: the tenant, the key by number and id, the
    field; unknown fields with the allowed ones. No secret-looking input is repeated."""
    doc = {
        "tenants": {
            "acme": {
                "max_tokens": 0,
                "quota": 5,
                "keys": [
                    {"id": "acme-backend", "sha256": "sk-live-123", "role": "admin"},
                    {"id": "acme-ops", "role": "user", "note": 1},
                ],
            },
            "globex": {"keys": [{"id": "gx", "token": "sk-live-456"}]},
        }
    }
    with pytest.raises(errors.InvalidArgument) as info:
        ring(doc)
    assert str(info.value) == "; ".join(
        [
            "tenant acme: max_tokens must be an integer >= 1, got 0",
            "tenant acme: key #1 (acme-backend): sha256 must be 64 lowercase hex digits",
            "tenant acme: key #1 (acme-backend): role must be one of user, tenant-admin, operator, "
            "got 'admin'",
            "tenant acme: key #2 (acme-ops): missing field(s) sha256",
            "tenant acme: key #2 (acme-ops): unknown field(s) note (allowed: id, role, sha256)",
            "tenant acme: unknown field(s) quota (allowed: keys, max_adapters, max_concurrent, "
            "max_concurrent_uploads, max_engine_slots, max_host_bytes, max_pins, max_stored_bytes, "
            "max_tokens, requests_per_minute, tokens_per_minute)",
            "tenant globex: key #1 (gx): field 'token' is not allowed: never store API keys in the "
            "tenants file; store `sha256: <hex>` of the key instead (python -c 'from "
            'lora_gateway.tenancy import hash_key; print(hash_key("KEY"))\')',
        ]
    )
    assert "sk-live" not in str(info.value)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "expected a mapping with a `tenants:` key"),
        ({"tenant": {}}, "the top level: unknown field(s) tenant (allowed: tenants)"),
        ({"secret": "s"}, "the top level: field 'secret' is not allowed: never store API keys"),
        ({"tenants": ["acme"]}, "`tenants` must be a mapping of tenant name -> settings"),
        ({"tenants": {"acme": [1]}}, "tenant acme: expected a mapping"),
        ({"tenants": {"acme": {"keys": {"id": "x"}}}}, "tenant acme: `keys` must be a list"),
        (
            {"tenants": {"acme": {"keys": ["abc"]}}},
            "tenant acme: key #1: expected a mapping with id, sha256 and role",
        ),
        (_with_key(id="has space"), "tenant acme: key #1: invalid key id 'has space': use 1-64"),
        (
            _with_key(sha256=None, role=None),
            "tenant acme: key #1 (k1): missing field(s) role, sha256",
        ),
        (
            {"tenants": {"acme": {"max_concurrent": "8"}}},
            "tenant acme: max_concurrent must be an integer >= 1, got '8'",
        ),
        (
            {"tenants": {"acme": {"requests_per_minute": -1}}},
            "tenant acme: requests_per_minute must be an integer >= 0, got -1",
        ),
    ],
)
def test_tenants_file_messages_in_full(doc: Any, message: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        ring(doc)
    assert str(info.value).startswith(message)


def test_nothing_under_a_heading_means_none() -> None:
    """`tenants:`, `acme:` and `keys:` with nothing under them (YAML null) are empty."""
    assert ring({"tenants": None}).tenants == {}
    keys = ring({"tenants": {"acme": None, "globex": {"keys": None}}})
    assert sorted(keys.tenants) == ["acme", "globex"]
    assert keys.key_count == 0


def test_defaults_of_every_limit_come_from_settings() -> None:
    """Each field of TenantDefaults comes from the setting tenant_<field>."""
    settings = Settings(
        tenant_max_concurrent=3,
        tenant_max_tokens=300,
        tenant_max_engine_slots=2,
        tenant_max_host_bytes=5000,
        tenant_max_pins=4,
        tenant_max_concurrent_uploads=5,
        tenant_max_stored_bytes=6000,
        tenant_max_adapters=7,
        tenant_tokens_per_minute=800,
        default_max_tokens=10,
        tenant_requests_per_minute=9,
    )
    assert settings.tenant_defaults() == TenantDefaults(
        max_concurrent=3,
        max_tokens=300,
        max_engine_slots=2,
        max_host_bytes=5000,
        max_pins=4,
        max_concurrent_uploads=5,
        max_stored_bytes=6000,
        max_adapters=7,
        tokens_per_minute=800,
        requests_per_minute=9,
    )
    # 0 engine slots: one fewer than the engine holds, at least 1.
    assert Settings(max_cpu_loras=8).tenant_defaults().max_engine_slots == 7
    assert Settings(max_loras=1, max_cpu_loras=1).tenant_defaults().max_engine_slots == 1
    # 0 host bytes: half the host tier's byte budget.
    assert Settings(host_lora_budget_bytes=1000).tenant_defaults().max_host_bytes == 500


def test_public_names() -> None:
    """The package's public surface, pinned (each module has its own for the rest)."""
    assert sorted(tenancy.__all__) == sorted(
        [
            "GENERATE_METHODS",
            "METHOD_PERMISSIONS",
            "PERMISSION_DENIED_TEXT",
            "ROLE_PERMISSIONS",
            "Admission",
            "Hold",
            "KeyRing",
            "Permission",
            "Policy",
            "Principal",
            "Role",
            "RpcLimits",
            "Slot",
            "TenantConfig",
            "Tenants",
            "check_max_tokens",
            "hash_key",
            "is_public",
            "permission_for",
        ]
    )
    assert all(hasattr(tenancy, name) for name in tenancy.__all__)


def test_duplicate_hashes_and_ids_are_refused() -> None:
    same = hash_key("same")
    doc = {
        "tenants": {
            "a": {"keys": [{"id": "k1", "sha256": same, "role": "user"}]},
            "b": {"keys": [{"id": "k2", "sha256": same, "role": "operator"}]},
        }
    }
    with pytest.raises(errors.InvalidArgument) as info:
        ring(doc)
    assert str(info.value) == (
        "tenant b: key 'k2' has the same sha256 as key 'k1': each API key maps to one principal"
    )
    doc["tenants"]["b"]["keys"][0]["sha256"] = hash_key("other")
    doc["tenants"]["b"]["keys"][0]["id"] = "k1"
    with pytest.raises(errors.InvalidArgument) as info:
        ring(doc)
    assert str(info.value) == (
        "tenant b: key id 'k1' is used twice (ids label keys in logs and must be unique)"
    )


# --- policy -------------------------------------------------------------------------------


def test_can_use() -> None:
    """The one sharing rule (adapter_store.model.can_use), and Policy's role-aware view of it."""
    assert can_use("acme", "acme", ())
    assert can_use("acme", "globex", ["acme"])
    assert not can_use("acme", "globex", ["initech"])
    assert not can_use("acme", "globex", ())
    assert can_use("platform", "globex", (), operator=True)
    acme = principal("acme", Role.USER)
    assert Policy.can_use(acme, "acme", ())
    assert Policy.can_use(acme, "globex", ["acme"])
    assert not Policy.can_use(acme, "globex", ["initech"])
    assert not Policy.can_use(principal("acme", Role.TENANT_ADMIN), "globex", frozenset())
    assert Policy.can_use(principal("platform", Role.OPERATOR), "globex", ())


def test_one_sharing_rule() -> None:
    """No code but the rule itself decides by looking into `shared_with`: every visibility
    decision goes through `can_use` (before: Residency.resolve and Registry.resolve and
    list_shared_with each had their own copy of the rule)."""
    root = Path(__file__).resolve().parents[1]
    deciding: list[str] = []
    for path in sorted([*root.glob("lora_gateway/**/*.py"), *root.glob("adapter_store/*.py")]):
        if "/v1/" in path.as_posix():
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Compare) and any(
                isinstance(op, ast.In | ast.NotIn) for op in node.ops
            ):
                sides = [node.left, *node.comparators]
                if any(isinstance(n, ast.Attribute) and n.attr == "shared_with" for n in sides):
                    deciding.append(f"{path.relative_to(root)}:{node.lineno}")
    rule = [d for d in deciding if d.startswith("adapter_store/model.py")]
    assert rule == [], rule  # the rule's own parameter is a plain name, not an attribute
    assert deciding == [], "re-implemented sharing rule at " + ", ".join(deciding)
    # And the rule the store runs is the rule Policy runs: same answers on a table.
    for tenant, owner, shared in [
        ("acme", "acme", ()),
        ("acme", "globex", ("acme",)),
        ("acme", "globex", ("initech",)),
        ("acme", "globex", ()),
    ]:
        manifest = Manifest(tenant=owner, name="bot", shared_with=shared)
        for role in Role:
            who = principal(tenant, role)
            assert manifest.usable_by(tenant, operator=role is Role.OPERATOR) == Policy.can_use(
                who, owner, shared
            )


def test_effective_tenant_for_adapter_hides_other_tenants() -> None:
    admin = principal("acme", Role.TENANT_ADMIN)
    assert Policy.effective_tenant_for_adapter(admin, "") == "acme"
    assert Policy.effective_tenant_for_adapter(admin, "acme") == "acme"
    for other in ("globex", "does-not-exist"):
        with pytest.raises(errors.NotFound) as info:
            Policy.effective_tenant_for_adapter(admin, other)
        # exactly what a missing adapter answers
        assert errors.status_of(info.value) == errors.status_of(
            errors.NotFound(errors.ADAPTER_NOT_FOUND_TEXT)
        )
    ops = principal("platform", Role.OPERATOR)
    assert Policy.effective_tenant_for_adapter(ops, "globex") == "globex"
    assert Policy.effective_tenant_for_adapter(ops, "") == "platform"
    with pytest.raises(errors.InvalidArgument):
        Policy.effective_tenant_for_adapter(ops, "../globex")


def test_effective_tenant_for_listing() -> None:
    user = principal("acme", Role.USER)
    assert Policy.effective_tenant_for_listing(user, "") == "acme"
    with pytest.raises(errors.PermissionDenied, match=r"^permission denied$"):
        Policy.effective_tenant_for_listing(user, "globex")
    ops = principal("platform", Role.OPERATOR)
    assert Policy.effective_tenant_for_listing(ops, "globex") == "globex"


# --- admission ----------------------------------------------------------------------------


def test_check_max_tokens() -> None:
    acme = TenantConfig("acme", max_concurrent=2, max_tokens=100)
    check_max_tokens(100, acme)
    with pytest.raises(errors.ResourceExhausted, match=r"max_tokens 101 exceeds .* acme .*100"):
        check_max_tokens(101, acme)


async def test_admission_per_tenant_and_global_caps() -> None:
    changes: list[tuple[str, int]] = []
    admission = Admission(max_total=3, on_change=lambda t, n: changes.append((t, n)))
    acme, globex = principal("acme", Role.USER), principal("globex", Role.USER)
    acme_cfg, globex_cfg = (
        TenantConfig("acme", max_concurrent=2, max_tokens=100),
        TenantConfig("globex", max_concurrent=5, max_tokens=100),
    )
    async with admission.slot(acme, acme_cfg), admission.slot(acme, acme_cfg):
        assert admission.in_flight("acme") == 2
        with pytest.raises(errors.ResourceExhausted) as info:
            async with admission.slot(acme, acme_cfg):
                pytest.fail("admitted past the tenant cap")
        assert str(info.value) == "tenant acme has 2 requests in flight (limit 2)"
        # another tenant is still served: fairness from per-tenant caps
        async with admission.slot(globex, globex_cfg):
            assert admission.total_in_flight == 3
            with (
                pytest.raises(errors.ResourceExhausted) as info,
                admission.slot(globex, globex_cfg),
            ):
                pytest.fail("admitted past the global cap")
            assert str(info.value) == "server is at capacity (3 requests in flight)"
    assert admission.total_in_flight == 0
    assert admission.in_flight("acme") == 0
    assert changes[:3] == [("acme", 1), ("acme", 2), ("globex", 1)]
    assert changes[-1] == ("acme", 0)


async def test_admission_releases_on_error_and_cancellation() -> None:
    admission = Admission(max_total=10)
    acme, cfg = principal("acme", Role.USER), TenantConfig("acme", max_concurrent=1, max_tokens=100)
    with pytest.raises(RuntimeError):
        async with admission.slot(acme, cfg):
            raise RuntimeError("boom")
    assert admission.in_flight("acme") == 0

    entered = asyncio.Event()

    async def hold() -> None:
        async with admission.slot(acme, cfg):
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(hold())
    await entered.wait()
    assert admission.in_flight("acme") == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert admission.in_flight("acme") == 0
    assert admission.total_in_flight == 0


async def test_admission_under_concurrency_never_exceeds_caps() -> None:
    admission = Admission(max_total=5)
    peak = 0
    refused = 0
    cfgs = {t: TenantConfig(t, max_concurrent=3, max_tokens=100) for t in ("a", "b", "c")}

    async def request(tenant: str) -> None:
        nonlocal peak, refused
        try:
            async with admission.slot(principal(tenant, Role.USER), cfgs[tenant]):
                peak = max(peak, admission.total_in_flight)
                assert admission.in_flight(tenant) <= 3
                await asyncio.sleep(0.001)
        except errors.ResourceExhausted:
            refused += 1

    await asyncio.gather(*(request("abc"[i % 3]) for i in range(60)))
    assert peak == 5
    assert refused > 0
    assert admission.total_in_flight == 0


def test_slot_requires_the_principals_tenant() -> None:
    with pytest.raises(ValueError, match="own tenant"):
        Admission(2).slot(
            principal("acme", Role.USER), TenantConfig("globex", max_concurrent=1, max_tokens=1)
        )


def test_every_tenant_limit_is_read_from_the_file_or_defaults() -> None:
    defaults = TenantDefaults(max_pins=3, tokens_per_minute=600)
    doc = {
        "tenants": {
            "acme": {
                "max_engine_slots": 2,
                "max_pins": 1,
                "max_concurrent_uploads": 1,
                "max_stored_bytes": 1000,
                "max_adapters": 5,
                "tokens_per_minute": 0,
                "requests_per_minute": 60,
            },
            "globex": {},
        }
    }
    keys = KeyRing.from_mapping(doc, defaults)
    assert keys.tenant("acme") == TenantConfig(
        "acme",
        max_engine_slots=2,
        max_pins=1,
        max_concurrent_uploads=1,
        max_stored_bytes=1000,
        max_adapters=5,
        tokens_per_minute=0,
        requests_per_minute=60,
    )
    assert keys.tenant("globex") == TenantConfig("globex", max_pins=3, tokens_per_minute=600)
    assert keys.tenant("nobody").tokens_per_minute == 600


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_pins", 0, "max_pins must be an integer >= 1"),
        ("max_stored_bytes", -1, "max_stored_bytes must be an integer >= 1"),
        ("tokens_per_minute", -5, "tokens_per_minute must be an integer >= 0"),
        ("requests_per_minute", "lots", "requests_per_minute must be an integer >= 0"),
        ("max_adapters", True, "max_adapters must be an integer >= 1"),
    ],
)
def test_bad_tenant_limits_are_refused_by_name(field: str, value: object, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=f"tenant acme: {message}"):
        KeyRing.from_mapping({"tenants": {"acme": {field: value}}}, TenantDefaults())
