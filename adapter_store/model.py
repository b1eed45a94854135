"""Domain types of the adapter store: names, references, versions, manifests, the base model.

Everything here is a plain dataclass. Manifests are stored as JSON (never pickle) and parsed
strictly: a manifest that does not have the expected shape is reported, not guessed at.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from adapter_store.errors import AdapterNotFound, IntegrityError, InvalidAdapter, Quarantined
from adapter_store.evaluations import (
    AliasPolicy,
    EvaluationResult,
    EvaluationSetRef,
    parse_alias_policies,
    parse_evaluations,
)
from adapter_store.rollback import (
    EvaluationClaim,
    RollbackPolicy,
    RollbackRecord,
    parse_claims,
    parse_policies,
    parse_records,
    parse_stable,
)

__all__ = [
    "ADAPTER_FILES",
    "CHAT_TEMPLATE_FILE",
    "CONFIG_FILE",
    "DEFAULT_ALIAS",
    "DTYPE_MAX",
    "MAX_ALIAS_VERSIONS",
    "MODULE_PARENTS",
    "NAME_PATTERN",
    "OPTIONAL_FILES",
    "VERSION_FILES",
    "WEIGHTS_FILE",
    "WEIGHT_SUM_TOLERANCE",
    "AdapterRef",
    "AdapterVersion",
    "BaseModelSpec",
    "FileEntry",
    "Limits",
    "Manifest",
    "Page",
    "can_use",
    "check_name",
    "check_sha",
    "not_found",
    "pick_weighted",
    "primary_of",
    "route_point",
    "sha256_file",
    "utc_now",
    "version_sha",
]

#: Tenants, adapter names and aliases. ASCII only; ".." is refused on top of the pattern.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_SHA_PREFIX = "sha256:"

#: The alias every upload moves to the new version.
DEFAULT_ALIAS = "latest"

#: Most versions one weighted alias may split its traffic between (Limits.max_alias_versions
#: is the deployment's; this is its default).
MAX_ALIAS_VERSIONS = 4
#: The weights of a weighted alias must sum to 1 within this.
WEIGHT_SUM_TOLERANCE = 1e-6

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
#: The files every adapter version consists of, in the order they are uploaded.
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
#: The adapter's own chat template (Jinja, UTF-8), as PEFT/transformers save it next to
#: adapter_config.json. Validated at upload; the gateway renders the version's chat prompts with it.
CHAT_TEMPLATE_FILE = "chat_template.jinja"
#: Files a version may carry besides `ADAPTER_FILES`, uploaded after them in this order.
OPTIONAL_FILES = (CHAT_TEMPLATE_FILE,)
#: Every file name a version may hold: the only names that reach a storage key or a cache path.
VERSION_FILES = ADAPTER_FILES + OPTIONAL_FILES

#: Llama/Mistral/Qwen2 module name -> the submodule of a decoder layer that holds it.
MODULE_PARENTS: Mapping[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

Status = Literal["active", "revoked"]
#: A version is also "quarantined" when the runtime canary found the engine corrupted after it
#: was loaded: it stays in the manifest (so that every replica and a restarted process refuse it
#: with a clear error, and a re-upload of the same bytes stays quarantined) but never serves.
VersionStatus = Literal["active", "revoked", "quarantined"]
_VERSION_STATUSES: tuple[VersionStatus, ...] = ("active", "revoked", "quarantined")

#: Largest finite value of each serving dtype (float16 65,504; bfloat16 about 3.39e38).
DTYPE_MAX: Mapping[str, float] = {
    "float16": 65504.0,
    "bfloat16": float.fromhex("0x1.fep127"),
    "float32": float.fromhex("0x1.fffffep127"),
}
#: Bytes per element of each serving dtype.
DTYPE_BYTES: Mapping[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4}
#: Spellings of `Settings.dtype` / vLLM's `--dtype` and of config.json's `torch_dtype`.
_DTYPE_NAMES: Mapping[str, str] = {
    "float16": "float16",
    "half": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
}


def check_name(value: object, what: str) -> str:
    """Return `value` if it is a valid tenant/adapter/alias name, else raise InvalidAdapter.

    This is the only gate through which a user string may reach a storage key or a path.
    """
    if not isinstance(value, str):
        raise InvalidAdapter(f"{what} must be a string, got {type(value).__name__}")
    if not _NAME_RE.fullmatch(value) or ".." in value:
        raise InvalidAdapter(
            f"invalid {what} {value[:80]!r}: use 1-64 ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return value


def check_sha(value: object, what: str = "version") -> str:
    """Return a 64-hex lowercase sha256 (an optional "sha256:" prefix is removed)."""
    if isinstance(value, str) and value.startswith(_SHA_PREFIX):
        value = value[len(_SHA_PREFIX) :]
    if not isinstance(value, str) or not _SHA_RE.fullmatch(value):
        raise InvalidAdapter(f"invalid {what}: expected sha256:<64 lowercase hex digits>")
    return value


def can_use(
    tenant: str, owner: str, shared_with: Collection[str], *, operator: bool = False
) -> bool:
    """The sharing rule, the only one: may `tenant` use an adapter of `owner` shared with these?

    Yes for the owner itself, for a tenant the owner shared it with, and for an operator (who
    acts on every tenant). Everything that decides visibility calls this: the store's `resolve`
    and its share index, the gateway's residency, and `tenancy.Policy.can_use`.
    """
    return operator or owner == tenant or tenant in shared_with


def utc_now() -> str:
    """The current time as RFC 3339 UTC with second precision, e.g. 2025-01-31T12:00:00Z."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AdapterRef:
    """What a request names: `[owner/]name[@alias | @sha256:<hex>]`."""

    owner: str | None
    name: str
    alias: str | None = None
    #: 64 hex digits, without the "sha256:" prefix.
    version: str | None = None

    def __post_init__(self) -> None:
        if self.owner is not None:
            check_name(self.owner, "tenant")
        check_name(self.name, "adapter name")
        if self.alias is not None and self.version is not None:
            raise InvalidAdapter("an adapter reference names an alias or a version, not both")
        if self.alias is not None:
            check_name(self.alias, "alias")
        if self.version is not None:
            check_sha(self.version)

    @classmethod
    def parse(cls, text: object) -> AdapterRef:
        if not isinstance(text, str) or len(text) > 300:
            raise InvalidAdapter("invalid adapter reference: expected [owner/]name[@alias]")
        owner: str | None = None
        rest = text
        if "/" in rest:
            owner, rest = rest.split("/", 1)
        name, sep, selector = rest.partition("@")
        if sep and not selector:
            raise InvalidAdapter(f"invalid adapter reference {text[:80]!r}: empty after '@'")
        if selector.startswith(_SHA_PREFIX):
            return cls(owner=owner, name=name, version=check_sha(selector))
        return cls(owner=owner, name=name, alias=selector or None)

    @property
    def selector(self) -> str:
        """The alias or version this reference selects (the default alias when neither)."""
        if self.version is not None:
            return _SHA_PREFIX + self.version
        return self.alias or DEFAULT_ALIAS

    def __str__(self) -> str:
        text = f"{self.owner}/{self.name}" if self.owner else self.name
        if self.version is not None:
            return f"{text}@{_SHA_PREFIX}{self.version}"
        if self.alias is not None:
            return f"{text}@{self.alias}"
        return text


@dataclass(frozen=True)
class FileEntry:
    """One file of an adapter version."""

    filename: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"filename": self.filename, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: object) -> FileEntry:
        obj = _obj(data, "file entry")
        filename = _get(obj, "filename", str)
        if filename not in VERSION_FILES:
            raise IntegrityError(f"manifest names an unexpected file {filename[:80]!r}")
        size = _get(obj, "size", int)
        if size < 0:
            raise IntegrityError("manifest file size is negative")
        return cls(filename=filename, size=size, sha256=_manifest_sha(_get(obj, "sha256", str)))


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read through one reused 256 KiB buffer."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def version_sha(files: Iterable[FileEntry]) -> str:
    """The content address of a version: sha256 over sorted "filename\\0sha256\\n" lines."""
    lines = sorted(f"{f.filename}\0{f.sha256}\n" for f in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@dataclass(frozen=True)
class AdapterVersion:
    """One immutable, content-addressed version of a tenant's adapter."""

    tenant: str
    name: str
    #: 64 hex digits: `version_sha(files)`.
    sha: str
    files: tuple[FileEntry, ...]
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str
    dtype: str
    created_at: str
    created_by: str
    status: VersionStatus = "active"
    use_rslora: bool = False
    description: str = ""
    #: For a composed version: (reference of the part, weight) pairs.
    composed_from: tuple[tuple[str, float], ...] = ()
    #: Why the version is quarantined (status "quarantined"), for the caller and the operator.
    quarantine_reason: str = ""
    #: When it was uploaded, in microseconds since the epoch (0: before this field existed;
    #: `created_at` stands in then): the order the retention policy keeps versions by.
    uploaded_us: int = 0

    @property
    def upload_order(self) -> tuple[int, str, str]:
        """The key that orders versions by upload time (newest last): `uploaded_us`, or
        `created_at` for a version written before it existed, then the sha (a tie)."""
        return (self.uploaded_us or _created_us(self.created_at), self.created_at, self.sha)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def version_id(self) -> str:
        return _SHA_PREFIX + self.sha

    @property
    def chat_template(self) -> FileEntry | None:
        """The version's own chat template file (its sha256 is part of the content address),
        None when it has none (its chat prompts use the base model's template)."""
        for entry in self.files:
            if entry.filename == CHAT_TEMPLATE_FILE:
                return entry
        return None

    def file(self, filename: str) -> FileEntry:
        for entry in self.files:
            if entry.filename == filename:
                return entry
        raise AdapterNotFound(f"version {self.version_id} has no file {filename[:80]!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "name": self.name,
            "sha": self.sha,
            "files": [f.to_dict() for f in self.files],
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "base_model": self.base_model,
            "dtype": self.dtype,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "status": self.status,
            "use_rslora": self.use_rslora,
            "description": self.description,
            "composed_from": [[ref, weight] for ref, weight in self.composed_from],
            **({"quarantine_reason": self.quarantine_reason} if self.quarantine_reason else {}),
            **({"uploaded_us": self.uploaded_us} if self.uploaded_us else {}),
        }

    @classmethod
    def from_dict(cls, data: object) -> AdapterVersion:
        obj = _obj(data, "version")
        files = tuple(FileEntry.from_dict(f) for f in _get(obj, "files", list))
        sha = _manifest_sha(_get(obj, "sha", str))
        if version_sha(files) != sha:
            raise IntegrityError(f"manifest version {sha} does not match its files")
        status = _get(obj, "status", str)
        if status not in _VERSION_STATUSES:
            raise IntegrityError(f"manifest has an unknown version status {status[:20]!r}")
        reason = obj.get("quarantine_reason", "")
        if not isinstance(reason, str):
            raise IntegrityError("stored manifest: field 'quarantine_reason' has the wrong type")
        uploaded_us = obj.get("uploaded_us", 0)
        if isinstance(uploaded_us, bool) or not isinstance(uploaded_us, int) or uploaded_us < 0:
            raise IntegrityError("stored manifest: field 'uploaded_us' has the wrong type")
        composed: list[tuple[str, float]] = []
        for item in _get(obj, "composed_from", list):
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not isinstance(item[0], str)
                or not isinstance(item[1], int | float)
            ):
                raise IntegrityError("manifest has a malformed composed_from entry")
            composed.append((item[0], float(item[1])))
        return cls(
            tenant=_get(obj, "tenant", str),
            name=_get(obj, "name", str),
            sha=sha,
            files=files,
            rank=_get(obj, "rank", int),
            alpha=float(_get(obj, "alpha", (int, float))),
            target_modules=tuple(_str_list(_get(obj, "target_modules", list))),
            base_model=_get(obj, "base_model", str),
            dtype=_get(obj, "dtype", str),
            created_at=_get(obj, "created_at", str),
            created_by=_get(obj, "created_by", str),
            status=_VERSION_STATUSES[_VERSION_STATUSES.index(status)],
            use_rslora=_get(obj, "use_rslora", bool),
            description=_get(obj, "description", str),
            composed_from=tuple(composed),
            quarantine_reason=reason,
            uploaded_us=uploaded_us,
        )


def _created_us(created_at: str) -> int:
    """`created_at` (RFC 3339) in microseconds since the epoch; 0 if it does not parse."""
    try:
        return int(datetime.fromisoformat(created_at).timestamp() * 1_000_000)
    except ValueError:
        return 0


def route_point(caller: str, owner: str, name: str, alias: str, routing_key: str) -> float:
    """Where a request falls in [0, 1) on a weighted alias: the first 8 bytes of the sha256 of
    (caller tenant, owner, adapter, alias, routing key), NUL-separated, over 2**64.

    A pure function of its arguments, the same on every replica and after a restart, so one
    routing key stays on one version while the weights are unchanged. Nothing secret: a
    caller that chooses its routing key can choose its version, as it can by naming the sha.
    """
    text = "\0".join((caller, owner, name, alias, routing_key))
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def pick_weighted(weights: Mapping[str, float], point: float) -> str:
    """The sha whose slice of [0, 1) holds `point`: the weights laid end to end in sha order
    (normalised by their sum). With two versions, raising one's weight only moves keys onto
    it, never between the others."""
    if not weights:
        raise ValueError("no weights")
    total = math.fsum(weights.values())
    cumulative = 0.0
    ordered = sorted(weights.items())
    for sha, weight in ordered:
        cumulative += weight / total
        if point < cumulative:
            return sha
    return ordered[-1][0]  # rounding: the sum of the slices fell short of 1


def primary_of(weights: Mapping[str, float]) -> str:
    """The version with the most weight (the smallest sha of a tie): what a weighted alias
    names in `Manifest.aliases`, so that readers without weights (an older gateway, a lookup
    with no routing key) serve it."""
    return min(weights.items(), key=lambda item: (-item[1], item[0]))[0]


@dataclass(frozen=True)
class Manifest:
    """Everything known about one adapter of one tenant; stored as JSON next to its versions.

    `versions` holds the live versions only; a revoked version's sha moves to `revoked` (kept as
    a tombstone so that a revocation is idempotent and replicas can see it). A revoked adapter
    (`status == "revoked"`) is never returned by the store's read paths.

    An alias is plain (`aliases[alias]` is its version) or weighted (a canary): then
    `alias_weights[alias]` maps 2 or more live versions to weights summing to 1, and
    `aliases[alias]` is still set, to the version with the most weight (`primary_of`). The
    JSON keeps `aliases` a plain map and adds `alias_weights` only when there are any, so
    manifests written before weighted aliases read as before, and a reader that predates them
    serves the primary version.
    """

    tenant: str
    name: str
    versions: dict[str, AdapterVersion] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    shared_with: tuple[str, ...] = ()
    status: Status = "active"
    revoked: tuple[str, ...] = ()
    #: The backend's entity tag of the stored manifest this was read from (None: not stored).
    etag: str | None = None
    #: Weighted aliases: alias -> {sha: weight} (2 or more live versions, weights > 0, sum 1).
    alias_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    #: The current evaluation set (adapter_store.evaluations); None: none uploaded.
    evaluation_set: EvaluationSetRef | None = None
    #: Version sha -> its evaluation results, oldest first (appended to, never rewritten).
    evaluations: dict[str, tuple[EvaluationResult, ...]] = field(default_factory=dict)
    #: Alias -> what a version needs before the alias may point at it.
    alias_policies: dict[str, AliasPolicy] = field(default_factory=dict)
    #: The retention policy: keep the newest `keep_last` versions (by upload time) and every
    #: version an alias points at, retire the others (`expired`). None: keep every version.
    keep_last: int | None = None
    #: Automatic rollback (adapter_store.rollback): weighted alias -> its stable version (the
    #: one it pointed at before the split; every other version of the split is a canary).
    alias_stable: dict[str, str] = field(default_factory=dict)
    #: Alias -> when its canaries are rolled back to the stable version.
    rollback_policies: dict[str, RollbackPolicy] = field(default_factory=dict)
    #: Alias -> its last automatic rollback.
    rollbacks: dict[str, RollbackRecord] = field(default_factory=dict)
    #: Version sha -> the replica running its scheduled evaluation now.
    evaluation_claims: dict[str, EvaluationClaim] = field(default_factory=dict)

    def expired(self) -> list[str]:
        """The versions the retention policy retires now: the active ones that are neither
        among the newest `keep_last` (by `AdapterVersion.upload_order`) nor pointed at by an
        alias, plain or weighted. Quarantined versions are never retired by it (nor counted):
        they stay for the operator. [] without a policy."""
        if self.keep_last is None:
            return []
        active = sorted(
            (v for v in self.versions.values() if v.status == "active"),
            key=lambda v: v.upload_order,
            reverse=True,
        )
        kept = {v.sha for v in active[: self.keep_last]}
        kept.update(self.aliases.values())
        for split in self.alias_weights.values():
            kept.update(split)
        return sorted(v.sha for v in active if v.sha not in kept)

    def usable_by(self, tenant: str, *, operator: bool = False) -> bool:
        """`can_use` for this adapter: live, and `tenant` is its owner, a grantee or an operator."""
        return self.status == "active" and can_use(
            tenant, self.tenant, self.shared_with, operator=operator
        )

    def split(self, alias: str) -> dict[str, float]:
        """The alias's traffic split: {sha: weight}; {sha: 1.0} for a plain alias, {} for none."""
        weights = self.alias_weights.get(alias)
        if weights is not None:
            return dict(weights)
        sha = self.aliases.get(alias)
        return {} if sha is None else {sha: 1.0}

    def resolve(
        self, ref: AdapterRef, *, caller: str = "", routing_key: str | None = None
    ) -> AdapterVersion:
        """The live version `ref` selects; AdapterNotFound if missing or revoked, Quarantined
        if the runtime canary quarantined it (callers check visibility before this).

        A weighted alias picks one of its versions: with a `routing_key`, the one whose slice
        holds `route_point(caller, owner, name, alias, routing_key)`; without one (compose
        parts, pins, the warm set), its primary version."""
        if self.status == "active":
            if ref.version is not None:
                sha: str | None = ref.version
            else:
                alias = ref.selector
                weights = self.alias_weights.get(alias)
                if weights is not None and routing_key is not None:
                    point = route_point(caller, self.tenant, self.name, alias, routing_key)
                    sha = pick_weighted(weights, point)
                else:
                    sha = self.aliases.get(alias)
            version = self.versions.get(sha) if sha is not None else None
            if version is not None and version.status == "active":
                return version
            if version is not None and version.status == "quarantined":
                raise Quarantined(
                    f"adapter version {version.version_id} of {self.name!r} is quarantined: "
                    f"{version.quarantine_reason or 'it corrupted the engine'}; it is not served"
                )
        raise not_found(ref)

    def to_json(self) -> bytes:
        data: dict[str, Any] = {
            "format": 1,
            "tenant": self.tenant,
            "name": self.name,
            "status": self.status,
            "versions": {sha: v.to_dict() for sha, v in sorted(self.versions.items())},
            "aliases": dict(sorted(self.aliases.items())),
            "shared_with": sorted(self.shared_with),
            "revoked": sorted(self.revoked),
        }
        if self.alias_weights:
            data["alias_weights"] = {
                alias: dict(sorted(weights.items()))
                for alias, weights in sorted(self.alias_weights.items())
            }
        # Evaluations (adapter_store.evaluations): written only when present, so that a
        # manifest without them reads and writes as before.
        if self.evaluation_set is not None:
            data["evaluation_set"] = self.evaluation_set.to_dict()
        if self.evaluations:
            data["evaluations"] = {
                sha: [result.to_dict() for result in results]
                for sha, results in sorted(self.evaluations.items())
            }
        if self.alias_policies:
            data["alias_policies"] = {
                alias: policy.to_dict() for alias, policy in sorted(self.alias_policies.items())
            }
        if self.keep_last is not None:
            data["retention"] = {"keep_last": self.keep_last}
        # Automatic rollback (adapter_store.rollback): written only when present.
        if self.alias_stable:
            data["alias_stable"] = dict(sorted(self.alias_stable.items()))
        if self.rollback_policies:
            data["rollback_policies"] = {
                alias: policy.to_dict() for alias, policy in sorted(self.rollback_policies.items())
            }
        if self.rollbacks:
            data["rollbacks"] = {
                alias: record.to_dict() for alias, record in sorted(self.rollbacks.items())
            }
        if self.evaluation_claims:
            data["evaluation_claims"] = {
                sha: claim.to_dict() for sha, claim in sorted(self.evaluation_claims.items())
            }
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, etag: str | None = None) -> Manifest:
        try:
            obj = _obj(json.loads(data.decode("utf-8")), "manifest")
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise IntegrityError(f"stored manifest is not valid JSON: {exc}") from None
        return cls.from_obj(obj, etag)

    @classmethod
    def from_obj(cls, obj: Mapping[str, Any], etag: str | None = None) -> Manifest:
        """A manifest from its parsed JSON (`from_json`, and the listing index's copies)."""
        if obj.get("format") != 1:
            raise IntegrityError("stored manifest has an unknown format")
        versions = {}
        for sha, raw in _get(obj, "versions", dict).items():
            version = AdapterVersion.from_dict(raw)
            if version.sha != sha:
                raise IntegrityError(f"manifest version key {sha[:80]!r} does not match")
            versions[sha] = version
        aliases = {}
        for alias, sha in _get(obj, "aliases", dict).items():
            if not isinstance(sha, str) or sha not in versions:
                raise IntegrityError(f"manifest alias {alias[:80]!r} points at no live version")
            aliases[alias] = sha
        alias_weights = _alias_weights(obj.get("alias_weights", {}), aliases, versions)
        keep_last = _retention(obj.get("retention"))
        status = _get(obj, "status", str)
        if status not in ("active", "revoked"):
            raise IntegrityError(f"manifest has an unknown status {status[:20]!r}")
        return cls(
            tenant=_get(obj, "tenant", str),
            name=_get(obj, "name", str),
            versions=versions,
            aliases=aliases,
            shared_with=tuple(_str_list(_get(obj, "shared_with", list))),
            status="active" if status == "active" else "revoked",
            revoked=tuple(_manifest_sha(s) for s in _str_list(_get(obj, "revoked", list))),
            etag=etag,
            alias_weights=alias_weights,
            evaluation_set=(
                None
                if obj.get("evaluation_set") is None
                else EvaluationSetRef.from_dict(obj["evaluation_set"])
            ),
            evaluations=parse_evaluations(
                obj.get("evaluations", {}), [*versions, *_str_list(_get(obj, "revoked", list))]
            ),
            alias_policies=parse_alias_policies(obj.get("alias_policies", {})),
            keep_last=keep_last,
            alias_stable=parse_stable(obj.get("alias_stable", {}), alias_weights),
            rollback_policies=parse_policies(obj.get("rollback_policies", {})),
            rollbacks=parse_records(obj.get("rollbacks", {})),
            evaluation_claims=parse_claims(obj.get("evaluation_claims", {})),
        )


def _retention(raw: object) -> int | None:
    """The stored retention policy's `keep_last` (None: absent, keep every version)."""
    if raw is None:
        return None
    obj = _obj(raw, "manifest retention")
    keep_last = obj.get("keep_last")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise IntegrityError("stored manifest: retention keep_last must be an integer >= 1")
    return keep_last


def _alias_weights(
    raw: object, aliases: Mapping[str, str], versions: Mapping[str, AdapterVersion]
) -> dict[str, dict[str, float]]:
    """The stored `alias_weights`, checked as strictly as the writer made them."""
    if not isinstance(raw, dict):
        raise IntegrityError("stored manifest: field 'alias_weights' has the wrong type")
    parsed: dict[str, dict[str, float]] = {}
    for alias, weights in raw.items():
        what = f"manifest weighted alias {str(alias)[:80]!r}"
        if not isinstance(weights, dict) or len(weights) < 2:
            raise IntegrityError(f"{what} does not split between versions")
        split: dict[str, float] = {}
        for sha, weight in weights.items():
            if not isinstance(sha, str) or sha not in versions:
                raise IntegrityError(f"{what} names no live version")
            if (
                isinstance(weight, bool)
                or not isinstance(weight, int | float)
                or not math.isfinite(weight)
                or weight <= 0
            ):
                raise IntegrityError(f"{what} has a weight that is not a positive number")
            split[sha] = float(weight)
        if abs(math.fsum(split.values()) - 1.0) > WEIGHT_SUM_TOLERANCE:
            raise IntegrityError(f"{what} has weights that do not sum to 1")
        if aliases.get(alias) != primary_of(split):
            raise IntegrityError(f"{what} does not name its primary version in 'aliases'")
        parsed[alias] = split
    return parsed


_T = TypeVar("_T")


@dataclass(frozen=True)
class Page(Generic[_T]):
    """One page of a listing: its items, and where the next page starts."""

    items: list[_T]
    #: Pass as `after` for the next page; None when the listing is complete.
    next_after: str | None
    #: Entries the page's listing returned (items plus those skipped, e.g. revoked): its cost.
    examined: int = 0


def not_found(ref: AdapterRef | str) -> AdapterNotFound:
    """The one NOT_FOUND error: the same text whether missing, revoked or another tenant's."""
    return AdapterNotFound(f"adapter {str(ref)[:200]!r} not found")


@dataclass(frozen=True)
class BaseModelSpec:
    """The deployment's base model, as far as adapter validation needs it."""

    name: str
    #: Other accepted values of an adapter's `base_model_name_or_path`.
    aliases: tuple[str, ...]
    num_layers: int
    #: module name -> (in_features, out_features), e.g. "k_proj": (128, 64).
    module_shapes: Mapping[str, tuple[int, int]]
    max_rank: int
    #: The engine's serving dtype ("float16", "bfloat16" or "float32"): vLLM loads adapter
    #: weights in it and folds the LoRA scaling into lora_B in it, so validation checks that the
    #: effective weights are finite and bounded there.
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_MAX:
            raise InvalidAdapter(
                f"serving dtype {str(self.dtype)[:20]!r} is not one of {', '.join(DTYPE_MAX)}"
            )

    @staticmethod
    def serving_dtype(dtype: str, config: Mapping[str, Any]) -> str:
        """The dtype the engine serves in: `dtype` (Settings.dtype), or with "auto" the model's
        config.json `torch_dtype`. vLLM's "auto" downcasts a float32 (or unstated) config to the
        platform's preferred half type, bfloat16 or float16 depending on the hardware; float16,
        the narrower range, is assumed then, so that validation is never looser than serving."""
        name = str(dtype).lower()
        if name == "auto":
            stated = config.get("torch_dtype", config.get("dtype"))
            text_config = config.get("text_config")
            if stated is None and isinstance(text_config, Mapping):
                stated = text_config.get("torch_dtype", text_config.get("dtype"))
            resolved = _DTYPE_NAMES.get(str(stated).lower()) if stated is not None else None
            return "float16" if resolved in (None, "float32") else resolved
        if name not in _DTYPE_NAMES:
            raise InvalidAdapter(
                f"unknown serving dtype {str(dtype)[:20]!r} (auto, float16, bfloat16, float32)"
            )
        return _DTYPE_NAMES[name]

    def accepts(self, base_model: str) -> bool:
        return base_model == self.name or base_model in self.aliases

    def smallest_full_adapter_bytes(self) -> int:
        """Bytes of the smallest adapter that changes every layer: rank 1 on the narrowest
        module (a 1 x in lora_A and an out x 1 lora_B per layer) in the serving dtype. The host
        tier counts each version as at least this (`Slots`), so the count it derives from a byte
        budget (`Settings.engine_cpu_loras`) never binds before the bytes do."""
        if not self.module_shapes or self.num_layers < 1:
            return 1
        narrowest = min(inputs + outputs for inputs, outputs in self.module_shapes.values())
        return narrowest * self.num_layers * DTYPE_BYTES[self.dtype]

    @classmethod
    def from_hf_config(
        cls,
        model_dir: Path,
        *,
        max_rank: int,
        aliases: Sequence[str] = (),
        dtype: str = "auto",
    ) -> BaseModelSpec:
        """Read a Llama/Mistral/Qwen2-style `config.json` from a model directory.

        `dtype` is the engine's (Settings.dtype); see `serving_dtype` for "auto"."""
        path = Path(model_dir) / "config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidAdapter(f"cannot read the base model's config.json: {exc}") from None
        obj = _obj(config, "config.json", error=InvalidAdapter)

        def positive(key: str, default: int | None = None) -> int:
            value = obj.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidAdapter(f"base model config.json: {key} must be a positive integer")
            return value

        hidden = positive("hidden_size")
        heads = positive("num_attention_heads")
        kv_heads = positive("num_key_value_heads", heads)
        head_dim = obj.get("head_dim") or hidden // heads
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise InvalidAdapter("base model config.json: head_dim must be a positive integer")
        intermediate = positive("intermediate_size")
        if not isinstance(max_rank, int) or max_rank < 1:
            raise InvalidAdapter("max_rank must be a positive integer")
        name = obj.get("_name_or_path")
        if not isinstance(name, str) or not name:
            name = Path(model_dir).name
        return cls(
            name=name,
            aliases=tuple(dict.fromkeys([*aliases, str(model_dir)])),
            num_layers=positive("num_hidden_layers"),
            module_shapes={
                "q_proj": (hidden, heads * head_dim),
                "k_proj": (hidden, kv_heads * head_dim),
                "v_proj": (hidden, kv_heads * head_dim),
                "o_proj": (heads * head_dim, hidden),
                "gate_proj": (hidden, intermediate),
                "up_proj": (hidden, intermediate),
                "down_proj": (intermediate, hidden),
            },
            max_rank=max_rank,
            dtype=cls.serving_dtype(dtype, obj),
        )


@dataclass(frozen=True)
class Limits:
    """Size caps applied while bytes arrive and while parsing (the max rank is the model's)."""

    max_file_bytes: int = 512 * 1024 * 1024
    max_config_bytes: int = 64 * 1024
    max_header_bytes: int = 1024 * 1024
    max_description_chars: int = 1024
    #: Largest chat_template.jinja (UTF-8 bytes); the gateway sets it from
    #: `chat_template_max_bytes`.
    max_chat_template_bytes: int = 64 * 1024
    #: ComposeAdapter: most parts, and most stored bytes of all parts (checked from manifests).
    max_compose_parts: int = 8
    max_compose_bytes: int = 1024 * 1024 * 1024
    #: Most versions one weighted alias may split its traffic between.
    max_alias_versions: int = MAX_ALIAS_VERSIONS


# --- strict JSON helpers for reading manifests back ----------------------------------------


def _obj(data: object, what: str, error: type[Exception] = IntegrityError) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise error(f"{what} must be a JSON object")
    return data


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = obj.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise IntegrityError(f"stored manifest: field {key!r} is missing or has the wrong type")
    return value


def _str_list(values: list[Any]) -> list[str]:
    if not all(isinstance(v, str) for v in values):
        raise IntegrityError("stored manifest: expected a list of strings")
    return list(values)


def _manifest_sha(value: str) -> str:
    if not _SHA_RE.fullmatch(value):
        raise IntegrityError("stored manifest holds a malformed sha256")
    return value
