"""Settings (pydantic-settings): sources in order, and clear errors for a bad file, variable or
flag. Expected texts are written out here, not produced by the code under test."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_gateway.cli import main
from lora_gateway.config import Settings
from lora_gateway.errors import InvalidArgument


def test_sources_in_order_defaults_file_environment_overrides(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("max-loras: 2\nmax_cpu_loras: 6\nmax_num_seqs: 7\nwarm_adapters: [a/x]\n")
    settings = Settings.load(
        config,
        overrides={"max_loras": 3, "listen": None},
        environ={"LORA_GATEWAY_MAX_CPU_LORAS": "5", "LORA_GATEWAY_MAX_LORAS": "4"},
    )
    assert settings.max_loras == 3  # flag over environment over file
    assert settings.max_cpu_loras == 5  # environment over file
    assert settings.max_num_seqs == 7  # file over default
    assert settings.warm_adapters == ("a/x",)
    assert settings.listen == "127.0.0.1:50051"  # a None override is no override


def test_environment_text_forms(tmp_path: Path) -> None:
    settings = Settings.load(
        environ={
            "LORA_GATEWAY_WARM_ADAPTERS": "acme/a, acme/b",
            "LORA_GATEWAY_ENGINE_ARGS": "{swap_space: 1}",
            "LORA_GATEWAY_MAX_MODEL_LEN": "",
            "LORA_GATEWAY_SELF_TEST": "off",
            "LORA_GATEWAY_MAX_LORA_RANK": "16",
            # Client variables share the prefix and are not settings: ignored by serve.
            "LORA_GATEWAY_TARGET": "gateway:50051",
        }
    )
    assert settings.warm_adapters == ("acme/a", "acme/b")
    assert settings.engine_args == {"swap_space": 1}
    assert settings.max_model_len is None
    assert settings.self_test is False
    assert settings.max_lora_rank == 16


def test_plain_construction_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_GATEWAY_MAX_LORAS", "7")
    assert Settings.from_mapping({}).max_loras == 4
    assert Settings.load().max_loras == 7


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_loras": "many"}, "max_loras: Input should be a valid integer"),
        ({"max_loras": 0}, "max_loras: Input should be greater than or equal to 1 (got 0)"),
        ({"max_loras": True}, "max_loras: expected a number, got True"),
        ({"max_loras": 8, "max_cpu_loras": 4}, "max_cpu_loras (4) must be >= max_loras (8)"),
        ({"bogus": 1, "other": 2}, "unknown settings: bogus, other"),
        ({"null_adapter": "maybe"}, "null_adapter: Input should be 'auto', 'on' or 'off'"),
        ({"max_lora_rank": 7}, "max_lora_rank: must be one of 1, 8, 16, 32, 64, 128"),
        ({"self_test": "perhaps"}, "self_test: Input should be a valid boolean"),
        (
            {"cpu_queue_wait_us": 20_000},
            "cpu_queue_wait_us: Input should be less than or equal to 10000 (got 20000)",
        ),
        ({"engine_args": "[1,2"}, "engine_args: not valid YAML"),
        ({"engine_args": "- a"}, "engine_args: expected a mapping of vLLM engine arguments"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization: Input should be less than"),
        ({"store": "http://x"}, "store must be file:///path or s3://bucket/prefix"),
        ({"tls_cert": "a"}, "tls_cert and tls_key go together"),
        ({"poll_interval_s": 0}, "poll_interval_s: Input should be greater than 0"),
        ({"dtype": "float64"}, "dtype: Input should be 'auto', 'float16', 'bfloat16'"),
    ],
)
def test_bad_values_name_the_setting(values: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        Settings.from_mapping(values)
    assert message in str(caught.value)


def test_several_problems_are_reported_together() -> None:
    with pytest.raises(InvalidArgument) as caught:
        Settings.from_mapping({"max_loras": "x", "poll_interval_s": -1, "typo": 1})
    text = str(caught.value)
    assert text.startswith("unknown settings: typo; invalid settings: ")
    assert "max_loras:" in text
    assert "poll_interval_s:" in text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("- a\n- b\n", "expected a mapping of settings"),
        ("max_loras: [1\n", "not valid YAML"),
        ("max_lorass: 2\n", "unknown settings: max_lorass"),
        ("max_loras: two\n", "max_loras: Input should be a valid integer"),
    ],
)
def test_bad_config_file(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(content)
    with pytest.raises(InvalidArgument) as caught:
        Settings.load(config, environ={})
    assert message in str(caught.value)
    if "unknown" in message or "YAML" in message or "mapping" in message:
        assert str(config) in str(caught.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"config file .*missing\.yaml: No such file"):
        Settings.load(tmp_path / "missing.yaml", environ={})


def test_bad_environment_variable() -> None:
    with pytest.raises(InvalidArgument, match="max_cpu_loras: Input should be a valid integer"):
        Settings.load(environ={"LORA_GATEWAY_MAX_CPU_LORAS": "lots"})


def test_bad_flag_and_file_exit_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--max-loras", "many", "--dry-run"], environ={}) == 2
    assert "max_loras: Input should be a valid integer" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("max_loras: [1\n")
    assert main(["serve", "--config", str(config), "--dry-run"], environ={}) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_settings_are_frozen_and_replace_validates() -> None:
    settings = Settings.from_mapping({"max_loras": 2, "max_cpu_loras": 3})
    with pytest.raises(Exception, match="frozen"):
        settings.max_loras = 3  # type: ignore[misc]
    assert settings.replace(max_cpu_loras=5).max_cpu_loras == 5
    with pytest.raises(InvalidArgument, match="max_cpu_loras \\(1\\) must be >= max_loras"):
        settings.replace(max_cpu_loras=1)


def test_help_text_is_the_field_docstring() -> None:
    assert Settings.field_doc("max_cpu_loras").startswith("Adapters the engine keeps loaded")


def test_max_cpu_loras_is_derived_from_the_host_byte_budget() -> None:
    """Unset, `max_cpu_loras` is 8 (at least max_loras); with a host byte budget it is the
    budget over the smallest adapter that changes every layer, between max_loras and 65,536;
    set, it is what it says."""
    assert Settings().max_cpu_loras is None
    assert Settings().engine_cpu_loras(1536) == 8
    assert Settings(max_loras=12).engine_cpu_loras(1536) == 12
    budget = Settings(host_lora_budget_bytes=1 << 20)
    assert budget.engine_cpu_loras(1536) == 682  # 1,048,576 // 1,536
    assert budget.engine_cpu_loras(1) == 65_536
    assert Settings(host_lora_budget_bytes=1000, max_loras=4).engine_cpu_loras(1536) == 4
    assert Settings(host_lora_budget_bytes=1 << 20, max_cpu_loras=6).engine_cpu_loras(1536) == 6
    assert Settings(host_lora_budget_bytes=1 << 20).tenant_defaults().max_engine_slots == 65_535
    assert Settings().tenant_defaults().max_engine_slots == 7
