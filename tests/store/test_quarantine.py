"""A version quarantined by the runtime canary stays in the manifest and is refused everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapter_store import AdapterNotFound, AdapterRef, Quarantined, Registry
from adapter_store.model import Manifest


def test_quarantine_is_persisted_refused_and_sticky(registry: Registry, good_adapter: Path) -> None:
    version = registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    manifest = registry.quarantine("acme", "bot", version.sha, "canary mismatch")
    assert manifest.versions[version.sha].status == "quarantined"
    assert registry.quarantine("acme", "bot", version.sha, "again").etag == manifest.etag
    # Read back from the store as another replica or a restarted process would.
    stored = Manifest.from_json(manifest.to_json())
    assert stored.versions[version.sha].quarantine_reason == "canary mismatch"
    for ref in (AdapterRef(None, "bot"), AdapterRef(None, "bot", version=version.sha)):
        with pytest.raises(Quarantined, match="is quarantined: canary mismatch"):
            registry.resolve("acme", ref)
    # Visibility first: another tenant learns nothing about it.
    with pytest.raises(AdapterNotFound):
        registry.resolve("globex", AdapterRef("acme", "bot"))
    # The same bytes cannot come back under a new upload.
    with pytest.raises(Quarantined, match="cannot be published again"):
        registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    # Revocation still works on it.
    assert registry.revoke("acme", "bot", version.sha) == [version.sha]


def test_quarantine_of_an_unknown_version_is_not_found(
    registry: Registry, good_adapter: Path
) -> None:
    registry.upload_dir("acme", "bot", good_adapter, created_by="t")
    with pytest.raises(AdapterNotFound):
        registry.quarantine("acme", "bot", "0" * 64, "x")
