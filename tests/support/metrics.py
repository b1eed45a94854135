"""Reading the gateway's Prometheus metrics in tests and benchmarks: the registry's sample values.

`ResidencyCounts` names the residency's counters (what `ResidencyStats` held before the
counts moved to the metrics); `residency_counts(metrics)` reads them all at once, so a test takes
a snapshot before and compares after. A metric never recorded reads 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from lora_gateway.metrics import LoadPhase, Metrics

__all__ = ["ResidencyCounts", "load_seconds", "residency_counts", "sample"]


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample of the registry (0 when the series was never recorded)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@dataclass(frozen=True)
class ResidencyCounts:
    engine_hits: float
    engine_misses: float
    disk_hits: float
    disk_misses: float
    engine_loads: float
    evictions: float
    revoked_unloads: float
    manifest_fetches: float
    manifest_evictions: float
    slot_waits: float
    tenant_slot_waits: float

    def minus(self, before: ResidencyCounts) -> ResidencyCounts:
        return ResidencyCounts(
            **{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)}
        )


def residency_counts(metrics: Metrics) -> ResidencyCounts:
    def s(name: str, **labels: str) -> float:
        return sample(metrics, name, **labels)

    return ResidencyCounts(
        engine_hits=s("lora_gateway_cache_hits_total", tier="engine"),
        engine_misses=s("lora_gateway_cache_misses_total", tier="engine"),
        disk_hits=s("lora_gateway_cache_hits_total", tier="disk"),
        disk_misses=s("lora_gateway_cache_misses_total", tier="disk"),
        engine_loads=s("lora_gateway_engine_loads_total"),
        evictions=s("lora_gateway_evictions_total", tier="engine"),
        revoked_unloads=s("lora_gateway_revoked_unloads_total"),
        manifest_fetches=s("lora_gateway_manifest_reads_total"),
        manifest_evictions=s("lora_gateway_manifest_evictions_total"),
        slot_waits=s("lora_gateway_slot_waits_total", queue="engine"),
        tenant_slot_waits=s("lora_gateway_slot_waits_total", queue="tenant"),
    )


def load_seconds(metrics: Metrics, phase: LoadPhase) -> tuple[int, float]:
    """(how many loads recorded the phase, their total seconds)."""
    count = sample(metrics, "lora_gateway_adapter_load_seconds_count", phase=phase)
    total = sample(metrics, "lora_gateway_adapter_load_seconds_sum", phase=phase)
    return int(count), total
