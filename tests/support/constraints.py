"""The hostile corpus of structured-output constraints: each is past one of the
structured-output limits (Settings defaults) or is not a schema at all, and must be refused
with INVALID_ARGUMENT, naming the reason, before it is admitted or reaches the engine.

Used by tests/api/test_grpc_features.py (refused before admission) and
tests/faults/test_hostile.py (the hostile corpus and the Generate fuzzer).
"""

from __future__ import annotations

import json

from lora_gateway.v1 import inference_pb2 as pb

#: (a word of the refusal's text, the constraint).
HOSTILE_CONSTRAINTS = [
    ("schema_bytes", pb.OutputConstraint(json_schema=json.dumps({"enum": ["x" * (40 << 10)]}))),
    (
        "depth",
        pb.OutputConstraint(json_schema='{"type": "array", "items": ' * 40 + "{}" + "}" * 40),
    ),
    (
        "properties",
        pb.OutputConstraint(
            json_schema=json.dumps(
                {"type": "object", "properties": {f"p{i}": {} for i in range(300)}}
            )
        ),
    ),
    ("repeat", pb.OutputConstraint(json_schema=json.dumps({"pattern": "(.{1,1000}){1,1000}"}))),
    ("repeat", pb.OutputConstraint(regex="((a{1,50}){1,50}){1,50}")),
    ("regex_chars", pb.OutputConstraint(regex="a" * 5000)),
    ("enum", pb.OutputConstraint(choice=pb.Choices(choices=[str(i) for i in range(1000)]))),
    ("grammar", pb.OutputConstraint(grammar="root ::= " + '"a" ' * 20_000)),
    ("JSON", pb.OutputConstraint(json_schema="{not json")),
    ("NUL", pb.OutputConstraint(regex="a\x00b")),
    ("JSON constraints only", pb.OutputConstraint(regex="a+", disable_any_whitespace=True)),
    ("set one of", pb.OutputConstraint()),
]
