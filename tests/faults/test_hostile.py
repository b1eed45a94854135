"""Hostile input through the real gRPC server: property tests and a crafted corpus.

- Hypothesis draws GenerateRequest fields and UploadAdapter streams (header + chunks): the
  answer is never INTERNAL, the server never crashes, every refusal has a documented code.
  About 60 examples per RPC in `make test`; 1,000 per RPC with `--run-slow`.
- Hypothesis also draws safetensors headers whose fields (dtype, shape, data_offsets, a whole
  entry, __metadata__) hold a JSON value of any type: always INVALID_ARGUMENT.
- The crafted corpus of hostile adapters, names, aliases, configs and headers (every JSON type in
  every header field, wrong types in the main config keys; tests/support/hostile.py), each
  uploaded through UploadAdapter and refused with its documented code; nothing is stored,
  nothing is left in the cache or the spool, and no file appears outside the cache root.

Expected codes come from the documented table (DESIGN.md "Errors → status codes", `DOCUMENTED`
below), never from `errors.status_of`, the code under test.

All of it runs as the tenant `fuzz`, which owns no adapter, so a valid name finds nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter_store import CapacityExceeded, Incompatible, InvalidAdapter, StoreError
from adapter_store.model import CONFIG_FILE, WEIGHTS_FILE
from lora_gateway.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.conftest import AdapterFactory
from tests.faults.conftest import FaultEnv
from tests.support.constraints import HOSTILE_CONSTRAINTS
from tests.support.gateway import key_of
from tests.support.hostile import (
    BAD_ADAPTERS,
    HEADER_FIELDS,
    crafted_cases,
    header_field,
    typed_cases,
)

pytestmark = pytest.mark.engine

SC = grpc.StatusCode
GENERATE_CODES = {SC.OK, SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.RESOURCE_EXHAUSTED}
UPLOAD_CODES = {
    SC.INVALID_ARGUMENT,
    SC.NOT_FOUND,
    SC.RESOURCE_EXHAUSTED,
    SC.FAILED_PRECONDITION,
}
#: DESIGN.md "Errors → status codes": an invalid adapter file is INVALID_ARGUMENT, an adapter
#: incompatible with the base model FAILED_PRECONDITION, a size cap RESOURCE_EXHAUSTED.
DOCUMENTED: dict[type[StoreError], SC] = {
    InvalidAdapter: SC.INVALID_ARGUMENT,
    Incompatible: SC.FAILED_PRECONDITION,
    CapacityExceeded: SC.RESOURCE_EXHAUSTED,
}
USER = (("authorization", f"Bearer {key_of('fuzz')}"),)
ADMIN = (("authorization", f"Bearer {key_of('fuzz', 'admin')}"),)
FAST, SLOW = 60, 1000

#: Figures for docs/reliability.md, printed at the end of each test.
TRIED: Counter[str] = Counter()
DETAILS: dict[str, str] = {}


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


# --- strategies -------------------------------------------------------------------------------

HOSTILE_TEXT = st.sampled_from(
    ["", "../../etc/passwd", "a/b", "%2e%2e", "\u0430dapter", "x" * 70, "a@b@c", "a\0b", "@", "/"]
)
TEXT = st.one_of(HOSTILE_TEXT, st.text(max_size=40))
F32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
U32 = st.integers(0, 2**32 - 1)


def mostly(
    valid: st.SearchStrategy[object], hostile: st.SearchStrategy[object]
) -> st.SearchStrategy[object]:
    """Valid about 3 times in 4, so that requests get past the first check often enough."""
    return st.sampled_from((True, True, True, False)).flatmap(lambda ok: valid if ok else hostile)


@st.composite
def generate_requests(draw: st.DrawFn) -> inference_pb2.GenerateRequest:
    sampling = inference_pb2.SamplingParams(
        max_tokens=draw(mostly(st.integers(0, 8), U32)),
        stop=draw(
            mostly(
                st.lists(st.text(min_size=1, max_size=5), max_size=2),
                st.lists(st.text(max_size=140), max_size=10),
            )
        ),
        stop_token_ids=draw(
            mostly(st.lists(st.integers(0, 300), max_size=3), st.lists(U32, max_size=70))
        ),
        ignore_eos=draw(st.booleans()),
        min_tokens=draw(mostly(st.integers(0, 2), U32)),
    )
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if draw(st.booleans()):
            setattr(sampling, name, draw(mostly(st.sampled_from([0.1, 0.5, 0.9, 1.0]), F32)))
    if draw(st.booleans()):
        sampling.repetition_penalty = draw(mostly(st.sampled_from([0.5, 1.0, 1.2]), F32))
    if draw(st.booleans()):
        sampling.top_k = draw(mostly(st.integers(0, 50), U32))
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.integers(0, 3)) == 0:
        sampling.constraint.CopyFrom(draw(CONSTRAINTS))
    if draw(st.integers(0, 3)) == 0:
        sampling.logprobs = draw(mostly(st.integers(0, 5), U32))
    request = inference_pb2.GenerateRequest(
        adapter=draw(mostly(st.just(""), TEXT)),
        request_id=draw(mostly(st.text("abc-_0123", max_size=20), TEXT)),
        routing_key=draw(mostly(st.text(max_size=40), TEXT)),
        sampling=sampling,
    )
    prompt = draw(
        st.sampled_from(["text", "ids", "text", "ids", "text", "ids", "none", "huge", "chat"])
    )
    if prompt == "text":
        request.text = draw(mostly(st.text(min_size=1, max_size=200), st.just("")))
    elif prompt == "ids":
        request.token_ids.ids.extend(
            draw(
                mostly(
                    st.lists(st.integers(0, 400), min_size=1, max_size=40),
                    st.lists(U32, max_size=300),
                )
            )
        )
    elif prompt == "huge":
        request.text = "z" * draw(st.sampled_from([1000, 200_001]))
    elif prompt == "chat":
        roles = mostly(st.sampled_from(["system", "user", "assistant"]), TEXT)
        for _ in range(draw(st.integers(0, 4))):
            message = request.messages.messages.add()
            message.role = draw(roles)  # type: ignore[assignment]
            message.content = draw(TEXT)
        if draw(st.booleans()):
            request.messages.add_generation_prompt = draw(st.booleans())
    return request


#: Output constraints: small valid ones, hand-written hostile ones, and drawn regexes/schemas.
CONSTRAINTS = st.one_of(
    st.sampled_from(
        [
            inference_pb2.OutputConstraint(regex="[a-z]{1,4}"),
            inference_pb2.OutputConstraint(choice=inference_pb2.Choices(choices=["a", "b"])),
            inference_pb2.OutputConstraint(json_object=True, disable_any_whitespace=True),
        ]
    ),
    st.sampled_from([constraint for _, constraint in HOSTILE_CONSTRAINTS]),
    st.builds(lambda text: inference_pb2.OutputConstraint(regex=text), TEXT),
    st.builds(lambda text: inference_pb2.OutputConstraint(json_schema=text), TEXT),
    st.builds(lambda text: inference_pb2.OutputConstraint(grammar=text), TEXT),
)


DECLARED_NAMES = st.one_of(
    st.sampled_from([CONFIG_FILE, WEIGHTS_FILE]),
    st.sampled_from([CONFIG_FILE, WEIGHTS_FILE, "adapter_model.bin", "../" + CONFIG_FILE]),
    TEXT,
)
SHA = st.one_of(
    st.text("0123456789abcdef", min_size=64, max_size=64),
    st.just(hashlib.sha256(b"").hexdigest()),
    TEXT,
)


@st.composite
def upload_streams(draw: st.DrawFn) -> list[admin_pb2.UploadAdapterRequest]:
    files = [
        admin_pb2.DeclaredFile(
            filename=draw(DECLARED_NAMES),
            size=draw(st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1))),
            sha256=draw(SHA),
        )
        for _ in range(draw(st.integers(0, 3)))
    ]
    header = admin_pb2.UploadHeader(
        tenant=draw(mostly(st.sampled_from(["", "fuzz"]), TEXT)),
        name=draw(mostly(st.just("fuzzed"), TEXT)),
        aliases=draw(mostly(st.just([]), st.lists(TEXT, max_size=3))),
        description=draw(st.one_of(st.text(max_size=50), st.just("d" * 1100))),
        files=files,
    )
    messages = [admin_pb2.UploadAdapterRequest(header=header)]
    if draw(st.booleans()):
        messages.insert(0, admin_pb2.UploadAdapterRequest(header=header))  # header twice
    for _ in range(draw(st.integers(0, 3))):
        chunk = admin_pb2.FileChunk(
            filename=draw(DECLARED_NAMES), data=draw(st.binary(max_size=64))
        )
        messages.append(admin_pb2.UploadAdapterRequest(chunk=chunk))
    return messages


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)


def _header_entry(weights: bytes) -> tuple[str, dict[str, object], object]:
    """The first tensor's name and header entry, and the __metadata__ value."""
    length = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + length])
    first = sorted(k for k in header if k != "__metadata__")[0]
    return first, header[first], header.get("__metadata__")


def _is_valid_header_value(field: str, value: object, weights: bytes) -> bool:
    """True for the few values that keep the header valid (the original ones)."""
    _, entry, _ = _header_entry(weights)
    if field == "__metadata__":
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    original = entry if field == "entry" else entry[field]
    return json.dumps(value) == json.dumps(original)


@st.composite
def typed_header_uploads(draw: st.DrawFn, weights: bytes) -> tuple[str, bytes]:
    """(field, safetensors bytes) with one header field set to a JSON value of any type."""
    field = draw(st.sampled_from(HEADER_FIELDS))
    value = draw(JSON)
    if _is_valid_header_value(field, value, weights):
        value = [value]  # a list is never valid in any header field
    raw = json.dumps(value)  # NaN/Infinity become non-standard constants: refused as well
    return field, header_field(field, raw)(weights)


def _upload_messages(config: bytes, weights: bytes) -> list[admin_pb2.UploadAdapterRequest]:
    files = [(CONFIG_FILE, config), (WEIGHTS_FILE, weights)]
    header = admin_pb2.UploadHeader(
        name="typed",
        files=[
            admin_pb2.DeclaredFile(
                filename=name, size=len(data), sha256=hashlib.sha256(data).hexdigest()
            )
            for name, data in files
        ],
    )
    messages = [admin_pb2.UploadAdapterRequest(header=header)]
    for name, data in files:
        chunk = admin_pb2.FileChunk(filename=name, data=data)
        messages.append(admin_pb2.UploadAdapterRequest(chunk=chunk))
    return messages


def run_header_type_fuzz(target: str, good: Path, examples: int) -> Counter[str]:
    config = (good / CONFIG_FILE).read_bytes()
    weights = (good / WEIGHTS_FILE).read_bytes()
    seen: Counter[str] = Counter()
    with grpc.insecure_channel(target) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)

        @fuzz_settings(examples)
        @given(typed_header_uploads(weights))
        def check(case: tuple[str, bytes]) -> None:
            field, data = case
            messages = _upload_messages(config, data)
            code = _code(lambda: stub.UploadAdapter(iter(messages), metadata=ADMIN, timeout=60))
            seen[field] += 1
            assert code == DOCUMENTED[InvalidAdapter], (code, field, data[:300])

        check()
    return seen


# --- the property tests (hypothesis runs in a thread; the server runs on the test's loop) -----


#: The first words of each refusal's text, counted (printed with the figures).
REASONS: Counter[str] = Counter()


def _code(call: Callable[[], object]) -> SC:
    try:
        call()
    except grpc.RpcError as exc:
        REASONS[" ".join((exc.details() or "").split()[:3])] += 1  # type: ignore[attr-defined]
        return exc.code()  # type: ignore[no-any-return]
    return SC.OK


def run_generate_fuzz(target: str, examples: int) -> Counter[SC]:
    seen: Counter[SC] = Counter()
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        @fuzz_settings(examples)
        @given(generate_requests(), st.booleans())
        def check(request: inference_pb2.GenerateRequest, stream: bool) -> None:
            def call() -> object:
                if stream:
                    return list(stub.GenerateStream(request, metadata=USER, timeout=60))
                return stub.Generate(request, metadata=USER, timeout=60)

            code = _code(call)
            seen[code] += 1
            assert code in GENERATE_CODES, (code, request)

        check()
    return seen


def run_upload_fuzz(target: str, examples: int) -> Counter[SC]:
    seen: Counter[SC] = Counter()
    with grpc.insecure_channel(target) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)

        @fuzz_settings(examples)
        @given(upload_streams())
        def check(messages: list[admin_pb2.UploadAdapterRequest]) -> None:
            code = _code(lambda: stub.UploadAdapter(iter(messages), metadata=ADMIN, timeout=60))
            seen[code] += 1
            assert code in UPLOAD_CODES, (code, messages[:2])

        check()
    return seen


async def _assert_serving(fenv: FaultEnv) -> None:
    await fenv.server.engine.check_health()
    assert not fenv.server.engine_failed.is_set()


async def _fuzz_generate(fenv: FaultEnv, examples: int) -> None:
    seen = await asyncio.to_thread(run_generate_fuzz, fenv.target, examples)
    await _assert_serving(fenv)
    TRIED["Generate"] += sum(seen.values())
    print(f"\nGenerate fuzz: {dict((c.name, n) for c, n in seen.items())}")
    print(f"top refusals: {REASONS.most_common(6)}")


async def _fuzz_upload(fenv: FaultEnv, examples: int) -> None:
    seen = await asyncio.to_thread(run_upload_fuzz, fenv.target, examples)
    await _assert_serving(fenv)
    assert fenv.stored_keys("tenants/fuzz/") == []
    TRIED["UploadAdapter"] += sum(seen.values())
    print(f"\nUploadAdapter fuzz: {dict((c.name, n) for c, n in seen.items())}")


async def test_fuzz_generate(fenv: FaultEnv) -> None:
    await _fuzz_generate(fenv, FAST)


@pytest.mark.parametrize(("reason", "constraint"), HOSTILE_CONSTRAINTS)
async def test_hostile_constraints_are_invalid_argument(
    fenv: FaultEnv, reason: str, constraint: inference_pb2.OutputConstraint
) -> None:
    """Schemas and regexes past the structured-output limits, malformed ones, and a constraint
    of no kind: INVALID_ARGUMENT naming the reason, and the engine keeps serving."""
    sampling = inference_pb2.SamplingParams(max_tokens=2, constraint=constraint)
    with grpc.insecure_channel(fenv.target) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        request = inference_pb2.GenerateRequest(text="hello", sampling=sampling)
        with pytest.raises(grpc.RpcError) as caught:
            await asyncio.to_thread(stub.Generate, request, metadata=USER, timeout=30)
    assert caught.value.code() is SC.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert reason.lower() in (caught.value.details() or "").lower()  # type: ignore[attr-defined]
    await _assert_serving(fenv)


async def _fuzz_header_types(fenv: FaultEnv, good: Path, examples: int) -> None:
    seen = await asyncio.to_thread(run_header_type_fuzz, fenv.target, good, examples)
    await _assert_serving(fenv)
    assert fenv.stored_keys("tenants/fuzz/") == []
    assert set(seen) == set(HEADER_FIELDS), seen  # every field was tried
    TRIED["UploadAdapter header types"] += sum(seen.values())
    print(f"\nheader-type fuzz: {dict(seen)}")


async def test_fuzz_upload_header_types(fenv: FaultEnv, make_test_adapter: AdapterFactory) -> None:
    await _fuzz_header_types(fenv, make_test_adapter(seed=1), FAST)


@pytest.mark.slow
async def test_fuzz_upload_header_types_at_scale(
    fenv: FaultEnv, make_test_adapter: AdapterFactory
) -> None:
    await _fuzz_header_types(fenv, make_test_adapter(seed=1), SLOW)


async def test_fuzz_upload(fenv: FaultEnv) -> None:
    await _fuzz_upload(fenv, FAST)


@pytest.mark.slow
async def test_fuzz_generate_at_scale(fenv: FaultEnv) -> None:
    await _fuzz_generate(fenv, SLOW)


@pytest.mark.slow
async def test_fuzz_upload_at_scale(fenv: FaultEnv) -> None:
    await _fuzz_upload(fenv, SLOW)


# --- the crafted corpus ---------------------------------------------------------------------


def _messages(folder: Path, fields: dict[str, object]) -> list[admin_pb2.UploadAdapterRequest]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "README.md")
    declared = [
        admin_pb2.DeclaredFile(
            filename=p.name,
            size=p.stat().st_size,
            sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in files
    ]
    if declared and "size" in fields:
        declared[-1].size = int(str(fields["size"]))
    if declared and "sha256" in fields:
        declared[0].sha256 = str(fields["sha256"])
    if declared and "filename" in fields:
        declared[0].filename = str(fields["filename"])
    if "files" in fields:
        declared = []
    header = admin_pb2.UploadHeader(
        tenant=str(fields.get("tenant", "")),
        name=str(fields.get("name", "corpus")),
        aliases=list(fields.get("aliases", [])),  # type: ignore[call-overload]
        description=str(fields.get("description", "")),
        files=declared,
    )
    messages = [admin_pb2.UploadAdapterRequest(header=header)]
    for path in files:
        data = path.read_bytes()
        for start in range(0, max(len(data), 1), 64 * 1024):
            chunk = admin_pb2.FileChunk(filename=path.name, data=data[start : start + 64 * 1024])
            messages.append(admin_pb2.UploadAdapterRequest(chunk=chunk))
    return messages


async def _raw_upload(
    stub: admin_pb2_grpc.AdminStub, folder: Path, fields: dict[str, object]
) -> SC:
    messages = await asyncio.to_thread(_messages, folder, fields)
    try:
        await stub.UploadAdapter(iter(messages), metadata=ADMIN, timeout=60)
    except grpc.aio.AioRpcError as exc:
        DETAILS[str(folder.name)] = exc.details() or ""
        return exc.code()
    return SC.OK


def _snapshot(fenv: FaultEnv) -> tuple[set[str], set[str], list[Path]]:
    """Files under the work folder outside the cache root, spool folders, cache temp files."""
    root, skip = fenv.work, fenv.cache_root
    tree = {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if skip not in p.parents and p != skip and p.name != "audit.jsonl"
    }
    spool = {p.name for p in fenv.server.gateway.store.spool.working_folder.glob("upload-*")}  # type: ignore[attr-defined]
    cache_tmp = skip / ".tmp"
    leftovers = list(cache_tmp.iterdir()) if cache_tmp.exists() else []
    leftovers += [p for p in (Path(os.sep, "etc", "corpus"),) if p.exists()]
    return tree, spool, leftovers


def _prepare(good: Path, folder: Path, mutation: Callable[[Path], None]) -> None:
    shutil.copytree(good, folder)
    mutation(folder)


async def test_crafted_corpus_refused_nothing_stored(
    fenv: FaultEnv, make_test_adapter: AdapterFactory, tmp_path: Path
) -> None:
    good = make_test_adapter(seed=1)  # the store tests' good adapter: rank 8, attention
    cases = list(crafted_cases())
    assert len(cases) >= 60
    assert len({c[0] for c in cases}) == len(cases)
    expected = {f"adapter:{case_id}": DOCUMENTED[error] for case_id, _, error, _ in BAD_ADAPTERS}
    expected.update({case_id: SC.INVALID_ARGUMENT for case_id, _ in typed_cases()})
    cache_before = {e.sha for e in fenv.server.gateway.residency.cache.entries()}
    work_before, spool_before, _ = await asyncio.to_thread(_snapshot, fenv)

    codes: dict[str, SC] = {}
    async with grpc.aio.insecure_channel(fenv.target) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        for case_id, mutation, fields in cases:
            folder = tmp_path / case_id.replace(":", "_")
            await asyncio.to_thread(_prepare, good, folder, mutation)
            codes[case_id] = await _raw_upload(stub, folder, fields)

    wrong = {
        case_id: code.name
        for case_id, code in codes.items()
        if code not in UPLOAD_CODES or (case_id in expected and code != expected[case_id])
    }
    assert wrong == {}, {k: (v, DETAILS.get(k.replace(":", "_"))) for k, v in wrong.items()}
    assert fenv.stored_keys("tenants/fuzz/") == []
    assert {e.sha for e in fenv.server.gateway.residency.cache.entries()} == cache_before
    work_after, spool_after, leftovers = await asyncio.to_thread(_snapshot, fenv)
    assert work_after == work_before, "no file appears outside the cache root"
    assert spool_after <= spool_before, "no spool folder is left behind"
    assert leftovers == []
    await _assert_serving(fenv)
    TRIED["corpus"] += len(cases)
    print(f"\ncrafted corpus: {len(cases)} refused: {Counter(c.name for c in codes.values())}")
