"""Bad adapters, configs and names are refused with a message that says what is wrong, and
nothing is stored. Each case mutates a copy of a good PEFT adapter; the cases are the hostile
corpus of tests/support/hostile.py (the gRPC tests upload the same ones)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from adapter_store import (
    BaseModelSpec,
    CapacityExceeded,
    FileEntry,
    Incompatible,
    InvalidAdapter,
    Limits,
    Registry,
    StoreError,
)
from adapter_store.model import CONFIG_FILE, WEIGHTS_FILE, sha256_file
from adapter_store.validate import validate_adapter
from lora_gateway.devtools import ALL_MODULES as ALL
from lora_gateway.devtools import MLP_MODULES as MLP
from tests.conftest import AdapterFactory
from tests.support.hostile import (
    BAD_ADAPTERS,
    BAD_NAMES,
    CONFIG_KEYS,
    HEADER_FIELDS,
    JSON_VALUES,
    VALID_HEADER_VALUES,
    edit_config,
    edit_tensors,
    header_field,
    raw_weights,
)


def _upload(registry: Registry, folder: Path, tenant: str = "acme", name: str = "bot") -> None:
    registry.upload_dir(tenant, name, folder, created_by="test")


def _assert_nothing_stored(registry: Registry, tmp_path: Path) -> None:
    assert registry.backend.list("") == []
    spool = tmp_path / "spool"
    assert not spool.exists() or list(spool.iterdir()) == []


def test_good_adapter_is_accepted(local_registry: Registry, good_adapter: Path) -> None:
    version = local_registry.upload_dir("acme", "bot", good_adapter, created_by="alice")
    assert (version.rank, version.alpha, version.dtype) == (8, 16.0, "F32")
    assert version.target_modules == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert version.base_model == "lora-gateway/tiny-llama"


@pytest.mark.parametrize(
    ("mutation", "error", "fragment"),
    [pytest.param(m, e, f, id=i) for i, m, e, f in BAD_ADAPTERS],
)
def test_bad_adapter_is_refused(
    local_registry: Registry,
    adapter_copy: Path,
    tmp_path: Path,
    mutation: Callable[[Path], None],
    error: type[StoreError],
    fragment: str,
) -> None:
    mutation(adapter_copy)
    with pytest.raises(error) as caught:
        _upload(local_registry, adapter_copy)
    assert fragment in str(caught.value)
    _assert_nothing_stored(local_registry, tmp_path)


def test_bad_adapter_table_is_large_and_distinct() -> None:
    ids = [case[0] for case in BAD_ADAPTERS]
    assert len(set(ids)) == len(ids) >= 30


@pytest.mark.parametrize("bad", BAD_NAMES)
@pytest.mark.parametrize("field", ["tenant", "name"])
def test_bad_names_are_refused(
    local_registry: Registry, good_adapter: Path, tmp_path: Path, field: str, bad: str
) -> None:
    names = {"tenant": "acme", "name": "bot", field: bad}
    with pytest.raises(
        InvalidAdapter, match=f"invalid {'tenant' if field == 'tenant' else 'adapter name'}"
    ):
        _upload(local_registry, good_adapter, names["tenant"], names["name"])
    _assert_nothing_stored(local_registry, tmp_path)


def test_declared_sha_mismatch(
    local_registry: Registry, good_adapter: Path, tmp_path: Path
) -> None:
    declared = [
        FileEntry(CONFIG_FILE, (good_adapter / CONFIG_FILE).stat().st_size, "0" * 64),
        FileEntry(
            WEIGHTS_FILE,
            (good_adapter / WEIGHTS_FILE).stat().st_size,
            sha256_file(good_adapter / WEIGHTS_FILE),
        ),
    ]
    upload = local_registry.begin_upload("acme", "bot", declared, created_by="t")
    for entry in declared:
        upload.write(entry.filename, (good_adapter / entry.filename).read_bytes())
    with pytest.raises(InvalidAdapter, match=r"sha256 mismatch for adapter_config\.json"):
        upload.commit()
    _assert_nothing_stored(local_registry, tmp_path)


def _declared(folder: Path) -> list[FileEntry]:
    return [
        FileEntry(name, (folder / name).stat().st_size, sha256_file(folder / name))
        for name in (CONFIG_FILE, WEIGHTS_FILE)
    ]


def test_more_bytes_than_declared(
    local_registry: Registry, good_adapter: Path, tmp_path: Path
) -> None:
    upload = local_registry.begin_upload("acme", "bot", _declared(good_adapter), created_by="t")
    data = (good_adapter / CONFIG_FILE).read_bytes()
    with pytest.raises(InvalidAdapter, match="larger than its declared size"):
        upload.write(CONFIG_FILE, data + b" ")
    with pytest.raises(InvalidAdapter, match="already committed or aborted"):
        upload.write(CONFIG_FILE, b"")
    _assert_nothing_stored(local_registry, tmp_path)


def test_chunks_out_of_order(local_registry: Registry, good_adapter: Path, tmp_path: Path) -> None:
    upload = local_registry.begin_upload("acme", "bot", _declared(good_adapter), created_by="t")
    upload.write(CONFIG_FILE, b"{")
    with pytest.raises(InvalidAdapter, match="declared order"):
        upload.write(WEIGHTS_FILE, b"x")
    _assert_nothing_stored(local_registry, tmp_path)


def test_declared_size_over_cap(
    local_registry: Registry, good_adapter: Path, tmp_path: Path
) -> None:
    declared = _declared(good_adapter)
    declared[1] = FileEntry(WEIGHTS_FILE, 10**12, declared[1].sha256)
    with pytest.raises(CapacityExceeded, match="above the cap"):
        local_registry.begin_upload("acme", "bot", declared, created_by="t")
    _assert_nothing_stored(local_registry, tmp_path)


def test_bf16_and_f16_adapters_are_accepted(local_registry: Registry, adapter_copy: Path) -> None:
    tensors = load_file(str(adapter_copy / WEIGHTS_FILE))
    save_file(
        {k: v.astype(np.float16) for k, v in tensors.items()}, str(adapter_copy / WEIGHTS_FILE)
    )
    assert local_registry.upload_dir("acme", "f16", adapter_copy, created_by="t").dtype == "F16"
    # BF16 (numpy has no bfloat16): write the header by hand, keeping the high halves.
    header = {}
    chunks = []
    offset = 0
    for name in sorted(tensors):
        bits = (tensors[name].view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(bits)],
        }
        chunks.append(bits)
        offset += len(bits)
    encoded = json.dumps(header).encode()
    (adapter_copy / WEIGHTS_FILE).write_bytes(
        struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)
    )
    assert local_registry.upload_dir("acme", "bf16", adapter_copy, created_by="t").dtype == "BF16"


# --- effective weights in the serving dtype ----------------------------------------------------


def _validate(folder: Path, spec: BaseModelSpec, dtype: str) -> None:
    files = {CONFIG_FILE: folder / CONFIG_FILE, WEIGHTS_FILE: folder / WEIGHTS_FILE}
    validate_adapter(files, dataclasses.replace(spec, dtype=dtype), Limits())


def _uniform(folder: Path, a: float, b: float, **config: Any) -> None:
    """Every lora_A entry `a`, every lora_B entry `b` (rank 8), config fields changed."""

    def change(tensors: dict[str, np.ndarray]) -> None:
        for name in tensors:
            tensors[name] = np.full(tensors[name].shape, a if ".lora_A." in name else b, np.float32)

    edit_tensors(change)(folder)
    edit_config(**config)(folder)


# The bound on |ΔW| entries, s·max‖B_i,:‖·max‖A_:,j‖, is s·(b·√8)·(a·√8) = 8·s·a·b for these
# uniform rank-8 adapters; s = alpha/8 (alpha/√8 with rsLoRA).
DTYPE_CASES = [
    # (a, b, alpha, float16, bfloat16, float32): the fragment of the refusal, or None (accepted)
    (0.1, 0.1, 16, None, None, None),  # ordinary: bound 0.16
    (1.0, 1.0, 80, "above the weight magnitude limit 63.97 for float16", None, None),  # bound 80
    (0.01, 0.1, 16 * 1000, "above the weight magnitude limit 63.97", "limit 100", "limit 100"),
    (7e4, 1e-9, 8, "|lora_A| reaches 7e+04, which overflows float16", "limit 100", "limit 100"),
    (
        1e-3,
        3e38,
        16,
        "overflows float16",
        "which overflows bfloat16 (largest finite value 3.3895e+38)",
        "which overflows float32 (largest finite value 3.4028e+38)",
    ),
]


@pytest.mark.parametrize(("a", "b", "alpha", "f16", "bf16", "f32"), DTYPE_CASES)
def test_effective_weights_are_checked_in_the_serving_dtype(
    adapter_copy: Path,
    spec: BaseModelSpec,
    a: float,
    b: float,
    alpha: float,
    f16: str | None,
    bf16: str | None,
    f32: str | None,
) -> None:
    _uniform(adapter_copy, a, b, lora_alpha=alpha)
    for dtype, fragment in (("float16", f16), ("bfloat16", bf16), ("float32", f32)):
        if fragment is None:
            _validate(adapter_copy, spec, dtype)
        else:
            with pytest.raises(InvalidAdapter) as caught:
                _validate(adapter_copy, spec, dtype)
            assert fragment in str(caught.value), (dtype, str(caught.value))


def test_rslora_scaling_is_alpha_over_sqrt_r(adapter_copy: Path, spec: BaseModelSpec) -> None:
    # a = 0.1, b = 0.05, alpha 8000: plain s = 1000 → s·b = 50, bound 8·1000·0.005 = 40: fine;
    # rsLoRA s = 8000/√8 = 2828 → s·b = 141 > 100.
    _uniform(adapter_copy, 0.1, 0.05, lora_alpha=8000)
    _validate(adapter_copy, spec, "float32")
    edit_config(use_rslora=True)(adapter_copy)
    with pytest.raises(InvalidAdapter, match=r"scaling·lora_B\| reaches 141.*scaling 2.83e\+03"):
        _validate(adapter_copy, spec, "float32")


def test_adalora_effective_weights_include_e_and_alpha(
    make_test_adapter: AdapterFactory, spec: BaseModelSpec, tmp_path: Path
) -> None:
    folder = tmp_path / "ada"
    shutil.copytree(make_test_adapter(seed=3, adalora=True), folder)
    _validate(folder, spec, "float32")
    # E (the singular values) multiplies A: a large E is a large delta, though A and B are small.
    edit_tensors(
        lambda t: t.update(
            {k: np.full(v.shape, 1e4, np.float32) for k, v in t.items() if ".lora_E" in k}
        )
    )(folder)
    with pytest.raises(InvalidAdapter, match="above the weight magnitude limit"):
        _validate(folder, spec, "float32")


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("target_r", 0, "target_r=0 is out of range"),
        ("target_r", "8", "target_r must be an integer"),
        ("beta1", 2.0, "beta1=2.0 is out of range"),
        ("beta2", -0.1, "beta2=-0.1 is out of range"),
        ("deltaT", 0, "deltaT=0 is out of range"),
        ("tinit", -1, "tinit=-1 is out of range"),
        ("tfinal", 10**12, "tfinal=1000000000000 is out of range"),
        ("total_step", 0, "total_step=0 is out of range"),
        ("orth_reg_weight", 1e300, "orth_reg_weight=1e+300 is out of range"),
        ("r", 10**9, "r=1000000000 is out of range"),
        ("lora_alpha", 1e300, "lora_alpha=1e+300 is out of range"),
        ("rank_pattern", {"q_proj": [True]}, "per-module ranks"),
        ("whatever", 1, "unknown adapter_config.json key(s) 'whatever'"),
    ],
)
def test_adalora_numeric_fields_are_bounded(
    make_test_adapter: AdapterFactory,
    local_registry: Registry,
    tmp_path: Path,
    key: str,
    value: object,
    fragment: str,
) -> None:
    folder = tmp_path / "ada"
    shutil.copytree(make_test_adapter(seed=3, adalora=True), folder)
    edit_config(**{key: value})(folder)
    with pytest.raises(InvalidAdapter) as caught:
        _upload(local_registry, folder)
    assert fragment in str(caught.value)
    _assert_nothing_stored(local_registry, tmp_path)


def test_peft_adapters_of_every_kind_are_accepted(
    make_test_adapter: AdapterFactory, local_registry: Registry
) -> None:
    """The allowlist keeps what PEFT writes: LoRA, rsLoRA, every module, AdaLoRA."""
    kinds: dict[str, dict[str, Any]] = {
        "lora": {"seed": 21},
        "rslora-all": {"seed": 22, "rank": 16, "use_rslora": True, "target_modules": ALL},
        "mlp-alpha-32": {"seed": 23, "rank": 4, "alpha": 32, "target_modules": MLP},
        "adalora": {"seed": 24, "adalora": True, "target_modules": ALL},
    }
    for name, fields in kinds.items():
        version = local_registry.upload_dir(
            "acme", name, make_test_adapter(**fields), created_by="t"
        )
        assert version.rank == fields.get("rank", 8)


INITS = [
    True,
    False,
    "gaussian",
    "Gaussian",
    "eva",
    "orthogonal",
    "mica",
    "lora_ga",
    "pissa",
    "PiSSA",
    "pissa_niter_4",
    "olora",
    "corda",
    "loftq",
    "true",
    "",
    "random",
]


@pytest.mark.parametrize("init", INITS)
def test_init_lora_weights_accepted_exactly_when_vllm_loads_it(
    local_registry: Registry, adapter_copy: Path, init: object
) -> None:
    """The oracle is vLLM's own check (vllm/lora/peft_helper.py), which refuses at load time."""
    from vllm.lora.peft_helper import PEFTHelper

    config = json.loads((adapter_copy / CONFIG_FILE).read_text())
    helper = PEFTHelper.from_dict({**config, "init_lora_weights": init})
    vllm_loads = not helper._validate_features()
    edit_config(init_lora_weights=init)(adapter_copy)
    if vllm_loads:
        _upload(local_registry, adapter_copy)
    else:
        with pytest.raises(InvalidAdapter, match="init_lora_weights"):
            _upload(local_registry, adapter_copy)


# --- the serving dtype reaches validation -----------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "config_dtype", "expected"),
    [
        ("float32", "float32", "float32"),
        ("float16", "float32", "float16"),
        ("half", "bfloat16", "float16"),
        ("bfloat16", "float32", "bfloat16"),
        ("float", "float16", "float32"),
        ("auto", "bfloat16", "bfloat16"),
        ("auto", "float16", "float16"),
        # vLLM's auto downcasts float32 to the platform's half type: the narrower one is assumed
        ("auto", "float32", "float16"),
        ("auto", None, "float16"),
    ],
)
def test_spec_dtype_from_settings_or_model_config(
    tiny_model: Path, tmp_path: Path, setting: str, config_dtype: str | None, expected: str
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    if config_dtype is not None:
        config["torch_dtype"] = config_dtype
    (model / "config.json").write_text(json.dumps(config))
    assert BaseModelSpec.from_hf_config(model, max_rank=16, dtype=setting).dtype == expected


def test_spec_refuses_an_unknown_dtype(tiny_model: Path) -> None:
    with pytest.raises(InvalidAdapter, match="unknown serving dtype 'int8'"):
        BaseModelSpec.from_hf_config(tiny_model, max_rank=16, dtype="int8")


# --- JSON types in every field: a refusal is always a StoreError, never a crash ---------------


@pytest.mark.parametrize("raw", JSON_VALUES)
@pytest.mark.parametrize("field", HEADER_FIELDS)
def test_header_field_of_any_json_type_is_refused_cleanly(
    adapter_copy: Path, spec: BaseModelSpec, field: str, raw: str
) -> None:
    raw_weights(header_field(field, raw))(adapter_copy)
    files = {CONFIG_FILE: adapter_copy / CONFIG_FILE, WEIGHTS_FILE: adapter_copy / WEIGHTS_FILE}
    if (field, raw) in VALID_HEADER_VALUES:
        validate_adapter(files, spec, Limits())
        return
    with pytest.raises(InvalidAdapter):
        validate_adapter(files, spec, Limits())


def _config_with(folder: Path, key: str, raw: str) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    config[key] = "__VALUE_MARKER__"
    text = json.dumps(config).replace('"__VALUE_MARKER__"', raw)
    (folder / CONFIG_FILE).write_text(text)


@pytest.mark.parametrize("raw", JSON_VALUES)
@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_config_field_of_any_json_type_is_refused_cleanly_or_accepted(
    adapter_copy: Path, spec: BaseModelSpec, key: str, raw: str
) -> None:
    _config_with(adapter_copy, key, raw)
    files = {CONFIG_FILE: adapter_copy / CONFIG_FILE, WEIGHTS_FILE: adapter_copy / WEIGHTS_FILE}
    with contextlib.suppress(InvalidAdapter, Incompatible):
        validate_adapter(files, spec, Limits())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(where=st.sampled_from([*HEADER_FIELDS, *(f"config:{k}" for k in CONFIG_KEYS)]), value=JSON)
def test_fuzz_field_types(
    adapter_copy: Path, good_adapter: Path, spec: BaseModelSpec, where: str, value: object
) -> None:
    """Hypothesis: any JSON value in any header field or config key → accepted or a StoreError
    (never TypeError, ValueError, OverflowError...)."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copyfile(good_adapter / name, adapter_copy / name)
    raw = json.dumps(value)  # NaN/Infinity become the non-standard constants, also refused
    if where.startswith("config:"):
        _config_with(adapter_copy, where.removeprefix("config:"), raw)
    else:
        raw_weights(header_field(where, raw))(adapter_copy)
    files = {CONFIG_FILE: adapter_copy / CONFIG_FILE, WEIGHTS_FILE: adapter_copy / WEIGHTS_FILE}
    with contextlib.suppress(StoreError):
        validate_adapter(files, spec, Limits())
