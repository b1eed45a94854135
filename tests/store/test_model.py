"""Names, references, manifests and the base-model spec."""

from __future__ import annotations

from pathlib import Path

import pytest

import adapter_store
from adapter_store import AdapterRef, BaseModelSpec, InvalidAdapter, check_name
from adapter_store.errors import IntegrityError
from adapter_store.model import Manifest

SHA = "ab" * 32


@pytest.mark.parametrize(
    ("text", "owner", "name", "alias", "version"),
    [
        ("bot", None, "bot", None, None),
        ("bot@prod", None, "bot", "prod", None),
        (f"bot@sha256:{SHA}", None, "bot", None, SHA),
        ("acme/bot", "acme", "bot", None, None),
        ("acme/bot@v1.2", "acme", "bot", "v1.2", None),
        (f"acme/bot@sha256:{SHA}", "acme", "bot", None, SHA),
    ],
)
def test_ref_parse_round_trips(
    text: str, owner: str | None, name: str, alias: str | None, version: str | None
) -> None:
    ref = AdapterRef.parse(text)
    assert (ref.owner, ref.name, ref.alias, ref.version) == (owner, name, alias, version)
    assert str(ref) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "bot@",
        "/bot",
        "a/b/c",
        "bot@sha256:abc",
        f"bot@sha256:{SHA.upper()}",
        "bot@a@b",
        "../bot",
        "bot@..",
        "bot@a/b",
        42,
    ],
)
def test_bad_refs(text: object) -> None:
    with pytest.raises(InvalidAdapter):
        AdapterRef.parse(text)


def test_check_name() -> None:
    assert check_name("a" * 64, "tenant") == "a" * 64
    for bad in ("a" * 65, "a..b", "ä", None, "x/y"):
        with pytest.raises(InvalidAdapter, match="tenant"):
            check_name(bad, "tenant")


def test_spec_from_config(tiny_model: Path, spec: BaseModelSpec) -> None:
    assert spec.num_layers == 2
    assert spec.max_rank == 64
    assert spec.module_shapes == {
        "q_proj": (128, 128),
        "k_proj": (128, 64),
        "v_proj": (128, 64),
        "o_proj": (128, 128),
        "gate_proj": (128, 256),
        "up_proj": (128, 256),
        "down_proj": (256, 128),
    }
    assert spec.accepts("lora-gateway/tiny-llama")
    assert spec.accepts(str(tiny_model))
    assert spec.accepts(spec.name)
    assert not spec.accepts("other")


def test_corrupt_manifest_is_reported() -> None:
    for data in (b"not json", b"[]", b'{"format": 1}', b'{"format": 2}'):
        with pytest.raises(IntegrityError):
            Manifest.from_json(data)


def test_public_surface() -> None:
    assert set(adapter_store.__all__) >= {
        "AdapterRef",
        "AdapterVersion",
        "Manifest",
        "BaseModelSpec",
        "Limits",
        "Registry",
        "LocalBackend",
        "DiskCache",
        "StoreError",
        "InvalidAdapter",
        "AdapterNotFound",
        "Incompatible",
        "Conflict",
        "StoreUnavailable",
        "IntegrityError",
        "CapacityExceeded",
    }
    assert all(hasattr(adapter_store, name) for name in adapter_store.__all__)


def test_import_boundaries() -> None:
    """adapter_store never imports lora_gateway or grpc, and only s3.py imports boto3."""
    import ast

    package = Path(adapter_store.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"lora_gateway", "grpc", "pickle"}, source.name
        if source.name != "s3.py":
            assert not imported & {"boto3", "botocore"}, source.name
