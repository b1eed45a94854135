"""ComposeAdapter: a weighted sum of stored versions, bounded, computed in the spool, published.

The arithmetic is `adapter_store.rewrite`'s; this module is the store's workflow around it,
over the registry's public methods only (`resolve`, `fetch_file`, `check_quota`, `publish`):

1. bounded before anything is fetched, from the manifests: at most `limits.max_compose_parts`
   parts, their ranks summing to at most the model's max rank, their stored bytes to at most
   `limits.max_compose_bytes`;
2. the parts fetched into a spool folder (their bytes reserved first) and verified against
   their sha256;
3. the result's size computed from the parts' headers (at most `limits.max_file_bytes`,
   reserved, and checked against the tenant's quota) before it is written, one module at a
   time, so memory holds one module's tensors plus the validation of the result;
4. published like an upload (`Registry.publish`, with `composed_from`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adapter_store.errors import CapacityExceeded, IntegrityError, InvalidAdapter
from adapter_store.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterRef,
    AdapterVersion,
    FileEntry,
    check_name,
    sha256_file,
)
from adapter_store.quota import Quota
from adapter_store.rewrite import Array, ModuleKey, plan_composition, tensor_name, write_composition
from adapter_store.spool import SpoolSpace, format_bytes
from adapter_store.upload import SpooledAdapter, check_metadata
from adapter_store.validate import load_tensors, parse_config, read_safetensors_header

if TYPE_CHECKING:
    from adapter_store.registry import Registry

__all__ = ["compose_adapter"]


def compose_adapter(
    registry: Registry,
    tenant: str,
    name: str,
    parts: Sequence[tuple[AdapterRef, float]],
    *,
    created_by: str,
    aliases: Sequence[str] = (),
    description: str = "",
    quota: Quota | None = None,
) -> AdapterVersion:
    """Publish the weighted sum of `tenant`'s own adapter versions `parts` as a new version of
    `name` (see the module's docstring for the bounds and their order)."""
    limits = registry.limits
    check_name(name, "adapter name")
    aliases = tuple(check_name(alias, "alias") for alias in aliases)
    check_metadata(created_by, description, limits)
    if not parts:
        raise InvalidAdapter("composition needs at least one part")
    if len(parts) > limits.max_compose_parts:
        raise CapacityExceeded(
            f"composition of {len(parts)} parts exceeds the cap of {limits.max_compose_parts} parts"
        )
    versions: list[AdapterVersion] = []
    weights: list[float] = []
    for ref, weight in parts:
        if ref.owner not in (None, tenant):
            raise InvalidAdapter("composition parts must be the tenant's own adapters")
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise InvalidAdapter("composition weights must be numbers")
        versions.append(registry.resolve(tenant, ref))
        weights.append(float(weight))
    ranks = [version.rank for version in versions]
    if sum(ranks) > registry.spec.max_rank:
        raise InvalidAdapter(
            f"composed rank {sum(ranks)} (sum of the parts' ranks {ranks}) exceeds the "
            f"maximum rank {registry.spec.max_rank}"
        )
    part_bytes = sum(version.total_bytes for version in versions)
    if part_bytes > limits.max_compose_bytes:
        raise CapacityExceeded(
            f"the parts of this composition store {format_bytes(part_bytes)}, above the cap "
            f"of {format_bytes(limits.max_compose_bytes)}"
        )
    with registry.spool.reserve(part_bytes, "this composition") as space:
        folder = registry.spool.folder("compose-")
        try:
            composed = _compose_in(registry, folder, space, tenant, name, versions, weights, quota)
            return registry.publish(
                tenant,
                name,
                composed,
                created_by=created_by,
                aliases=aliases,
                description=description,
                composed_from=tuple(
                    (str(AdapterRef(owner=tenant, name=v.name, version=v.sha)), w)
                    for v, w in zip(versions, weights, strict=True)
                ),
                quota=quota,
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _compose_in(
    registry: Registry,
    folder: Path,
    space: SpoolSpace,
    tenant: str,
    name: str,
    versions: Sequence[AdapterVersion],
    weights: Sequence[float],
    quota: Quota | None,
) -> SpooledAdapter:
    """Fetch the parts into `folder`, then write the composition to `folder/composed`."""
    limits = registry.limits
    configs: list[dict[str, object]] = []
    headers = []
    for index, version in enumerate(versions):
        part = folder / f"part-{index}"
        part.mkdir()
        for entry in version.files:
            _fetch_verified(registry, version, entry, part / entry.filename)
        configs.append(parse_config((part / CONFIG_FILE).read_bytes(), limits))
        headers.append(read_safetensors_header(part / WEIGHTS_FILE, limits))
    plan = plan_composition(
        [{n: t.shape for n, t in header.items()} for header, _ in headers],
        configs,
        weights,
        max_rank=registry.spec.max_rank,
    )
    if plan.size > limits.max_file_bytes:
        raise CapacityExceeded(
            f"the composed {WEIGHTS_FILE} would be {format_bytes(plan.size)}, above the cap "
            f"of {format_bytes(limits.max_file_bytes)}"
        )
    config_bytes = json.dumps(plan.config, indent=2, sort_keys=True).encode()
    if quota is not None:
        registry.check_quota(tenant, name, plan.size + len(config_bytes), quota, "this composition")
    space.grow(plan.size + len(config_bytes), "the composed adapter")

    def load(index: int, key: ModuleKey) -> dict[str, Array] | None:
        header, data_start = headers[index]
        names = {part: tensor_name(key, part) for part in ("A", "B")}
        if names["A"] not in header:
            return None
        subset = {n: header[n] for n in names.values()}
        loaded = load_tensors(
            folder / f"part-{index}" / WEIGHTS_FILE, limits, header=(subset, data_start)
        )
        return {part: loaded[n] for part, n in names.items()}

    out = folder / "composed"
    out.mkdir()
    (out / CONFIG_FILE).write_bytes(config_bytes)
    with (out / WEIGHTS_FILE).open("wb") as f:
        write_composition(plan, load, f)
    return SpooledAdapter(out, space)


def _fetch_verified(
    registry: Registry, version: AdapterVersion, entry: FileEntry, dest: Path
) -> None:
    registry.fetch_file(version, entry.filename, dest)
    if dest.stat().st_size != entry.size or sha256_file(dest) != entry.sha256:
        raise IntegrityError(
            f"stored {entry.filename} of {version.version_id} does not match its sha256"
        )
