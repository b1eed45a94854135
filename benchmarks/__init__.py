"""Benchmarks of lora-gateway: `python -m benchmarks [--smoke] [--only NAME ...] [--out DIR]`.

Nine benchmarks, each reporting ratios measured within one run (so that a noisy machine still
gives meaningful numbers): the gateway against stock `vllm serve` on the mixed workload and on
200 adapters under Zipf traffic with vLLM's filesystem resolver (both as server processes, one
at a time, before anything else starts), gateway overhead against the
engine alone, cold start phase by phase against the physical floor, many adapters under Zipf
traffic, the thundering herd on one cold adapter, revocation racing in-flight requests, a
quantized base against float32 (memory and throughput), and the request features (structured
output's cost, the OpenAI front against gRPC). Results go to `<out>/<name>.json`, a PNG plot
per benchmark and `<out>/SUMMARY.md`.
"""

BENCHMARKS = (
    "peer",
    "peer_zipf",
    "overhead",
    "cold_start",
    "many_adapters",
    "herd",
    "revocation",
    "quantized",
    "features",
)
