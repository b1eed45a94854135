"""`devtools.write_random_lora`, the one random-LoRA writer (engine's reserved adapters, the
self-test, tests, benchmarks): what it writes is a valid adapter for the model, checked by the
store's validator (adapter_store.validate, independent of the writer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from adapter_store import BaseModelSpec, Incompatible, Limits
from adapter_store.model import CONFIG_FILE, WEIGHTS_FILE
from adapter_store.validate import validate_adapter
from lora_gateway import devtools


def files(folder: Path) -> dict[str, Path]:
    return {name: folder / name for name in (CONFIG_FILE, WEIGHTS_FILE)}


@pytest.fixture(scope="module")
def spec(tiny_model: Path) -> BaseModelSpec:
    return BaseModelSpec.from_hf_config(
        tiny_model, max_rank=64, aliases=(devtools.TINY_MODEL_NAME,)
    )


@pytest.mark.parametrize(
    "modules", [devtools.ATTENTION_MODULES, devtools.MLP_MODULES, devtools.ALL_MODULES]
)
def test_random_lora_is_a_valid_adapter_for_the_model(
    tiny_model: Path, spec: BaseModelSpec, tmp_path: Path, modules: tuple[str, ...]
) -> None:
    out = devtools.write_random_lora(tiny_model, tmp_path / "a", rank=16, seed=3, modules=modules)
    version = validate_adapter(files(out), spec, Limits())
    assert (version.rank, version.alpha) == (16, 32.0)
    assert version.target_modules == tuple(sorted(modules))
    tensors = load_file(str(out / WEIGHTS_FILE))
    assert len(tensors) == 2 * len(modules) * devtools.TINY_LAYERS
    q_a = tensors.get("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
    if "q_proj" in modules:
        assert q_a is not None
        assert q_a.shape == (16, devtools.TINY_HIDDEN)
        assert 0.01 < float(q_a.std()) < 0.03  # N(0, 0.02), the default scale


def test_same_seed_same_bytes_other_seed_other_weights_none_zeros(
    tiny_model: Path, tmp_path: Path
) -> None:
    one = devtools.write_random_lora(tiny_model, tmp_path / "one", seed=5)
    again = devtools.write_random_lora(tiny_model, tmp_path / "again", seed=5)
    other = devtools.write_random_lora(tiny_model, tmp_path / "other", seed=6)
    zeros = devtools.write_random_lora(tiny_model, tmp_path / "zeros", seed=None, rank=1)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (one / name).read_bytes() == (again / name).read_bytes()
    assert (one / WEIGHTS_FILE).read_bytes() != (other / WEIGHTS_FILE).read_bytes()
    assert all(not np.any(t) for t in load_file(str(zeros / WEIGHTS_FILE)).values())


def test_reserved_adapter_form_alpha_base_and_a_wrong_model(
    tiny_model: Path, spec: BaseModelSpec, tmp_path: Path
) -> None:
    """The engine's null/canary form: q_proj only, alpha = rank, named for the model path."""
    out = devtools.write_random_lora(
        tiny_model,
        tmp_path / "q",
        rank=8,
        seed=0,
        modules=("q_proj",),
        scale=0.5,
        lora_alpha=8.0,
        base_model=str(tiny_model),
    )
    config = json.loads((out / CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (8, 8.0, ["q_proj"])
    assert config["base_model_name_or_path"] == str(tiny_model)
    assert validate_adapter(files(out), spec, Limits()).target_modules == ("q_proj",)
    # Written for a model twice as wide: valid on its own, refused for this one.
    wide = tmp_path / "wide"
    wide.mkdir()
    model_config = json.loads((tiny_model / "config.json").read_text())
    model_config["hidden_size"] *= 2
    (wide / "config.json").write_text(json.dumps(model_config))
    wrong = devtools.write_random_lora(wide, tmp_path / "wrong", modules=("q_proj",))
    with pytest.raises(Incompatible):
        validate_adapter(files(wrong), spec, Limits())
