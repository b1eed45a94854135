"""The object layout (adapter_store.keys): keys come from validated names and hex digests only."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import adapter_store
from adapter_store import InvalidAdapter, check_name, keys
from adapter_store.model import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE

SHA = "ab" * 32
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
#: Every key the store writes, as the README's layout section spells it.
LAYOUT = re.compile(
    rf"^tenants/{NAME}/(adapters/{NAME}/(manifest\.json|versions/[0-9a-f]{{64}}/"
    rf"(adapter_config\.json|adapter_model\.safetensors))|usage\.json|shared/{NAME}/{NAME})$"
)

#: Strings that are not names: traversal, separators, empty, too long, not ASCII, odd leads.
NOT_NAMES: list[object] = [
    "",
    ".",
    "..",
    "a..b",
    "../etc",
    "a/b",
    "/abs",
    "a\\b",
    " a",
    "a b",
    "a\n",
    "a\x00",
    "-lead",
    ".hidden",
    "_lead",
    "é",
    "a" * 65,
    "~",
    "a%2Fb",
    None,
    7,
    b"bytes",
]
#: Strings that are not sha256 digests.
NOT_SHAS: list[object] = [
    "",
    "AB" * 32,
    "ab" * 31,
    "ab" * 33,
    "g" * 64,
    SHA + "/",
    "../" + SHA[3:],
    f"sha256:{SHA[:-1]}",
    None,
]

#: Each builder, with the name-like arguments it takes (a value for each, then one replaced).
BUILDERS: dict[str, tuple[Callable[..., str], int]] = {
    "adapters_prefix": (keys.adapters_prefix, 1),
    "adapter_prefix": (keys.adapter_prefix, 2),
    "manifest_key": (keys.manifest_key, 2),
    "usage_key": (keys.usage_key, 1),
    "shared_prefix": (keys.shared_prefix, 1),
    "share_key": (keys.share_key, 3),
}


def test_the_layout() -> None:
    assert keys.manifest_key("acme", "bot") == "tenants/acme/adapters/bot/manifest.json"
    assert keys.object_key("acme", "bot", SHA, WEIGHTS_FILE) == (
        f"tenants/acme/adapters/bot/versions/{SHA}/adapter_model.safetensors"
    )
    assert keys.object_key("acme", "bot", f"sha256:{SHA}", CONFIG_FILE) == (
        f"tenants/acme/adapters/bot/versions/{SHA}/adapter_config.json"
    )
    assert keys.version_prefix("acme", "bot", SHA) == f"tenants/acme/adapters/bot/versions/{SHA}/"
    assert keys.usage_key("acme") == "tenants/acme/usage.json"
    assert keys.share_key("globex", "acme", "bot") == "tenants/globex/shared/acme/bot"
    assert keys.adapters_prefix("acme") == "tenants/acme/adapters/"
    assert keys.shared_prefix("globex") == "tenants/globex/shared/"
    assert keys.TENANTS == "tenants/"


@pytest.mark.parametrize("bad", NOT_NAMES, ids=repr)
def test_every_name_argument_refuses_what_is_not_a_name(bad: object) -> None:
    for build, arity in BUILDERS.values():
        for position in range(arity):
            args: list[object] = ["acme", "bot", "globex"][:arity]
            args[position] = bad
            with pytest.raises(InvalidAdapter, match=r"invalid|must be"):
                build(*args)
    for position in range(2):
        args = ["acme", "bot", SHA, WEIGHTS_FILE]
        args[position] = bad
        with pytest.raises(InvalidAdapter):
            keys.object_key(*args)  # type: ignore[arg-type]
        with pytest.raises(InvalidAdapter):
            keys.version_prefix(*args[:3])  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", NOT_SHAS, ids=repr)
def test_digests_must_be_sha256_hex(bad: object) -> None:
    with pytest.raises(InvalidAdapter):
        keys.version_prefix("acme", "bot", bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidAdapter):
        keys.object_key("acme", "bot", bad, CONFIG_FILE)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "filename",
    [
        "adapter_model.bin",
        "../adapter_config.json",
        "",
        "manifest.json",
        None,
        "tokenizer_config.json",
        "Chat_Template.jinja",
        "../chat_template.jinja",
    ],
)
def test_object_keys_name_only_the_adapter_files(filename: object) -> None:
    with pytest.raises(InvalidAdapter):
        keys.object_key("acme", "bot", SHA, filename)  # type: ignore[arg-type]


def test_the_optional_chat_template_has_its_own_key() -> None:
    assert keys.object_key("acme", "bot", SHA, "chat_template.jinja") == (
        f"tenants/acme/adapters/bot/versions/{SHA}/chat_template.jinja"
    )


@given(st.text(max_size=80), st.text(max_size=80))
def test_any_string_is_a_name_in_the_layout_or_refused(tenant: str, name: str) -> None:
    """For any strings: either both are names and every key holds them as whole segments in
    the layout, or every builder refuses them."""
    try:
        check_name(tenant, "tenant")
        check_name(name, "adapter name")
    except InvalidAdapter:
        for build in (keys.manifest_key, keys.adapter_prefix):
            with pytest.raises(InvalidAdapter):
                build(tenant, name)
        with pytest.raises(InvalidAdapter):
            keys.share_key(tenant, name, name)
        with pytest.raises(InvalidAdapter):
            keys.object_key(tenant, name, SHA, CONFIG_FILE)
        return
    built = [
        keys.manifest_key(tenant, name),
        keys.usage_key(tenant),
        keys.share_key(tenant, name, name),
        *(keys.object_key(tenant, name, SHA, filename) for filename in ADAPTER_FILES),
    ]
    for key in built:
        assert LAYOUT.fullmatch(key), key
        assert ".." not in key.split("/")
    prefix = keys.shared_prefix(tenant)
    assert keys.share_of(keys.share_key(tenant, name, name), prefix) == (name, name)
    assert keys.child_name(keys.adapter_prefix(tenant, name), keys.adapters_prefix(tenant)) == name


def test_listed_keys_outside_the_layout_are_skipped() -> None:
    prefix = keys.shared_prefix("globex")
    assert keys.share_of(prefix + "acme/bot", prefix) == ("acme", "bot")
    for key in (prefix + "acme", prefix + "acme/bot/x", prefix + "../bot", prefix + "a/.."):
        assert keys.share_of(key, prefix) is None
    assert keys.share_of("tenants/other/shared/acme/bot", prefix) is None
    folder = keys.adapters_prefix("acme")
    assert keys.child_name(folder + "bot/", folder) == "bot"
    for key in (folder + "bot", folder + "../", folder + "a b/", "tenants/x/adapters/bot/"):
        assert keys.child_name(key, folder) is None


def test_only_keys_py_spells_the_layout() -> None:
    """No other module of the store builds a key: no string constant (docstrings aside) holds
    a part of the layout."""
    parts = ("tenants/", "adapters/", "versions/", "shared/", "manifest.json", "usage.json")
    package = Path(adapter_store.__file__).parent
    for source in sorted(package.glob("*.py")):
        if source.name == "keys.py":
            continue
        tree = ast.parse(source.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
            ):
                assert not any(part in node.value for part in parts), (source.name, node.value)
