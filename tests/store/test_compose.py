"""AdaLoRA normalisation and composition are exact: checked numerically and against PEFT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from adapter_store import AdapterRef, BaseModelSpec, InvalidAdapter, Limits, Registry
from adapter_store.model import CONFIG_FILE, WEIGHTS_FILE
from adapter_store.rewrite import compose, group_modules, lora_scaling
from adapter_store.validate import validate_adapter
from lora_gateway import devtools
from tests.conftest import AdapterFactory


def merged_weights(model_dir: Path, adapter_dir: Path | None) -> dict[str, np.ndarray]:
    """The base model's linear weights after PEFT's merge_and_unload (float64 numpy)."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model: Any = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return {
        name: param.detach().double().numpy()
        for name, param in model.state_dict().items()
        if name.endswith("proj.weight")
    }


def write_version(registry: Registry, tenant: str, ref: str, dest: Path) -> Path:
    version = registry.resolve(tenant, AdapterRef.parse(ref))
    dest.mkdir(parents=True)
    for entry in version.files:
        registry.fetch_file(version, entry.filename, dest / entry.filename)
    return dest


def test_adalora_normalisation_matches_peft(
    tiny_model: Path,
    make_test_adapter: AdapterFactory,
    spec: BaseModelSpec,
    tmp_path: Path,
) -> None:
    adalora = make_test_adapter(
        seed=3, adalora=True, alpha=12.0, target_modules=devtools.ALL_MODULES
    )
    validated = validate_adapter(
        {CONFIG_FILE: adalora / CONFIG_FILE, WEIGHTS_FILE: adalora / WEIGHTS_FILE}, spec, Limits()
    )
    assert validated.peft_type == "ADALORA"
    assert set(validated.rewritten) == {
        CONFIG_FILE,
        WEIGHTS_FILE,
    }
    normalised = tmp_path / "normalised"
    normalised.mkdir()
    for filename, data in validated.rewritten.items():
        (normalised / filename).write_bytes(data)
    config = json.loads((normalised / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA"
    assert config["lora_alpha"] == config["r"] == 8
    assert not any(name.endswith("lora_E") for name in load_file(str(normalised / WEIGHTS_FILE)))

    base = merged_weights(tiny_model, None)
    want = merged_weights(tiny_model, adalora)
    got = merged_weights(tiny_model, normalised)
    for name in want:
        assert np.abs(want[name] - base[name]).max() > 1e-3, "the adapter must change the weights"
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


def test_adalora_upload_is_stored_as_lora(
    local_registry: Registry, make_test_adapter: AdapterFactory
) -> None:
    adalora = make_test_adapter(
        seed=3, adalora=True, alpha=12.0, target_modules=devtools.ALL_MODULES
    )
    version = local_registry.upload_dir("acme", "ada", adalora, created_by="t")
    assert (version.rank, version.alpha, version.use_rslora, version.dtype) == (
        8,
        8.0,
        False,
        "F32",
    )
    assert len(version.target_modules) == 7


def _deltas(tensors: dict[str, np.ndarray], config: dict[str, Any]) -> dict[Any, np.ndarray]:
    scaling = lora_scaling(
        float(config["lora_alpha"]), int(config["r"]), bool(config.get("use_rslora"))
    )
    return {
        key: scaling * parts["B"].astype(np.float64) @ parts["A"].astype(np.float64)
        for key, parts in group_modules(tensors).items()
    }


def test_composition_is_the_weighted_sum_of_deltas(
    tiny_model: Path,
    make_test_adapter: AdapterFactory,
    local_registry: Registry,
    tmp_path: Path,
) -> None:
    # Different ranks, alphas, scalings (rsLoRA) and module sets.
    first = make_test_adapter(seed=1)
    second = make_test_adapter(
        seed=2, rank=4, alpha=8.0, use_rslora=True, target_modules=devtools.ALL_MODULES
    )
    local_registry.upload_dir("acme", "first", first, created_by="t")
    local_registry.upload_dir("acme", "second", second, created_by="t")
    weights = (0.7, -0.3)
    version = local_registry.compose(
        "acme",
        "mix",
        [(AdapterRef.parse("first"), weights[0]), (AdapterRef.parse("second@latest"), weights[1])],
        created_by="bob",
        aliases=("prod",),
    )
    assert version.rank == 12
    assert version.alpha == 12.0
    assert not version.use_rslora
    assert [w for _, w in version.composed_from] == list(weights)
    assert local_registry.resolve("acme", AdapterRef.parse("mix@prod")) == version
    composed_dir = write_version(local_registry, "acme", "mix", tmp_path / "mix")

    # Numerically, in float64.
    parts = []
    for folder in (first, second):
        parts.append(
            (load_file(str(folder / WEIGHTS_FILE)), json.loads((folder / CONFIG_FILE).read_text()))
        )
    got = _deltas(
        load_file(str(composed_dir / WEIGHTS_FILE)),
        json.loads((composed_dir / CONFIG_FILE).read_text()),
    )
    want: dict[Any, np.ndarray] = {}
    for (tensors, config), weight in zip(parts, weights, strict=True):
        for key, delta in _deltas(tensors, config).items():
            want[key] = want.get(key, 0) + weight * delta
    assert got.keys() == want.keys()
    assert len(got) == 14
    for key in want:
        # Exact up to the float32 rounding of the stored factors (relative 1e-7 of the scale).
        scale = np.abs(want[key]).max()
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6 * scale, err_msg=str(key))

    # And as PEFT merges it into the model.
    base = merged_weights(tiny_model, None)
    merged = [merged_weights(tiny_model, folder) for folder in (first, second)]
    composed = merged_weights(tiny_model, composed_dir)
    for name in base:
        expected = base[name] + sum(
            w * (m[name] - base[name]) for w, m in zip(weights, merged, strict=True)
        )
        np.testing.assert_allclose(composed[name], expected, rtol=0, atol=1e-6, err_msg=name)


def test_composition_rank_cap(local_registry: Registry, make_test_adapter: AdapterFactory) -> None:
    big = make_test_adapter(seed=4, rank=40)
    local_registry.upload_dir("acme", "big", big, created_by="t")
    with pytest.raises(InvalidAdapter, match=r"composed rank 80 .* exceeds the maximum rank 64"):
        local_registry.compose(
            "acme",
            "too-big",
            [(AdapterRef.parse("big"), 1.0), (AdapterRef.parse("big"), 1.0)],
            created_by="t",
        )


def test_compose_refuses_bad_weights() -> None:
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones(
            (1, 2), np.float32
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones(
            (2, 1), np.float32
        ),
    }
    config = {"r": 1, "lora_alpha": 1, "base_model_name_or_path": "m"}
    with pytest.raises(InvalidAdapter, match="finite"):
        compose([(tensors, config, float("nan"))], max_rank=8)
    with pytest.raises(InvalidAdapter, match="at least one part"):
        compose([], max_rank=8)
