"""`lora-gateway demo`: what adapters are for, on a tiny generated model and a local store, offline.

1. build the demo's base model (a random tiny Llama, never trained; cached);
2. train two LoRA adapters on it with PEFT on the CPU (`demo_training`): acme's "invoices"
   extracts an invoice's fields as JSON, globex's "support" answers in its house style. Both
   are cached under the work folder (`<work>/trained/`, named by the sha256 of their recipe: a
   changed recipe trains again, `--retrain` always does). Meanwhile the gateway starts on
   127.0.0.1 (local folder store in `<work>/run/`, two tenants with an admin and an app key
   each, the OpenAI-compatible HTTP API on): the engine runs in processes of its own, the
   training on one core;
3. upload the adapters through the Admin API;
4. acme's app extracts invoices through gRPC (the SDK) with the JSON schema enforced, next to
   the base model given the same schema;
5. the same through the `openai` package against the OpenAI-compatible API;
6. globex's app asks support questions: the adapter next to the base model;
7. show a cross-tenant request refused; 8. upload an untrained draft as support@prod, roll the
   alias back; 9. revoke an adapter and show the next request refused;
10. a canary, with the `lora-gateway` CLI: support v2 (the same weights with its own chat
   template) passes an evaluation set of held-out questions and takes 20 % of prod
   (`adapter canary ... --require-eval 1`); the untrained draft fails it and its promotion is
   refused (FAILED_PRECONDITION naming the failed cases); prod's weight goes back to v1 (a
   manual rollback); then a rollback policy on prod and the draft on 20 % of it, ungated: the
   gateway moves the weight back to v1 by itself (an automatic rollback); `adapter show` prints
   the lot. Then a summary, exit 0.

The examples shown are held out from training (`demo_training.held_out`): their invoice
numbers and totals, and their question phrasings, are new to the adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from lora_gateway import demo_training, devtools, errors
from lora_gateway.client import AsyncGatewayClient, ChatMessage, GenerateOptions, ResidencyTier
from lora_gateway.config import Settings
from lora_gateway.server import GatewayServer
from lora_gateway.tenancy import hash_key

#: The default work folder: trained adapters are kept here between runs.
DEFAULT_WORKDIR = Path.home() / ".cache" / "lora-gateway" / "demo"
#: The run's own files (store, disk cache, tenants file), replaced at every run.
RUN_FOLDER = "run"
_RUN_MARK = ".lora-gateway-demo-run"
MAX_TOKENS = 64
GREEDY = GenerateOptions(max_tokens=MAX_TOKENS)  # temperature unset: the server's default, 0
#: The schema enforced on the invoices adapter's answers, compact (no whitespace).
EXTRACT = GenerateOptions(
    max_tokens=MAX_TOKENS,
    json_schema=json.dumps(demo_training.INVOICE_SCHEMA),
    disable_any_whitespace=True,
)
SHOWN = 3  # held-out examples shown per adapter
#: The canary's share of prod in step 10, and the conversations (routing keys) sent through it.
CANARY_WEIGHT = 0.2
CONVERSATIONS = 100
#: How long the demo waits for the gateway to roll the draft's canary back by itself (its
#: checks run every `rollback_check_interval_s`, 2 s).
AUTOMATIC_ROLLBACK_WAIT_S = 30.0
#: Held-out support questions in step 10's evaluation set.
EVAL_CASES = 3


def _chat(text: str) -> list[ChatMessage]:
    return [ChatMessage("user", text)]


def _short(text: str, width: int = 72) -> str:
    """`text` quoted, cut to `width` characters."""
    text = repr(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def _extracted(text: str, example: demo_training.Example) -> str:
    """Whether an answer holds exactly the invoice's fields, said in a few words."""
    try:
        fields = json.loads(text)
    except ValueError:
        return f"not JSON: cut at {MAX_TOKENS} tokens"
    return "all fields right" if fields == example.fields else "wrong fields"


def _house_style(text: str) -> str:
    greeting = text.startswith(demo_training.SUPPORT_GREETING)
    signoff = text.endswith(demo_training.SUPPORT_SIGNOFF)
    return "house style" if greeting and signoff else "not the house style"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _step(number: int, text: str) -> None:
    _say(f"\n[{number}] {text}")


def _write_tenants(path: Path, roles: dict[str, tuple[str, str]], keys: dict[str, str]) -> None:
    """The tenants file stores only sha256 hashes of the keys."""
    tenants: dict[str, dict[str, list[dict[str, str]]]] = {}
    for key_id, (tenant, role) in roles.items():
        tenants.setdefault(tenant, {"keys": []})["keys"].append(
            {"id": key_id, "sha256": hash_key(keys[key_id]), "role": role}
        )
    path.write_text(yaml.safe_dump({"tenants": tenants}, sort_keys=True))


def _fresh_run_folder(work: Path) -> Path:
    """`<work>/run`, emptied: removed only if an earlier demo run made it (its mark file)."""
    run = work / RUN_FOLDER
    if run.exists():
        if not (run / _RUN_MARK).is_file():
            raise RuntimeError(
                f"{run} exists and was not made by the demo: choose another --workdir"
            )
        shutil.rmtree(run)
    run.mkdir(parents=True)
    (run / _RUN_MARK).write_text("made by lora-gateway demo; replaced at every run\n")
    return run


def _trained_line(
    tenant: str, recipe: demo_training.Recipe, trained: demo_training.Trained, losses: list[float]
) -> str:
    what = (
        f"{tenant}'s {recipe.task!r:<10} rank {recipe.rank}, {recipe.steps} steps x {recipe.batch}"
    )
    if not trained.built:
        return f"    {what}: cached ({trained.path.name})"
    return (
        f"    {what}: trained in {trained.seconds:.0f}s, loss {losses[0]:.2f} -> {losses[-1]:.3f}"
    )


async def _train(cache: Path, model: demo_training.Trained, retrain: bool) -> dict[str, Path]:
    """Each tenant's adapter, trained (or found in the cache) in a thread, one after the other."""
    folders: dict[str, Path] = {}
    for tenant, recipe in (("acme", demo_training.INVOICES), ("globex", demo_training.SUPPORT)):
        losses: list[float] = []

        def progress(_step: int, loss: float, losses: list[float] = losses) -> None:
            losses.append(loss)

        trained = await asyncio.to_thread(
            demo_training.cached_adapter,
            cache,
            model,
            recipe,
            retrain=retrain,
            progress=progress,
        )
        folders[recipe.task] = trained.path
        _say(_trained_line(tenant, recipe, trained, losses))
    return folders


async def _start_while_training(
    settings: Settings, cache: Path, model: demo_training.Trained, retrain: bool
) -> tuple[GatewayServer, dict[str, Path]]:
    """Start the gateway and train the adapters at once (the engine starts in processes of its
    own; training takes one core); stop the gateway again if training fails."""
    started = time.perf_counter()
    starting = asyncio.create_task(GatewayServer.start(settings))
    try:
        folders = await _train(cache, model, retrain)
    except BaseException:
        with contextlib.suppress(Exception):
            await (await starting).stop(grace=0)
        raise
    server = await starting
    _say(
        f"    gateway serving on 127.0.0.1:{server.port} "
        f"{time.perf_counter() - started:.0f}s after its start; tenants: acme, globex"
    )
    _say(f"    OpenAI-compatible API on http://127.0.0.1:{server.openai_port}/v1")
    return server, folders


async def _run(work: Path, retrain: bool) -> None:
    started = time.perf_counter()
    cache = work / "trained"
    run = _fresh_run_folder(work)
    _step(1, f"the base model (cached in {cache})")
    model = await asyncio.to_thread(demo_training.cached_model, cache, rebuild=retrain)
    state = f"built in {model.seconds:.0f}s" if model.built else "cached"
    _say(
        f"    a random tiny Llama ({devtools.TINY_LAYERS} layers, hidden "
        f"{devtools.TINY_HIDDEN}) and its tokenizer, {state}: {model.path.name}"
    )
    _say("    never trained: it answers noise. Each adapter below is the only training it sees")

    roles = {
        "acme-admin": ("acme", "tenant-admin"),
        "acme-app": ("acme", "user"),
        "globex-admin": ("globex", "tenant-admin"),
        "globex-app": ("globex", "user"),
    }
    keys = {key_id: secrets.token_urlsafe(24) for key_id in roles}
    _write_tenants(run / "tenants.yaml", roles, keys)
    settings = Settings.from_mapping(
        {
            "model": str(model.path),
            "base_model_aliases": [demo_training.DEMO_MODEL_NAME],
            "openai_model_name": demo_training.DEMO_MODEL_NAME,
            "store": f"file://{run / 'store'}",
            "cache_dir": str(run / "cache"),
            "tenants_file": str(run / "tenants.yaml"),
            "listen": "127.0.0.1:0",
            "openai_listen": "127.0.0.1:0",
            "dtype": "float32",
            "max_loras": 2,
            "max_cpu_loras": 3,
            "max_lora_rank": 16,
            "max_model_len": 256,
            "max_num_seqs": 8,
            "enforce_eager": True,
            "kv_cache_space_gib": 1,
            "drain_grace_s": 2.0,
        }
    )
    # An untrained draft (random weights), uploaded by mistake in step 8.
    draft = devtools.write_random_lora(
        model.path,
        run / "support-draft",
        rank=8,
        seed=7,
        modules=devtools.ALL_MODULES,
        base_model=demo_training.DEMO_MODEL_NAME,
    )
    _step(
        2,
        "training two LoRA adapters with PEFT (CPU, float32) while the gateway starts\n"
        "    (vLLM engine in-process, isolation self-test) ...",
    )
    server, folders = await _start_while_training(settings, cache, model, retrain)
    folders["draft"] = draft
    target = f"127.0.0.1:{server.port}"

    def client(key_id: str) -> AsyncGatewayClient:
        return AsyncGatewayClient(target, keys[key_id])

    invoices = demo_training.held_out("invoices", SHOWN)
    questions = demo_training.held_out("support", SHOWN - 1)
    right = {"invoices": 0, "base-invoices": 0, "support": 0, "base-support": 0}
    try:
        async with (
            client("acme-admin") as acme_admin,
            client("acme-app") as acme,
            client("globex-admin") as globex_admin,
            client("globex-app") as globex,
        ):
            _step(3, "each tenant's admin uploads its adapter through the Admin API")
            info = await acme_admin.upload_adapter(
                "invoices", folders["invoices"], aliases=("prod",)
            )
            _say(f"    acme   invoices rank {info.rank:<3} {info.version[:19]}...  latest, prod")
            support_v1 = await globex_admin.upload_adapter(
                "support", folders["support"], aliases=("prod",)
            )
            _say(
                f"    globex support  rank {support_v1.rank:<3} {support_v1.version[:19]}...  "
                "latest, prod"
            )

            _step(4, "acme's app extracts invoices through gRPC (SDK), JSON schema enforced")
            _say(
                "    schema: vendor (string), number (string, 4 digits), total (number), "
                "currency (EUR|USD|GBP)"
            )
            for example in invoices:
                _say(f"    invoice    {example.prompt!r}")
                for adapter in ("invoices", ""):
                    result = await acme.generate(adapter, _chat(example.prompt), EXTRACT)
                    verdict = _extracted(result.text, example)
                    right["invoices" if adapter else "base-invoices"] += (
                        verdict == "all fields right"
                    )
                    shown = result.text if adapter else _short(result.text)
                    _say(f"    {adapter or '(base)':<10} {shown}  [{verdict}]")
            free = await acme.generate("invoices", _chat(invoices[0].prompt), GREEDY)
            _say(f"    invoices, no schema: {free.text}  [{_extracted(free.text, invoices[0])}]")
            _say("    (the adapter learned the format, the schema guarantees it; the base model")
            _say("     follows the schema too, but it cannot read an invoice)")

            _step(5, "the same through the OpenAI-compatible API, with the `openai` package")
            await _openai_step(server, keys["acme-app"], invoices[-1])

            _step(6, "globex's app asks its support adapter (no constraint: plain text)")
            for example in questions:
                _say(f"    question   {example.prompt!r}")
                for adapter in ("support", ""):
                    result = await globex.generate(adapter, _chat(example.prompt), GREEDY)
                    verdict = _house_style(result.text)
                    correct = verdict == "house style" and example.fields["topic"] in result.text
                    right["support" if adapter else "base-support"] += correct
                    shown = result.text if adapter else _short(result.text)
                    _say(f"    {adapter or '(base)':<10} {shown}  [{verdict}]")

            _step(7, "globex asks for acme's adapter: refused exactly like a missing one")
            for ref in ("acme/invoices", "acme/no-such-adapter"):
                try:
                    await globex.generate(ref, _chat(invoices[0].prompt), EXTRACT)
                    raise RuntimeError("cross-tenant request was served")
                except errors.NotFound as exc:
                    _say(f"    {ref:<22} -> NOT_FOUND: {exc}")

            _step(8, "globex uploads an untrained draft as support@prod, then rolls prod back")
            draft_v2 = await globex_admin.upload_adapter(
                "support", folders["draft"], aliases=("prod", "draft")
            )
            question = questions[0].prompt
            result = await globex.generate("support@prod", _chat(question), GREEDY)
            _say(
                f"    draft {draft_v2.version[:19]}...  {_short(result.text, 60)}  "
                f"[{_house_style(result.text)}]"
            )
            await globex_admin.set_alias("support", "prod", support_v1.version)
            result = await globex.generate("support@prod", _chat(question), GREEDY)
            assert result.adapter is not None
            if result.adapter.version != support_v1.version:
                raise RuntimeError("rollback did not take effect")
            _say(
                f"    v1    {result.adapter.version[:19]}...  {_short(result.text, 60)}  "
                f"[{_house_style(result.text)}]"
            )

            _step(9, "acme revokes 'invoices'; the next request is refused")
            revoked = await acme_admin.revoke_adapter("invoices")
            _say(f"    revoked {len(revoked.revoked_versions)} version(s)")
            try:
                await acme.generate("invoices", _chat(invoices[0].prompt), EXTRACT)
                raise RuntimeError("revoked adapter was served")
            except errors.NotFound as exc:
                _say(f"    invoices -> NOT_FOUND: {exc}")

            _step(
                10,
                "globex ships support v2 as a canary on 20% of prod, with the lora-gateway CLI:\n"
                "    its evaluation, a failing version's promotion refused, a rollback to v1",
            )
            canary = await _canary_step(
                target, keys["globex-admin"], globex_admin, globex, support_v1.version, folders, run
            )

            residency = await globex_admin.get_residency()
            in_engine = sum(1 for e in residency.entries if e.tier is ResidencyTier.ENGINE)
    finally:
        await server.stop(grace=2.0)

    _say("\nsummary")
    _say(
        f"    invoices: {right['invoices']}/{SHOWN} held-out invoices extracted exactly "
        f"(base model: {right['base-invoices']}/{SHOWN})"
    )
    _say(
        f"    support:  {right['support']}/{SHOWN - 1} answers in the house style, on topic "
        f"(base model: {right['base-support']}/{SHOWN - 1})"
    )
    _say("    one base model, two tenants' adapters, through gRPC and the OpenAI-compatible API")
    _say("    cross-tenant access refused; alias rolled back; revoked adapter refused")
    _say(
        f"    canary: v2 scored {canary['v2_score']} and served {canary['on_v2']} of "
        f"{CONVERSATIONS} conversations at {CANARY_WEIGHT:.0%}; the draft scored "
        f"{canary['draft_score']}, its promotion refused; prod rolled back to v1, by hand "
        f"and then by the gateway itself ({canary['automatic_s']:.1f}s after the draft's split)"
    )
    _say(f"    {in_engine} of globex's adapter version(s) resident in the engine at the end")
    _say(f"    demo finished in {time.perf_counter() - started:.0f}s")


def _house_style_set(questions: list[demo_training.Example]) -> str:
    """Step 10's evaluation set: each held-out question must be answered in the house style,
    naming its topic (a regex on the whole answer)."""
    greeting = re.escape(demo_training.SUPPORT_GREETING)
    signoff = re.escape(demo_training.SUPPORT_SIGNOFF)
    cases = [
        {
            "id": f"question-{index}",
            "messages": [{"role": "user", "content": example.prompt}],
            "max_tokens": MAX_TOKENS,
            "check": {"regex": f"^{greeting} .*\\b{example.fields['topic']}\\b.* {signoff}$"},
        }
        for index, example in enumerate(questions, 1)
    ]
    return json.dumps({"cases": cases}, indent=1)


async def _cli(target: str, key: str, *argv: str) -> tuple[int, str]:
    """`lora-gateway ARGV`, in a thread (it blocks; the gateway serves on this loop), printed
    as a shell line and its indented output (stdout and stderr). Returns (exit code, output)."""
    from lora_gateway.cli import main as cli_main

    environ = {"LORA_GATEWAY_TARGET": target, "LORA_GATEWAY_API_KEY": key}

    def run() -> tuple[int, str]:
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            code = cli_main(list(argv), environ)
        return code, captured.getvalue()

    code, output = await asyncio.to_thread(run)
    _say(f"    $ lora-gateway {' '.join(argv)}")
    for line in output.rstrip("\n").splitlines():
        _say(f"      {line}")
    return code, output


async def _split(app: AsyncGatewayClient, versions: dict[str, str]) -> dict[str, int]:
    """How many of `CONVERSATIONS` conversations (one routing key each) support@prod serves on
    each version, by its name in `versions` (name -> sha); 8 at a time (the tenant's cap on
    requests in flight is 16)."""
    names = {sha: name for name, sha in versions.items()}
    gate = asyncio.Semaphore(8)

    async def one(index: int) -> str:
        async with gate:
            result = await app.generate(
                "support@prod",
                _chat("where is my order"),
                GenerateOptions(max_tokens=1),
                routing_key=f"conversation-{index}",
            )
        return names.get(result.adapter.version if result.adapter else "", "?")

    counts = dict.fromkeys(versions, 0)
    for served in await asyncio.gather(*(one(index) for index in range(CONVERSATIONS))):
        counts[served] = counts.get(served, 0) + 1
    return counts


async def _canary_step(
    target: str,
    admin_key: str,
    admin: AsyncGatewayClient,
    app: AsyncGatewayClient,
    v1: str,
    folders: dict[str, Path],
    run: Path,
) -> dict[str, object]:
    """Step 10 (globex's support; prod on v1, alias `draft` on the untrained draft): upload
    v2, evaluate it, put it on 20 % of prod gated on the evaluation, show the split; evaluate
    the draft and show its promotion refused; move prod's weight back to v1 (the manual
    rollback); the automatic rollback (`_automatic_rollback`); `adapter show`. Returns the
    figures of the summary."""
    template = run / "support-v2.jinja"
    template.write_text(devtools.TINY_CHAT_TEMPLATE, encoding="utf-8")
    v2 = await admin.upload_adapter(
        "support",
        folders["support"],
        aliases=("v2",),
        description="v2: its own chat template",
        chat_template=template,
    )
    await admin.set_alias("support", "v1", v1)
    _say(
        f"    v2 {v2.version[:19]}...  the same weights with its own chat_template.jinja (a new "
        "version:\n    the template is part of its content address); aliases v1, v2, draft"
    )
    cases = run / "house-style.json"
    questions = demo_training.held_out("support", EVAL_CASES)
    cases.write_text(_house_style_set(questions), encoding="utf-8")
    _say(
        f"    (the CLI below: LORA_GATEWAY_TARGET={target}, LORA_GATEWAY_API_KEY=globex's "
        "admin key)"
    )
    await _cli(target, admin_key, "adapter", "eval", "upload", "support", str(cases))
    v2_score = await _eval(target, admin_key, admin, "v2")
    weights = (f"v1={1 - CANARY_WEIGHT:g}", f"v2={CANARY_WEIGHT:g}")
    code, _ = await _cli(
        target, admin_key, "adapter", "canary", "support", "prod", *weights, "--require-eval", "1"
    )
    if code != 0:
        raise RuntimeError("the canary was refused")
    split = await _split(app, {"v1": v1, "v2": v2.version})
    _say(
        f"    {CONVERSATIONS} conversations on support@prod: {split['v1']} on v1, {split['v2']} "
        "on v2 (each stays on its version: the routing key picks it)"
    )
    if split["v1"] + split["v2"] != CONVERSATIONS:
        raise RuntimeError(f"support@prod served a version outside the canary: {split}")

    draft_score = await _eval(target, admin_key, admin, "draft")
    code, output = await _cli(
        target, admin_key, "adapter", "alias", "support", "prod", "draft", "--require-eval", "1"
    )
    if code == 0 or "FAILED_PRECONDITION" not in output:
        raise RuntimeError("the failing version's promotion was not refused")

    _say("    rollback: all of prod's weight back on v1 ends the canary")
    code, _ = await _cli(target, admin_key, "adapter", "canary", "support", "prod", "v1=1")
    after = await _split(app, {"v1": v1, "v2": v2.version})
    if code != 0 or after["v1"] != CONVERSATIONS:
        raise RuntimeError(f"the rollback did not take effect: {after}")
    _say(f"    {CONVERSATIONS} conversations on support@prod: all {after['v1']} on v1")
    automatic_s = await _automatic_rollback(target, admin_key, admin, app, v1)
    await _cli(target, admin_key, "adapter", "show", "support")
    return {
        "v2_score": v2_score,
        "on_v2": split["v2"],
        "draft_score": draft_score,
        "automatic_s": automatic_s,
    }


async def _automatic_rollback(
    target: str, admin_key: str, admin: AsyncGatewayClient, app: AsyncGatewayClient, v1: str
) -> float:
    """A rollback policy on prod (an evaluation score below 1 rolls a canary back), then the
    draft on 20 % of prod with no gate: the gateway moves the weight back to v1 by itself at
    its next check (the draft's stored 0/3 already fails the policy). Returns the seconds from
    the split to the rollback."""
    _say("    automatic rollback: a policy on prod, then the draft on 20% of it, ungated")
    policy = ("adapter", "rollback", "policy", "support", "prod", "--min-eval-score", "1")
    code, _ = await _cli(target, admin_key, *policy)
    if code != 0:
        raise RuntimeError("the rollback policy was refused")
    weights = (f"v1={1 - CANARY_WEIGHT:g}", f"draft={CANARY_WEIGHT:g}")
    code, _ = await _cli(target, admin_key, "adapter", "canary", "support", "prod", *weights)
    if code != 0:
        raise RuntimeError("the draft's canary was refused")
    split_at = time.perf_counter()
    deadline = split_at + AUTOMATIC_ROLLBACK_WAIT_S
    while "prod" not in (await admin.get_adapter("support")).rollbacks:
        if time.perf_counter() > deadline:
            raise RuntimeError("the draft's canary was not rolled back by itself")
        await asyncio.sleep(0.2)
    took = time.perf_counter() - split_at
    _say(f"    the gateway rolled prod back by itself {took:.1f}s after the split")
    await _cli(target, admin_key, "adapter", "rollback", "show", "support")
    after = await _split(app, {"v1": v1})
    if after["v1"] != CONVERSATIONS:
        raise RuntimeError(f"the automatic rollback did not take effect: {after}")
    _say(f"    {CONVERSATIONS} conversations on support@prod: all {after['v1']} on v1")
    return took


async def _eval(target: str, admin_key: str, admin: AsyncGatewayClient, alias: str) -> str:
    """`adapter eval run support --version ALIAS`; its score as "passed/total"."""
    code, _ = await _cli(target, admin_key, "adapter", "eval", "run", "support", "--version", alias)
    if code != 0:
        raise RuntimeError(f"the evaluation of {alias} failed to run")
    results = (await admin.get_evaluations("support", alias)).results
    return f"{results[-1].passed}/{results[-1].total}"


async def _openai_step(server: GatewayServer, key: str, example: demo_training.Example) -> None:
    """acme's app through the `openai` package: chat completions with a JSON-schema response."""
    import openai

    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "invoice", "schema": demo_training.INVOICE_SCHEMA},
    }
    base_url = f"http://127.0.0.1:{server.openai_port}/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        _say(f"    invoice    {example.prompt!r}")
        for model in ("invoices", server.base_model_name):
            completion = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": example.prompt}],
                max_tokens=MAX_TOKENS,
                temperature=0,  # OpenAI's default is 1; the SDK calls above are greedy
                response_format=response_format,
                extra_body={"structured_outputs": {"disable_any_whitespace": True}},
            )
            text = completion.choices[0].message.content or ""
            label = model if model == "invoices" else "(base)"
            shown = text if model == "invoices" else _short(text)
            _say(f"    {label:<10} {shown}  [{_extracted(text, example)}]")
            if model == "invoices":
                served = completion.model
                _say(f"    {'':<10} (the response's model names the version: {served[:30]}...)")
        _say(f"    (model {server.base_model_name!r} is the base model, 'invoices' an adapter)")


def main(workdir: Path | None = None, *, retrain: bool = False) -> int:
    """Run the demo in `workdir` (default `DEFAULT_WORKDIR`); `retrain` ignores the cache."""
    logging.basicConfig(level=logging.WARNING)
    # Keep the engine's own start-up chatter out of the story (set before vllm is imported).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    work = DEFAULT_WORKDIR if workdir is None else workdir
    work.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(_run(work, retrain))
    except (errors.GatewayError, RuntimeError) as exc:
        print(f"demo failed: {exc}", flush=True)
        return 1
    return 0
