"""The adapter registry: `AdapterStore`, what the gateway codes against, and `Registry`.

`Registry` implements it over a `BlobBackend` (a folder or S3, with the same semantics). It owns
the life of an adapter version: published atomically, resolved, aliased, revoked, quarantined;
the other jobs are modules of their own that it puts together (the package docstring has the
map): the key layout (keys.py), the upload (upload.py), manifests (manifests.py), sharing
(sharing.py), usage and quotas (quota.py), listings (pages.py), composition (compose.py).

Publishing is atomic: a version's objects are written first and the manifest is updated last;
if anything fails the objects written are deleted and nothing becomes visible. With a `Quota`,
a publish charges the tenant's usage object first and is refused beyond the quota.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import EllipsisType
from typing import Protocol

from adapter_store.backend import BlobBackend
from adapter_store.changes import ChangePage
from adapter_store.compose import compose_adapter
from adapter_store.errors import (
    AdapterNotFound,
    BlobNotFound,
    CapacityExceeded,
    Conflict,
    IntegrityError,
    InvalidAdapter,
    Quarantined,
    StoreError,
)
from adapter_store.evaluations import (
    MAX_RESULTS_PER_VERSION,
    AliasPolicy,
    EvaluationResult,
    EvaluationSetRef,
    check_min_score,
    gate,
)
from adapter_store.index import INDEXED, IndexReport
from adapter_store.keys import (
    TENANTS,
    adapters_prefix,
    child_name,
    evaluation_set_key,
    evaluation_sets_prefix,
    object_key,
)
from adapter_store.manifests import DEFAULT_RETRIES, Manifests, is_live, live
from adapter_store.model import (
    CHAT_TEMPLATE_FILE,
    DEFAULT_ALIAS,
    VERSION_FILES,
    WEIGHT_SUM_TOLERANCE,
    AdapterRef,
    AdapterVersion,
    BaseModelSpec,
    FileEntry,
    Limits,
    Manifest,
    Page,
    check_name,
    check_sha,
    not_found,
    primary_of,
    sha256_file,
    utc_now,
    version_sha,
)
from adapter_store.pages import MAX_PAGE, all_pages, list_page
from adapter_store.quota import Quota, Usage, UsageLedger
from adapter_store.rollback import (
    EvaluationClaim,
    RollbackPolicy,
    RollbackRecord,
    canaries,
    timestamp_us,
)
from adapter_store.sharing import ShareIndex, ShareRepair
from adapter_store.spool import Spool
from adapter_store.sweep import SweepReport, sweep_orphans
from adapter_store.upload import (
    SpooledAdapter,
    TemplateCheck,
    Upload,
    check_declared,
    check_metadata,
    declare_folder,
)
from adapter_store.validate import validate_adapter

__all__ = ["AdapterStore", "Registry"]

log = logging.getLogger(__name__)


class AdapterStore(Protocol):
    """What the gateway codes against. Methods are synchronous: run them in a thread."""

    spec: BaseModelSpec
    limits: Limits
    spool: Spool

    def begin_upload(
        self,
        tenant: str,
        name: str,
        declared: Sequence[FileEntry],
        *,
        created_by: str,
        aliases: Sequence[str] = (),
        description: str = "",
        quota: Quota | None = None,
        check_template: TemplateCheck | None = None,
    ) -> Upload: ...

    def upload_dir(
        self,
        tenant: str,
        name: str,
        path: Path,
        *,
        created_by: str,
        aliases: Sequence[str] = (),
        description: str = "",
        quota: Quota | None = None,
        check_template: TemplateCheck | None = None,
    ) -> AdapterVersion: ...

    def usage(self, tenant: str) -> Usage: ...

    def get_manifest(self, tenant: str, name: str) -> Manifest: ...

    def get_manifest_if_changed(self, tenant: str, name: str, etag: str) -> Manifest | None: ...

    def changes(self, since_us: int, *, position: str = "") -> ChangePage: ...

    def expire_changes(self, before_us: int) -> int: ...

    def list_adapters(self, tenant: str) -> list[Manifest]: ...

    def list_tenants(self) -> list[str]: ...

    def list_shared_with(self, tenant: str) -> list[Manifest]: ...

    def adapter_page(self, tenant: str, *, after: str = "", limit: int = 100) -> Page[Manifest]: ...

    def shared_page(self, tenant: str, *, after: str = "", limit: int = 100) -> Page[Manifest]: ...

    def tenant_page(self, *, after: str = "", limit: int = 100) -> Page[str]: ...

    def share_hints(self, tenant: str) -> frozenset[tuple[str, str]]: ...

    def resolve(
        self, tenant: str, ref: AdapterRef, *, routing_key: str | None = None
    ) -> AdapterVersion: ...

    def set_alias(
        self,
        tenant: str,
        name: str,
        alias: str,
        target: str,
        expected: str | None = None,
        *,
        require_eval_min_score: float | None = None,
    ) -> Manifest: ...

    def set_alias_weights(
        self,
        tenant: str,
        name: str,
        alias: str,
        weights: Mapping[str, float],
        expected: Mapping[str, float] | None = None,
        *,
        require_eval_min_score: float | None = None,
    ) -> Manifest: ...

    def put_evaluation_set(
        self, tenant: str, name: str, data: bytes, *, cases: int, uploaded_by: str
    ) -> Manifest: ...

    def evaluation_set(self, tenant: str, name: str, sha: str) -> bytes: ...

    def add_evaluation(self, tenant: str, name: str, result: EvaluationResult) -> Manifest: ...

    def set_alias_policy(
        self, tenant: str, name: str, alias: str, min_score: float | None
    ) -> Manifest: ...

    def remove_alias(self, tenant: str, name: str, alias: str) -> Manifest: ...

    def set_rollback_policy(
        self, tenant: str, name: str, alias: str, policy: RollbackPolicy | None
    ) -> Manifest: ...

    def rollback(
        self,
        tenant: str,
        name: str,
        alias: str,
        expected: Mapping[str, float],
        record: RollbackRecord,
    ) -> tuple[Manifest, bool]: ...

    def claim_evaluation(
        self, tenant: str, name: str, sha: str, *, interval_s: float, by: str
    ) -> tuple[Manifest, bool]: ...

    def share(self, tenant: str, name: str, grantee: str) -> Manifest: ...

    def unshare(self, tenant: str, name: str, grantee: str) -> Manifest: ...

    def revoke(
        self, tenant: str, name: str, version: str | None = None, *, delete_objects: bool = True
    ) -> list[str]: ...

    def purge(self, tenant: str, name: str, shas: Iterable[str]) -> None: ...

    def set_retention(
        self, tenant: str, name: str, keep_last: int | None, *, delete_objects: bool = True
    ) -> tuple[Manifest, list[str]]: ...

    def retire_expired(
        self, tenant: str, name: str, *, delete_objects: bool = True
    ) -> tuple[Manifest, list[str]]: ...

    def quarantine(self, tenant: str, name: str, sha: str, reason: str) -> Manifest: ...

    def compose(
        self,
        tenant: str,
        name: str,
        parts: Sequence[tuple[AdapterRef, float]],
        *,
        created_by: str,
        aliases: Sequence[str] = (),
        description: str = "",
        quota: Quota | None = None,
    ) -> AdapterVersion: ...

    def fetch_file(self, version: AdapterVersion, filename: str, dest: Path) -> None: ...


class Registry:
    """`AdapterStore` over a `BlobBackend`, for one deployment's base model."""

    def __init__(
        self,
        backend: BlobBackend,
        spec: BaseModelSpec,
        limits: Limits | None = None,
        *,
        spool_dir: Path | None = None,
        spool: Spool | None = None,
        max_retries: int = DEFAULT_RETRIES,
    ) -> None:
        self.backend = backend
        self.spec = spec
        self.limits = limits or Limits()
        #: Where uploads and compositions spool, and their byte budget (none by default).
        self.spool = spool if spool is not None else Spool(spool_dir)
        self._manifests = Manifests(backend, max_retries=max_retries)
        self._shares = ShareIndex(backend, self._manifests)
        self._usage = UsageLedger(backend, self.stored_adapters)

    # --- uploads and publishing ---------------------------------------------------------------

    def begin_upload(
        self,
        tenant: str,
        name: str,
        declared: Sequence[FileEntry],
        *,
        created_by: str,
        aliases: Sequence[str] = (),
        description: str = "",
        quota: Quota | None = None,
        check_template: TemplateCheck | None = None,
    ) -> Upload:
        """Check the header and reserve what it declares, before any byte is received.

        Refused here (nothing spooled): a bad name or file list, a declared size above the cap
        (CapacityExceeded), the tenant's quota (QuotaExceeded, with `quota`), a full spool
        (SpoolFull). The upload's `commit` hands what it received to `publish`, which charges
        the quota for good."""
        check_name(tenant, "tenant")
        check_name(name, "adapter name")
        aliases = tuple(check_name(alias, "alias") for alias in aliases)
        check_metadata(created_by, description, self.limits)
        entries = check_declared(declared, self.limits)
        if quota is not None:
            self.check_quota(tenant, name, sum(e.size for e in entries), quota, "this upload")
        publish = functools.partial(
            self.publish,
            tenant,
            name,
            created_by=created_by,
            aliases=aliases,
            description=description,
            quota=quota,
            check_template=check_template,
        )
        return Upload.start(self.spool, entries, publish)

    def upload_dir(
        self,
        tenant: str,
        name: str,
        path: Path,
        *,
        created_by: str,
        aliases: Sequence[str] = (),
        description: str = "",
        quota: Quota | None = None,
        check_template: TemplateCheck | None = None,
    ) -> AdapterVersion:
        """Upload a local PEFT adapter folder (a README.md in it is ignored)."""
        with self.begin_upload(
            tenant,
            name,
            declare_folder(path),
            created_by=created_by,
            aliases=aliases,
            description=description,
            quota=quota,
            check_template=check_template,
        ) as upload:
            upload.write_folder(path)
            return upload.commit()

    def check_quota(self, tenant: str, name: str, nbytes: int, quota: Quota, what: str) -> None:
        """Refuse early (QuotaExceeded, before anything is spooled) what the quota cannot take:
        `nbytes` more, and one more adapter unless `name` is live already. `publish` charges."""
        new_name = not is_live(self._manifests.read(tenant, name))
        self._usage.usage(tenant).check(quota, nbytes, 1 if new_name else 0, what)

    def publish(
        self,
        tenant: str,
        name: str,
        adapter: SpooledAdapter,
        *,
        created_by: str,
        aliases: Sequence[str] = (),
        description: str = "",
        composed_from: tuple[tuple[str, float], ...] = (),
        quota: Quota | None = None,
        check_template: TemplateCheck | None = None,
    ) -> AdapterVersion:
        """Validate the spooled adapter's files, store them, then add the version to the
        manifest: it becomes `latest` and each of `aliases`.

        A chat_template.jinja among them is checked by `validate_adapter` (UTF-8, size) and then
        by `check_template` (the gateway's sandbox: it compiles and renders); without a
        `check_template` a template is refused (InvalidAdapter), never stored unchecked. Its
        sha256 is part of the version's content address, like the other files'.

        Validation may rewrite a file in place (AdaLoRA normalised to LoRA; the extra bytes
        are reserved in `adapter.space` first). Re-publishing identical content is the same
        version; content revoked or quarantined under `name` is refused. With `quota`, the
        tenant's usage is charged before anything is stored (QuotaExceeded beyond it) and
        refunded if the publish fails or added nothing new. The spool folder stays the
        caller's."""
        check_name(tenant, "tenant")
        check_name(name, "adapter name")
        aliases = tuple(check_name(alias, "alias") for alias in aliases)
        check_metadata(created_by, description, self.limits)
        paths = adapter.paths()
        validated = validate_adapter(paths, self.spec, self.limits)
        if validated.chat_template is not None:
            if check_template is None:
                raise InvalidAdapter(
                    f"{CHAT_TEMPLATE_FILE}: chat templates are not accepted here "
                    "(no template check)"
                )
            check_template(validated.chat_template)
        for filename, data in validated.rewritten.items():
            if adapter.space is not None:
                adapter.space.grow(
                    len(data) - paths[filename].stat().st_size, "rewriting this adapter"
                )
            paths[filename].write_bytes(data)
        files = tuple(
            FileEntry(filename, path.stat().st_size, sha256_file(path))
            for filename, path in paths.items()
        )
        sha = version_sha(files)
        version = AdapterVersion(
            tenant=tenant,
            name=name,
            sha=sha,
            files=files,
            rank=validated.rank,
            alpha=validated.alpha,
            target_modules=validated.target_modules,
            base_model=validated.base_model,
            dtype=validated.dtype,
            created_at=utc_now(),
            created_by=created_by,
            use_rslora=validated.use_rslora,
            description=description,
            composed_from=composed_from,
            uploaded_us=time.time_ns() // 1000,
        )
        existing = self._manifests.read(tenant, name)
        # What this publish adds, charged before anything is stored (and refused beyond the
        # quota); corrected to what it really added once the manifest is written.
        charged = [0, 0]
        if existing is None or sha not in existing.versions:
            charged = [version.total_bytes, 0 if is_live(existing) else 1]
        counted = self._usage.change(
            tenant, charged[0], charged[1], quota, "this adapter", create=quota is not None
        )
        added = [0, 0]
        written: list[str] = []
        try:
            if existing is None or sha not in existing.versions:
                for entry in files:
                    key = object_key(tenant, name, sha, entry.filename)
                    written.append(key)
                    self.backend.put_file(key, paths[entry.filename])

            def add(current: Manifest | None) -> Manifest:
                base = current or Manifest(tenant=tenant, name=name)
                if sha in base.revoked:
                    raise Conflict(
                        f"this exact content was revoked as {version.version_id} of {name!r} "
                        "and cannot be published again"
                    )
                known = base.versions.get(sha)
                if known is not None and known.status == "quarantined":
                    raise Quarantined(
                        f"this exact content is quarantined as {version.version_id} of {name!r}"
                        f" ({known.quarantine_reason}) and cannot be published again"
                    )
                added[:] = [
                    0 if sha in base.versions else version.total_bytes,
                    0 if is_live(current) else 1,
                ]
                versions = dict(base.versions)
                versions.setdefault(sha, version)
                new_aliases = dict(base.aliases)
                moved = (DEFAULT_ALIAS, *aliases)
                for alias in moved:
                    new_aliases[alias] = sha
                weights = {a: w for a, w in base.alias_weights.items() if a not in moved}
                return replace(
                    base,
                    status="active",
                    versions=versions,
                    aliases=new_aliases,
                    alias_weights=weights,
                    alias_stable=_without_aliases(base, moved),
                )

            published = self._manifests.update(tenant, name, add).versions[sha]
        except BaseException:
            self._clean_up(tenant, name, sha, written)
            if counted and any(charged):
                self._usage.refund(tenant, charged[0], charged[1])
            raise
        if counted and added != charged:
            # A concurrent writer published the same bytes or created the name meanwhile: make
            # the usage say what this publish really added.
            self._usage.change(tenant, added[0] - charged[0], added[1] - charged[1], None, "")
        if written:
            self._recheck(written, paths)
        return published

    def _recheck(self, keys: Sequence[str], paths: Mapping[str, Path]) -> None:
        """After the manifest names a version whose objects this publish (re)wrote: write any
        of them again that is gone. The orphan sweeper deletes an old object only after a
        second look at its age (adapter_store.sweep); this closes the last window, in which it
        deleted the object of a crashed upload just as a re-upload of the same bytes rewrote it.
        """
        for key in keys:
            try:
                self.backend.modified(key)
            except BlobNotFound:
                log.warning("publish: an object of the new version was gone; written again")
                self.backend.put_file(key, paths[key.rsplit("/", 1)[1]])

    def _clean_up(self, tenant: str, name: str, sha: str, keys: Iterable[str]) -> None:
        """Delete objects of a failed publish unless a manifest now refers to them."""
        try:
            current = self._manifests.read(tenant, name)
            if current is not None and sha in current.versions:
                return
            for key in keys:
                self.backend.delete(key)
        except StoreError:
            log.warning("could not clean up objects of a failed upload under %s", tenant)

    #: Publish the weighted sum of `tenant`'s own adapter versions as a new version: the
    #: workflow of adapter_store.compose (bounded from the manifests before anything is
    #: fetched), over this registry's public methods.
    compose = compose_adapter

    # --- usage and quotas (adapter_store.quota) ------------------------------------------------

    def usage(self, tenant: str) -> Usage:
        """The tenant's stored bytes and adapters (counted from its manifests until its first
        publish with a quota)."""
        return self._usage.usage(tenant)

    def recount_usage(self, tenant: str) -> Usage:
        """Recompute the tenant's usage from its manifests and store it (a repair, e.g. after a
        crash between a charge and its manifest); a bounded scan of that tenant only."""
        return self._usage.recount(tenant)

    # --- manifests and listings ---------------------------------------------------------------

    def get_manifest(self, tenant: str, name: str) -> Manifest:
        return live(self._manifests.read(tenant, name), name)

    def get_manifest_if_changed(self, tenant: str, name: str, etag: str) -> Manifest | None:
        """None when the stored manifest still has `etag` (a conditional GET)."""
        found = self._manifests.read_if_changed(tenant, name, etag)
        return None if found is None else live(found, name)

    def changes(self, since_us: int, *, position: str = "") -> ChangePage:
        """One listing of the change feed (adapter_store.changes): manifests written since
        `since_us` (µs since the epoch, the writers' clocks), after `position`."""
        return self._manifests.feed.read(since_us, position=position)

    def expire_changes(self, before_us: int) -> int:
        """Delete change-feed events stamped before `before_us` (at most one page)."""
        return self._manifests.feed.expire(before_us)

    def adapter_page(self, tenant: str, *, after: str = "", limit: int = 100) -> Page[Manifest]:
        """Live adapters of `tenant` after the position `after`, at most `limit` examined.

        From the listing index (adapter_store.index) when it is ready: one listing of the index
        and one read per shard visited (a page of 50 of 10,000 adapters: 3 store calls).
        Otherwise from the manifests (`manifest_page`). `next_after` is the position to
        continue from (None at the end); a page may hold fewer than `limit` items (revoked
        adapters are skipped) and still have a next one. A listing begun on one continues on
        it: the index's positions start with `index.INDEXED`, which no name holds.
        """
        if not after or after.startswith(INDEXED):
            page = self._manifests.index.page(tenant, after=after, limit=limit)
            if page is not None:
                return page
        return self.manifest_page(tenant, after=after, limit=limit)

    def manifest_page(self, tenant: str, *, after: str = "", limit: int = 100) -> Page[Manifest]:
        """Like `adapter_page`, from the manifests themselves (the truth), in the store's order.

        One folder-level listing of at most `limit` names, and one manifest read per name: a
        page costs at most 1 + `limit` store calls, however many adapters or versions exist.
        """
        prefix = adapters_prefix(tenant)

        def manifest(key: str) -> Manifest | None:
            name = child_name(key, prefix)
            found = self._manifests.read(tenant, name) if name is not None else None
            return found if is_live(found) else None

        return list_page(self.backend, prefix, manifest, after=after, limit=limit, folders=True)

    def rebuild_index(self, tenant: str | None = None) -> list[IndexReport]:
        """Copy every manifest into the listing index of `tenant` (None: of every tenant) and
        mark it ready (adapter_store.index). Reads every manifest: an operator's task
        (`lora-gateway store rebuild-index`), after an upgrade from a version without the
        index or after an error that withdrew it. Safe while gateways write."""
        tenants = [tenant] if tenant is not None else self.list_tenants()
        return [self._manifests.index.rebuild(name) for name in tenants]

    def tenant_page(self, *, after: str = "", limit: int = 100) -> Page[str]:
        """Tenants with anything stored (adapters or shares), in the store's order: one
        listing."""
        return list_page(
            self.backend,
            TENANTS,
            lambda key: child_name(key, TENANTS),
            after=after,
            limit=limit,
            folders=True,
        )

    def shared_page(self, tenant: str, *, after: str = "", limit: int = 100) -> Page[Manifest]:
        """Other tenants' live adapters shared with `tenant`, from `tenant`'s share index
        (adapter_store.sharing): one listing of the index and one manifest read per marker."""
        return self._shares.page(tenant, after=after, limit=limit)

    def share_hints(self, tenant: str) -> frozenset[tuple[str, str]]:
        """(owner, name) of every marker in `tenant`'s share index: hints, not yet confirmed.
        A name absent here is not shared with `tenant`, whether or not it exists."""
        return self._shares.hints(tenant)

    def list_adapters(self, tenant: str) -> list[Manifest]:
        """Every live adapter of `tenant` (all pages; prefer `adapter_page` where it can grow)."""
        return all_pages(lambda after: self.adapter_page(tenant, after=after, limit=MAX_PAGE))

    def stored_adapters(self, tenant: str) -> list[Manifest]:
        """Every live adapter of `tenant`, from the manifests (the truth, for maintenance)."""
        return all_pages(lambda after: self.manifest_page(tenant, after=after, limit=MAX_PAGE))

    def list_tenants(self) -> list[str]:
        return all_pages(lambda after: self.tenant_page(after=after, limit=MAX_PAGE))

    def list_shared_with(self, tenant: str) -> list[Manifest]:
        """Every adapter shared with `tenant`, from its share index (all pages)."""
        return all_pages(lambda after: self.shared_page(tenant, after=after, limit=MAX_PAGE))

    # --- resolution and aliases ---------------------------------------------------------------

    def resolve(
        self, tenant: str, ref: AdapterRef, *, routing_key: str | None = None
    ) -> AdapterVersion:
        """The live version `ref` names, as seen by `tenant`.

        `ref.owner` defaults to `tenant`. Another owner's adapter is looked for only when
        `tenant`'s share index names it, and then resolves only if the manifest confirms the
        grant (`can_use`); otherwise it is answered exactly like a missing one, without reading
        the owner's manifest. A weighted alias picks by `routing_key` (`Manifest.resolve`).
        """
        check_name(tenant, "tenant")
        owner = ref.owner or tenant
        if owner != tenant and (owner, ref.name) not in self.share_hints(tenant):
            raise not_found(ref)
        manifest = self._manifests.read(owner, ref.name)
        if manifest is None or not manifest.usable_by(tenant):
            raise not_found(ref)
        return manifest.resolve(ref, caller=tenant, routing_key=routing_key)

    def set_alias(
        self,
        tenant: str,
        name: str,
        alias: str,
        target: str,
        expected: str | None = None,
        *,
        require_eval_min_score: float | None = None,
    ) -> Manifest:
        """Point `alias` at `target` (a version sha or another alias); a weighted alias becomes
        plain (its canary ends).

        With `expected` (a version sha), only if the alias currently points there, plainly
        (else Conflict; a weighted alias points at no one version): a compare-and-set for
        rollouts. With `require_eval_min_score`, or when the alias has a policy, only if the
        version has a passing evaluation (`evaluations.gate`; EvaluationRequired otherwise),
        checked inside the same conditional write.
        """
        check_name(alias, "alias")
        if _looks_like_sha(alias):
            raise InvalidAdapter("an alias may not look like a version sha256")
        want = check_sha(expected, "expected version") if expected is not None else None
        required = _required(require_eval_min_score)

        def change(current: Manifest | None) -> Manifest:
            manifest = live(current, name)
            if _looks_like_sha(target):
                sha: str | None = check_sha(target)
            else:
                sha = manifest.aliases.get(check_name(target, "alias"))
            if sha is None or sha not in manifest.versions:
                raise not_found(f"{name}@{target}")
            if want is not None and (
                manifest.aliases.get(alias) != want or alias in manifest.alias_weights
            ):
                raise Conflict(
                    f"alias {alias!r} of {name!r} points at {_describe(manifest, alias)}, "
                    f"not the expected {want}"
                )
            _gate(manifest, alias, [sha], required)
            return _with_alias(manifest, alias, {sha: 1.0})

        return self._manifests.update(tenant, name, change)

    def set_alias_weights(
        self,
        tenant: str,
        name: str,
        alias: str,
        weights: Mapping[str, float],
        expected: Mapping[str, float] | None = None,
        *,
        require_eval_min_score: float | None = None,
    ) -> Manifest:
        """Split `alias` between versions: {version: weight}, a canary (`prod = v7: 0.9,
        v8: 0.1`). Each request then resolves to one of them, sticky per routing key
        (`Manifest.resolve`). All weight on one version (`{v8: 1.0}`) makes the alias plain.

        A version is a sha ("sha256:<hex>") or a plain alias of the adapter, resolved now.
        Refused, with the manifest unchanged: no weights, more versions than
        `limits.max_alias_versions`, a weight that is not a finite number > 0, weights that do
        not sum to 1 (within 1e-6), one version named twice, or a weighted alias as a version
        (InvalidAdapter); a version that is missing or revoked (AdapterNotFound); a version
        that is quarantined (Quarantined). With `expected` ({version sha: weight}; {} = the
        alias does not exist), only if the alias's split is that now (`Manifest.split`; a
        plain alias is {sha: 1.0}), else Conflict: a compare-and-set like `set_alias`'s.
        Gated like `set_alias` for each version not in the alias's split now.
        """
        check_name(alias, "alias")
        if _looks_like_sha(alias):
            raise InvalidAdapter("an alias may not look like a version sha256")
        given = _check_weights(weights, self.limits.max_alias_versions)
        required = _required(require_eval_min_score)
        want = None
        if expected is not None:
            want = {}
            for key, weight in _items(expected, "expected"):
                want[check_sha(key, "expected version")] = _weight(weight, key, allow_zero=True)

        def change(current: Manifest | None) -> Manifest:
            manifest = live(current, name)
            split: dict[str, float] = {}
            for key, weight in given:
                sha = _weighted_target(manifest, name, key)
                if sha in split:
                    raise InvalidAdapter(f"weights name version sha256:{sha} twice")
                split[sha] = weight
            if want is not None and not _same_split(manifest.split(alias), want):
                raise Conflict(
                    f"alias {alias!r} of {name!r} points at {_describe(manifest, alias)}, "
                    f"not the expected {_describe_split(want)}"
                )
            _gate(manifest, alias, split, required)
            return _with_alias(manifest, alias, split)

        return self._manifests.update(tenant, name, change)

    def remove_alias(self, tenant: str, name: str, alias: str) -> Manifest:
        check_name(alias, "alias")

        def change(current: Manifest | None) -> Manifest:
            manifest = live(current, name)
            if alias not in manifest.aliases:
                return manifest
            aliases = {a: s for a, s in manifest.aliases.items() if a != alias}
            weights = {a: w for a, w in manifest.alias_weights.items() if a != alias}
            return replace(
                manifest,
                aliases=aliases,
                alias_weights=weights,
                alias_stable=_without_aliases(manifest, [alias]),
            )

        return self._manifests.update(tenant, name, change)

    # --- evaluations (adapter_store.evaluations) ---------------------------------------------

    def put_evaluation_set(
        self, tenant: str, name: str, data: bytes, *, cases: int, uploaded_by: str
    ) -> Manifest:
        """Store an evaluation set (bytes the gateway validated: `lora_gateway.evaluation`)
        under its sha256 next to the manifest, then make it the adapter's current set. The
        same bytes again are the same set (nothing changes)."""
        sha = hashlib.sha256(data).hexdigest()
        key = evaluation_set_key(tenant, name, sha)
        live(self._manifests.read(tenant, name), name)  # refused before anything is stored
        self.backend.put(key, data)
        ref = EvaluationSetRef(sha=sha, cases=cases, uploaded_at=utc_now(), uploaded_by=uploaded_by)

        def change(current: Manifest | None) -> Manifest:
            manifest = live(current, name)
            if manifest.evaluation_set is not None and manifest.evaluation_set.sha == sha:
                return manifest
            return replace(manifest, evaluation_set=ref)

        return self._manifests.update(tenant, name, change)

    def evaluation_set(self, tenant: str, name: str, sha: str) -> bytes:
        """The bytes of a stored evaluation set, checked against their sha256."""
        try:
            data, _ = self.backend.get(evaluation_set_key(tenant, name, sha))
        except BlobNotFound:
            raise IntegrityError(f"evaluation set sha256:{sha} is no longer stored") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise IntegrityError(f"evaluation set sha256:{sha} does not match its sha256")
        return data

    def add_evaluation(self, tenant: str, name: str, result: EvaluationResult) -> Manifest:
        """Append `result` to its version's evaluations (a conditional write; never rewrites
        one). Refused: the version is gone (AdapterNotFound), or it has
        `MAX_RESULTS_PER_VERSION` results already (CapacityExceeded)."""
        sha = check_sha(result.version)

        def change(current: Manifest | None) -> Manifest:
            manifest = live(current, name)
            if sha not in manifest.versions:
                raise not_found(f"{name}@sha256:{sha}")
            runs = manifest.evaluations.get(sha, ())
            if len(runs) >= MAX_RESULTS_PER_VERSION:
                raise CapacityExceeded(
                    f"version sha256:{sha} has {len(runs)} evaluations already, the most kept "
                    "(results are never rewritten)"
                )
            return replace(manifest, evaluations={**manifest.evaluations, sha: (*runs, result)})

        return self._manifests.update(tenant, name, change)

    def set_alias_policy(
        self, tenant: str, name: str, alias: str, min_score: float | None
    ) -> Manifest:
        """Require a minimum evaluation score of every version `alias` is moved to (None:
        remove the policy). The alias need not exist yet."""
        check_name(alias, "alias")
        if _looks_like_sha(alias):
            raise InvalidAdapter("an alias may not look like a version sha256")
        score = _required(min_score)

        def change(current: Manifest | None) -> Manifest:
            manifest = live(current, name)
            policies = {a: p for a, p in manifest.alias_policies.items() if a != alias}
            if score is not None:
                policies[alias] = AliasPolicy(score)
            if policies == manifest.alias_policies:
                return manifest
            return replace(manifest, alias_policies=policies)

        return self._manifests.update(tenant, name, change)

    # --- automatic rollback (adapter_store.rollback) ------------------------------------------

    def set_rollback_policy(
        self, tenant: str, name: str, alias: str, policy: RollbackPolicy | None
    ) -> Manifest:
        """Store when `alias`'s canaries are rolled back (None: remove its policy). The alias
        need not exist, or be split, yet: the policy applies whenever it is a canary."""
        check_name(alias, "alias")
        if _looks_like_sha(alias):
            raise InvalidAdapter("an alias may not look like a version sha256")
        if policy is not None and not isinstance(policy, RollbackPolicy):
            raise InvalidAdapter("rollback policy: expected a RollbackPolicy")

        def change(current: Manifest | None) -> Manifest:
            manifest = live(current, name)
            policies = {a: p for a, p in manifest.rollback_policies.items() if a != alias}
            if policy is not None:
                policies[alias] = policy
            if policies == manifest.rollback_policies:
                return manifest
            return replace(manifest, rollback_policies=policies)

        return self._manifests.update(tenant, name, change)

    def rollback(
        self,
        tenant: str,
        name: str,
        alias: str,
        expected: Mapping[str, float],
        record: RollbackRecord,
    ) -> tuple[Manifest, bool]:
        """Move all of `alias`'s weight back to its stable version (`record.stable`) and keep
        `record` as its last rollback, in one conditional write, only if the alias is still
        split exactly as `expected` ({sha: weight}, what the caller decided on), with that
        stable version and a rollback policy. Otherwise nothing is written and the second
        value is False: another replica moved it first, or the tenant changed it meanwhile (a
        newer change is never overridden). The stable version must be active."""
        check_name(alias, "alias")
        want = {check_sha(sha): float(weight) for sha, weight in expected.items()}
        done = [False]

        def change(current: Manifest | None) -> Manifest:
            manifest = live(current, name)
            done[0] = False
            stable = manifest.versions.get(record.stable)
            if (
                alias not in manifest.alias_weights
                or alias not in manifest.rollback_policies
                or manifest.alias_stable.get(alias) != record.stable
                or not _same_split(manifest.split(alias), want)
                or stable is None
                or stable.status != "active"
            ):
                return manifest
            moved = _with_alias(manifest, alias, {record.stable: 1.0})
            watched = _canaries_of(moved)
            done[0] = True
            return replace(
                moved,
                rollbacks={**manifest.rollbacks, alias: record},
                evaluation_claims={
                    s: c for s, c in moved.evaluation_claims.items() if s in watched
                },
            )

        manifest = self._manifests.update(tenant, name, change)
        return manifest, done[0]

    def claim_evaluation(
        self, tenant: str, name: str, sha: str, *, interval_s: float, by: str
    ) -> tuple[Manifest, bool]:
        """Take the scheduled evaluation of canary `sha` (one conditional write) for the
        replica `by`; returns the manifest and whether it was taken. Not taken (False, nothing
        written) when the adapter has no evaluation
        set, `sha` is no canary of a split with a stable version, or within `interval_s`
        another claim was taken or its latest result on the current set finished: so
        replicas that all see the result grow old run one evaluation per interval between
        them, not one each."""
        target = check_sha(sha)
        taken = [False]
        window_us = interval_s * 1_000_000

        def change(current: Manifest | None) -> Manifest:
            manifest = live(current, name)
            taken[0] = False
            now_us = time.time_ns() // 1000
            watched = _canaries_of(manifest)
            current_set = manifest.evaluation_set
            if current_set is None or target not in watched:
                return manifest
            claim = manifest.evaluation_claims.get(target)
            if claim is not None and now_us - claim.at_us < window_us:
                return manifest
            runs = [r for r in manifest.evaluations.get(target, ()) if r.set_sha == current_set.sha]
            if runs and now_us - timestamp_us(runs[-1].finished_at) < window_us:
                return manifest
            claims = {s: c for s, c in manifest.evaluation_claims.items() if s in watched}
            claims[target] = EvaluationClaim(at_us=now_us, by=by)
            taken[0] = True
            return replace(manifest, evaluation_claims=claims)

        manifest = self._manifests.update(tenant, name, change)
        return manifest, taken[0]

    # --- sharing (adapter_store.sharing) -------------------------------------------------------

    def share(self, tenant: str, name: str, grantee: str) -> Manifest:
        """Let `grantee` use `name` (the marker in its share index, then the manifest)."""
        return self._shares.share(tenant, name, grantee)

    def unshare(self, tenant: str, name: str, grantee: str) -> Manifest:
        """Stop sharing (the manifest, then the marker)."""
        return self._shares.unshare(tenant, name, grantee)

    def repair_share_index(self) -> ShareRepair:
        """Make every tenant's share index agree with the manifests (the truth).

        Writes the marker of every grant that has none (shares made before the index existed,
        or an interrupted write) and removes markers no manifest confirms (a crash between the
        two writes of a share, an unshare or a whole revoke). Reads every manifest and every
        index: an operator's maintenance task (`lora-gateway store repair-shares`), never on a
        request path. Safe to run while the gateways serve, and more than once.
        """
        return self._shares.repair(self.list_tenants(), self.stored_adapters)

    # --- revocation and quarantine ------------------------------------------------------------

    def revoke(
        self, tenant: str, name: str, version: str | None = None, *, delete_objects: bool = True
    ) -> list[str]:
        """Revoke one version (or, with None, the whole adapter); return the revoked shas.

        The manifest is marked first (so no read path returns the version any more), then the
        objects are deleted. Idempotent: revoking again finishes any interrupted deletion. With
        `delete_objects=False` only the manifest is marked: the gateway unloads the versions
        from the engine and its disk cache first and then calls `purge` (DESIGN invariant 7).
        """
        target = check_sha(version) if version is not None else None
        revoked: list[str] = []
        grantees: list[str] = []
        freed = [0, 0]  # bytes and names no longer live: refunded from the tenant's usage

        def change(current: Manifest | None) -> Manifest:
            if current is None:
                raise not_found(name)
            if target is None:
                shas = sorted({*current.versions, *current.revoked})
                new = replace(
                    current,
                    status="revoked",
                    versions={},
                    aliases={},
                    alias_weights={},
                    shared_with=(),
                    revoked=tuple(shas),
                    # The evaluation set's objects are deleted below; results stay as history.
                    evaluation_set=None,
                    alias_policies={},
                    # A name made again starts without rollback policies or their state.
                    alias_stable={},
                    rollback_policies={},
                    rollbacks={},
                    evaluation_claims={},
                )
                revoked[:] = shas
                grantees[:] = current.shared_with
                freed[:] = [
                    sum(v.total_bytes for v in current.versions.values()),
                    1 if is_live(current) else 0,
                ]
                return current if new == current else new
            if target not in current.versions and target not in current.revoked:
                raise not_found(f"{name}@sha256:{target}")
            revoked[:] = [target]
            freed[:] = [0, 0]
            if target in current.revoked:
                return current
            freed[0] = current.versions[target].total_bytes
            return replace(
                _without_version(current, target),
                versions={s: v for s, v in current.versions.items() if s != target},
                revoked=tuple(sorted({*current.revoked, target})),
            )

        self._manifests.update(tenant, name, change)
        if target is None:
            # Evaluation sets are in no engine or cache: deleted with the whole adapter, in
            # any mode (`delete_objects` orders the version files after the unload only).
            for key in self.backend.list(evaluation_sets_prefix(tenant, name)):
                self.backend.delete(key)
        self._shares.forget(tenant, name, grantees)
        if any(freed):
            self._usage.refund(tenant, freed[0], freed[1])
        if delete_objects:
            self.purge(tenant, name, revoked)
        return revoked

    def quarantine(self, tenant: str, name: str, sha: str, reason: str) -> Manifest:
        """Mark a version quarantined (idempotent): it stays in the manifest, aliases included,
        so that every read of it, on any replica and after a restart, is refused with
        `Quarantined` and `reason`; re-uploading the same bytes keeps it quarantined. Its
        objects are kept (for the operator's inspection); revoking it works as usual."""
        target = check_sha(sha)
        note = reason[:200]

        def change(current: Manifest | None) -> Manifest:
            if current is None or target not in current.versions:
                raise not_found(f"{name}@sha256:{target}")
            version = current.versions[target]
            if version.status == "quarantined":
                return current
            versions = dict(current.versions)
            versions[target] = replace(version, status="quarantined", quarantine_reason=note)
            return replace(current, versions=versions)

        return self._manifests.update(tenant, name, change)

    # --- retention and garbage collection ----------------------------------------------------

    def set_retention(
        self, tenant: str, name: str, keep_last: int | None, *, delete_objects: bool = True
    ) -> tuple[Manifest, list[str]]:
        """Set the adapter's retention policy (keep the newest `keep_last` versions and every
        aliased one; None: keep every version) and apply it in the same manifest write;
        return the manifest and the shas it retired. `keep_last` < 1 is refused
        (InvalidAdapter), the manifest unchanged. `delete_objects` as for `revoke`."""
        if keep_last is not None and (
            isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
        ):
            raise InvalidAdapter(
                "retention: keep_last must be an integer >= 1 (or no policy: keep every version)"
            )
        return self._retire(tenant, name, keep_last, delete_objects)

    def retire_expired(
        self, tenant: str, name: str, *, delete_objects: bool = True
    ) -> tuple[Manifest, list[str]]:
        """Apply the adapter's retention policy now (after an upload): the versions
        `Manifest.expired` names are revoked in one manifest write, exactly as `revoke` does
        one (tombstoned in `revoked`, usage refunded, objects purged unless `delete_objects`
        is False). Returns the manifest and the shas retired ([] without a policy)."""
        return self._retire(tenant, name, ..., delete_objects)

    def _retire(
        self,
        tenant: str,
        name: str,
        keep_last: int | EllipsisType | None,
        delete_objects: bool,
    ) -> tuple[Manifest, list[str]]:
        retired: list[str] = []
        freed = [0]

        def change(current: Manifest | None) -> Manifest:
            manifest = live(current, name)
            if not isinstance(keep_last, EllipsisType):
                manifest = replace(manifest, keep_last=keep_last)
            shas = manifest.expired()
            retired[:] = shas
            freed[0] = sum(manifest.versions[sha].total_bytes for sha in shas)
            if shas:
                # Expired versions have no alias (`expired` keeps every aliased one).
                manifest = replace(
                    manifest,
                    versions={s: v for s, v in manifest.versions.items() if s not in shas},
                    revoked=tuple(sorted({*manifest.revoked, *shas})),
                )
            return current if manifest == current else manifest

        manifest = self._manifests.update(tenant, name, change)
        if freed[0]:
            self._usage.refund(tenant, freed[0], 0)
        if delete_objects:
            self.purge(tenant, name, retired)
        return manifest, list(retired)

    def sweep_orphans(
        self, tenant: str | None = None, *, min_age_s: float, dry_run: bool = False
    ) -> SweepReport:
        """Delete version objects that no manifest names (a crash between a publish's objects
        and its manifest, an interrupted purge) and that are older than `min_age_s`, which must
        exceed the longest an upload can take (the gateway's `upload_timeout_s`) plus any clock
        skew between this host and the store. Never deletes what a concurrent upload is about
        to publish: adapter_store.sweep says why. Paged listings, one adapter at a time."""
        if tenant is not None:
            check_name(tenant, "tenant")
        return sweep_orphans(
            self.backend, self._manifests.read, tenant=tenant, min_age_s=min_age_s, dry_run=dry_run
        )

    def purge(self, tenant: str, name: str, shas: Iterable[str]) -> None:
        """Delete the objects of revoked versions (idempotent)."""
        for sha in shas:
            for filename in VERSION_FILES:  # an optional file it lacks: a no-op delete
                self.backend.delete(object_key(tenant, name, check_sha(sha), filename))

    # --- reads of objects ---------------------------------------------------------------------

    def fetch_file(self, version: AdapterVersion, filename: str, dest: Path) -> None:
        """Download one file of a version to `dest`, unverified (the caller checks sha256)."""
        try:
            self.backend.download_file(
                object_key(version.tenant, version.name, version.sha, filename), dest
            )
        except BlobNotFound:
            raise AdapterNotFound(f"version {version.version_id} is no longer stored") from None


# --- gated promotion ---------------------------------------------------------------------------


def _required(value: float | None) -> float | None:
    if value is None:
        return None
    try:
        return check_min_score(value)
    except ValueError as exc:
        raise InvalidAdapter(f"require_eval_min_score: {exc}") from None


def _gate(manifest: Manifest, alias: str, shas: Iterable[str], required: float | None) -> None:
    """The evaluation gate (`evaluations.gate`) for the versions a move adds to `alias`:
    those not in its split now (a canary's weights may shift between versions it holds)."""
    current = manifest.split(alias)
    gate(
        name=manifest.name,
        alias=alias,
        shas=[sha for sha in shas if sha not in current],
        current_set=manifest.evaluation_set,
        evaluations=manifest.evaluations,
        required=required,
        policy=manifest.alias_policies.get(alias),
    )


# --- weighted aliases ---------------------------------------------------------------------------


def _items(weights: Mapping[str, float], what: str) -> list[tuple[str, float]]:
    if not isinstance(weights, Mapping):
        raise InvalidAdapter(f"{what}: expected a map of version -> weight")
    return list(weights.items())


def _weight(value: object, key: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidAdapter(f"weight of {str(key)[:80]!r} must be a number")
    weight = float(value)
    if not math.isfinite(weight) or weight < 0 or (weight == 0 and not allow_zero):
        raise InvalidAdapter(
            f"weight of {str(key)[:80]!r} must be a finite number > 0, got {weight!r} "
            "(leave a version out to give it no traffic)"
        )
    return weight


def _check_weights(weights: Mapping[str, float], most: int) -> list[tuple[str, float]]:
    """The weights' shape, before the manifest is read: 1..`most` versions, each weight finite
    and > 0, summing to 1 within WEIGHT_SUM_TOLERANCE."""
    items = _items(weights, "weights")
    if not items:
        raise InvalidAdapter("weights: name at least one version")
    if len(items) > most:
        raise InvalidAdapter(
            f"weights: at most {most} versions per alias (max_alias_versions), got {len(items)}"
        )
    checked = []
    for key, value in items:
        if not isinstance(key, str):
            raise InvalidAdapter("weights: a version is a sha256 or an alias")
        checked.append((key, _weight(value, key)))
    total = math.fsum(w for _, w in checked)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise InvalidAdapter(
            f"weights must sum to 1 (within {WEIGHT_SUM_TOLERANCE:g}), got {total!r}"
        )
    return checked


def _weighted_target(manifest: Manifest, name: str, key: str) -> str:
    """The live, servable version `key` (a sha or a plain alias) names in `manifest`."""
    if _looks_like_sha(key):
        sha: str | None = check_sha(key)
    else:
        alias = check_name(key, "alias")
        if alias in manifest.alias_weights:
            raise InvalidAdapter(
                f"{alias!r} is a weighted alias: name a version (sha256:<hex>) or a plain alias"
            )
        sha = manifest.aliases.get(alias)
    version = manifest.versions.get(sha) if sha is not None else None
    if version is None:
        raise not_found(f"{name}@{key}")
    if version.status == "quarantined":
        raise Quarantined(
            f"adapter version {version.version_id} of {name!r} is quarantined "
            f"({version.quarantine_reason or 'it corrupted the engine'}) and cannot take traffic"
        )
    return version.sha


def _with_alias(manifest: Manifest, alias: str, split: Mapping[str, float]) -> Manifest:
    """`manifest` with `alias` set to `split`: plain for one version, weighted for more. A
    weighted alias keeps (or gets) its stable version: `_stable_of`."""
    weights = {a: w for a, w in manifest.alias_weights.items() if a != alias}
    stable = {a: s for a, s in manifest.alias_stable.items() if a != alias}
    if len(split) > 1:
        weights[alias] = dict(split)
        kept = _stable_of(manifest, alias, split)
        if kept is not None:
            stable[alias] = kept
    aliases = {**manifest.aliases, alias: primary_of(split)}
    return replace(manifest, aliases=aliases, alias_weights=weights, alias_stable=stable)


def _stable_of(manifest: Manifest, alias: str, split: Mapping[str, float]) -> str | None:
    """The stable version of `alias` once it is split as `split` (adapter_store.rollback): its
    stable version now if the split keeps it; else, when the alias is plain now, the version
    it points at if the split holds it; else none."""
    before = manifest.alias_stable.get(alias)
    if before is None and alias not in manifest.alias_weights:
        before = manifest.aliases.get(alias)
    return before if before is not None and before in split else None


def _canaries_of(manifest: Manifest) -> set[str]:
    """Every canary of the manifest's weighted aliases that have a stable version."""
    return {
        sha
        for alias, stable in manifest.alias_stable.items()
        for sha in canaries(manifest.alias_weights.get(alias, {}), stable)
    }


def _without_aliases(manifest: Manifest, gone: Iterable[str]) -> dict[str, str]:
    """`manifest.alias_stable` without the aliases `gone` (made plain or removed)."""
    drop = set(gone)
    return {a: s for a, s in manifest.alias_stable.items() if a not in drop}


def _without_version(manifest: Manifest, sha: str) -> Manifest:
    """`manifest`'s aliases without `sha` (it is being revoked): a plain alias on it goes; a
    weighted one keeps its other versions, their weights scaled back to a sum of 1 (plain when
    one is left)."""
    aliases = {a: s for a, s in manifest.aliases.items() if a not in manifest.alias_weights}
    aliases = {a: s for a, s in aliases.items() if s != sha}
    weights: dict[str, dict[str, float]] = {}
    for alias, split in manifest.alias_weights.items():
        rest = {s: w for s, w in split.items() if s != sha}
        total = math.fsum(rest.values())
        if len(rest) > 1:
            weights[alias] = {s: w / total for s, w in rest.items()}
        aliases[alias] = primary_of(rest)
    stable = {a: s for a, s in manifest.alias_stable.items() if a in weights and s != sha}
    claims = {s: c for s, c in manifest.evaluation_claims.items() if s != sha}
    return replace(
        manifest,
        aliases=aliases,
        alias_weights=weights,
        alias_stable=stable,
        evaluation_claims=claims,
    )


def _same_split(current: Mapping[str, float], want: Mapping[str, float]) -> bool:
    want = {s: w for s, w in want.items() if w > 0}
    return current.keys() == want.keys() and all(
        abs(current[s] - w) <= 1e-9 for s, w in want.items()
    )


def _describe_split(split: Mapping[str, float]) -> str:
    if not split:
        return "nothing"
    if len(split) == 1:
        return f"sha256:{next(iter(split))}"
    return ", ".join(f"sha256:{s[:12]}…={w:g}" for s, w in sorted(split.items()))


def _describe(manifest: Manifest, alias: str) -> str:
    return _describe_split(manifest.split(alias))


def _looks_like_sha(text: str) -> bool:
    try:
        check_sha(text)
    except InvalidAdapter:
        return False
    return True
