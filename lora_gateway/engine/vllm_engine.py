"""The vLLM engine, in-process (`AsyncLLM`) with multi-LoRA. The only module that imports vllm.

Isolation guard ("null adapter"). vLLM marks a token that uses no adapter with slot index -1.
Its CPU LoRA kernels (`vllm/lora/ops/torch_ops/lora_ops.py`) select weights with
`stacked[indices]`, and in torch `-1` selects the *last* slot: in a batch that mixes base-model
and adapter requests, base tokens get the delta of whatever adapter sits in slot `max_loras-1`.
(Found by this project's isolation tests; the GPU kernels skip -1.) The guard: base-model requests
are sent with an adapter whose weights are all zero, so index -1 never occurs. It costs one
slot, which we add on top of the configured `max_loras` / `max_cpu_loras`. `null_adapter=auto`
turns it on for the CPU build; `engine/selftest.py` checks isolation before the server serves.

No engine-side pins. `AsyncLLM.pin_lora` keeps an adapter in a GPU slot that the scheduler
does not know is taken: a batch with `max_loras` other adapters then cannot fit, activating the
last one evicts another that the same step needs, and the worker dies with a KeyError (shown by
this project's tests: one pinned adapter, more distinct adapters in flight than free slots). So
the null adapter is added, never pinned, and "pinning" is residency's business (never evicted by
our LRU). Residency also decides every eviction: a request may only name an adapter added through
`add_adapter`, `add_adapter` refuses beyond `max_cpu_loras` (vLLM gets one more slot for the null
adapter, so its own LRU never has to evict), and `remove_adapter` aborts the adapter's in-flight
requests before it unloads the adapter.

Runtime canary (`engine/canary.py`). With `canary_interval_s > 0` the engine also holds a random
canary adapter in a reserved slot, like the null adapter: one more slot on top of the configured
ones, never counted against `max_cpu_loras`. `watch_finished()` tells the canary when a request
on an adapter ended (its probation), and `restart()` replaces the engine core in-process.

Start-up checks, so that a configuration that would kill the engine is refused at start, never at
the first request: before vLLM starts, a quantized base is checked against the kernels of the
CPU build loaded here (`engine/quantization.py`: W4A16 and fp8 have none on an AVX2 CPU) and
refused with `InvalidArgument`; after it starts, one short greedy request (the probe) runs
through every layer before `start` returns, and an engine that dies on it is shut down and
reported as `Unavailable`. `lora-gateway serve` then exits 1 before it ever reports SERVING.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from lora_gateway import devtools, errors
from lora_gateway.config import QUEUE_WAIT_ENV, Settings
from lora_gateway.engine import quantization
from lora_gateway.engine.base import (
    FinishReason,
    GenerateParams,
    LoadedAdapter,
    OutputConstraint,
    Prompt,
    TokenChunk,
    TokenizerInfo,
    TokenLogprob,
    TopLogprob,
    next_lora_id,
)
from lora_gateway.stores import base_model_spec
from lora_gateway.vllm_plugin import WORKER_CHECKS

log = logging.getLogger(__name__)

#: How long `remove_adapter` keeps aborting an adapter's requests before it unloads it anyway.
REMOVE_DRAIN_S = 5.0
#: Seed of the runtime canary adapter (the start-up self-test's canaries use 0, 1, ...).
CANARY_SEED = 7919
#: Standard deviation of its random weights: a q_proj-only delta must change greedy outputs
#: outright, or the canary cannot tell "applied" from "dropped" (at 0.5 it flipped no token of
#: the W8A8 tiny model's canary prompts, and the canary refused to start there).
CANARY_SCALE = 2.0
#: The start-up probe: this prompt, greedy, a prefill and one decode step through every layer.
PROBE_TEXT = "hello world"
PROBE_TOKENS = 2

_FINISH = {
    "length": FinishReason.LENGTH,
    "stop": FinishReason.STOP,
    "abort": FinishReason.ABORT,
    "repetition": FinishReason.STOP,
}


def write_q_proj_adapter(
    model: str, out: Path, *, rank: int, seed: int | None, scale: float = 0.0
) -> Path:
    """The reserved adapters' weights: a LoRA on every layer's q_proj with alpha = rank, zeros
    (seed None: the null adapter) or random N(0, scale) ones (the canaries)."""
    return devtools.write_random_lora(
        model,
        out,
        rank=rank,
        seed=seed,
        modules=("q_proj",),
        scale=scale,
        lora_alpha=float(rank),
        base_model=model,
    )


class VLLMEngine:
    """`Engine` over vLLM's `AsyncLLM`. Build it with `await VLLMEngine.start(settings)`."""

    def __init__(
        self,
        llm: Any,
        settings: Settings,
        null_adapter: LoadedAdapter | None,
        canary_adapter: LoadedAdapter | None = None,
        args: Any = None,
    ) -> None:
        self._llm = llm
        self._settings = settings
        self._args = args
        self.max_loras = settings.max_loras
        #: Resolved by `start` (`Settings.engine_cpu_loras`) when the setting is unset.
        self.max_cpu_loras = settings.engine_cpu_loras(1)
        self.max_model_len = int(llm.model_config.max_model_len)
        self.null_adapter = null_adapter
        #: The runtime canary's adapter, in its own reserved slot (None: canary off).
        self.canary_adapter = canary_adapter
        self._dead: BaseException | None = None
        #: The package's vLLM fixes in place in the worker (`_check_worker_fixes`; empty when
        #: `engine_args` set a `worker_extension_cls` of its own).
        self.worker_fixes: dict[str, bool] = {}
        #: Set while `restart()` replaces the engine core: requests and loads are refused.
        self._restarting = False
        #: Adapters added through add_adapter (the null and canary adapters excepted).
        self._registered: set[int] = set()
        #: Request ids in flight per adapter id.
        self._inflight: dict[int, set[str]] = {}
        #: Called with the adapter id whenever a request on an adapter ends (runtime canary).
        self._finished_listeners: list[Callable[[int], None]] = []
        #: Tokenization has its own thread: asyncio's default executor may be full of blocking
        #: store and disk work (a slow store), and warm requests must not wait behind it. One
        #: thread also keeps the (not thread-safe) fast tokenizer to one caller at a time.
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="engine-tokenize")
        #: Compact-JSON constraints are turned into grammars here (off the event loop, and not
        #: behind tokenization).
        self._grammar_pool = ThreadPoolExecutor(1, thread_name_prefix="engine-grammar")

    # --- life cycle -------------------------------------------------------------------------
    @classmethod
    async def start(cls, settings: Settings) -> VLLMEngine:
        from vllm.platforms import current_platform

        if not settings.model:
            raise errors.InvalidArgument("no base model configured (--model)")
        quant = await asyncio.to_thread(
            quantization.describe, settings.model, settings.quantization
        )
        if quant is not None and current_platform.is_cpu():
            kernels = await asyncio.to_thread(cpu_kernels)
            problem = quantization.cpu_refusal(quant, kernels, settings.dtype)
            if problem is not None:
                raise errors.InvalidArgument(
                    f"the base model's quantization ({quant.label}) cannot run on this CPU "
                    f"build of vLLM: {problem}"
                )
            for warning in quantization.cpu_warnings(quant, kernels):
                log.warning("quantization %s: %s", quant.label, warning)
        if settings.max_cpu_loras is None:
            smallest = 1
            if settings.host_lora_budget_bytes:
                spec = await asyncio.to_thread(base_model_spec, settings)
                smallest = spec.smallest_full_adapter_bytes()
            settings = settings.replace(max_cpu_loras=settings.engine_cpu_loras(smallest))
            log.info("max_cpu_loras derived: %d", settings.max_cpu_loras)
        cpu_loras = settings.engine_cpu_loras(1)  # resolved above: the setting itself
        use_null = settings.null_adapter == "on" or (
            settings.null_adapter == "auto" and current_platform.is_cpu()
        )
        use_canary = settings.canary_interval_s > 0
        extra_slots = int(use_null) + int(use_canary)
        if settings.kv_cache_space_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_space_gib)
        kwargs: dict[str, Any] = {
            "model": settings.model,
            "dtype": settings.dtype,
            "quantization": settings.quantization,
            "enable_lora": True,
            "max_loras": settings.max_loras + extra_slots,
            "max_cpu_loras": cpu_loras + extra_slots,
            "max_lora_rank": settings.max_lora_rank,
            "max_model_len": settings.max_model_len,
            "max_num_seqs": settings.max_num_seqs,
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "tensor_parallel_size": settings.tensor_parallel_size,
            "enforce_eager": settings.enforce_eager,
            "enable_prefix_caching": settings.enable_prefix_caching,
            "max_logprobs": settings.max_logprobs,
            "disable_log_stats": True,
            "worker_extension_cls": WORKER_CHECKS,
        }
        kwargs.update(settings.engine_args)
        what = f"{settings.model} ({quant.label if quant else 'not quantized'})"
        args, llm = await cls._new_llm(kwargs, settings.cpu_queue_wait_us, what)
        try:
            engine = await cls._with_reserved(llm, settings, use_null, use_canary, args)
        except BaseException:
            await asyncio.to_thread(llm.shutdown)
            llm.shutdown = lambda *args, **kwargs: None
            raise
        try:
            await engine._probe(what)
        except BaseException:
            await engine.shutdown()
            raise
        if args.worker_extension_cls == WORKER_CHECKS:
            await engine._check_worker_fixes()
        log.info(
            "engine started",
            extra={
                "model": settings.model,
                "quantization": quant.label if quant else None,
                "null_adapter": use_null,
                "canary": use_canary,
            },
        )
        return engine

    @classmethod
    async def _with_reserved(
        cls, llm: Any, settings: Settings, use_null: bool, use_canary: bool, args: Any
    ) -> VLLMEngine:
        null_adapter = None
        if use_null:
            folder = Path(tempfile.mkdtemp(prefix="lora-gateway-null-"))
            await asyncio.to_thread(write_q_proj_adapter, settings.model, folder, rank=1, seed=None)
            null_adapter = LoadedAdapter(next_lora_id(), "null-adapter", folder)
        canary_adapter = None
        if use_canary:
            folder = Path(tempfile.mkdtemp(prefix="lora-gateway-canary-"))
            await asyncio.to_thread(
                write_q_proj_adapter,
                settings.model,
                folder,
                rank=8,
                seed=CANARY_SEED,
                scale=CANARY_SCALE,
            )
            canary_adapter = LoadedAdapter(next_lora_id(), "runtime-canary", folder)
        engine = cls(llm, settings, null_adapter, canary_adapter, args)
        await engine._add_reserved()
        return engine

    @staticmethod
    async def _new_llm(
        kwargs: dict[str, Any], queue_wait_us: int, what: str = ""
    ) -> tuple[Any, Any]:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        try:
            args = AsyncEngineArgs(**kwargs)
            llm = await asyncio.to_thread(
                _start_with_env, args, queue_wait_us, AsyncLLM.from_engine_args
            )
        except (TypeError, ValueError) as exc:
            raise errors.InvalidArgument(f"engine settings rejected: {exc}") from exc
        except RuntimeError as exc:  # the engine core or a worker died while starting
            raise errors.Unavailable(
                f"the engine failed to start on {what}: {exc} (vLLM's error is in the log)"
            ) from exc
        return args, llm

    async def _check_worker_fixes(self) -> None:
        """Ask each worker which of the package's vLLM fixes are in place in its process
        (`vllm_plugin.WorkerChecks`): a plugin that vLLM did not load there (e.g. a
        `VLLM_PLUGINS` that leaves it out) costs throughput silently otherwise. Kept in
        `worker_fixes`; an expected one missing is logged as a warning."""
        from vllm.platforms import current_platform

        replies = await self._llm.collective_rpc("lora_gateway_fixes", timeout=30)
        names = set().union(*replies) if replies else set()
        fixes = {name: all(bool(reply.get(name)) for reply in replies) for name in sorted(names)}
        self.worker_fixes = fixes
        expected = ["constant_time_lora_lookup"]
        if current_platform.is_cpu() and self._settings.cpu_queue_wait_us:
            expected.append("quiet_cpu_queue_waits")
        missing = [name for name in expected if not fixes.get(name)]
        if missing:
            log.warning(
                "the lora_gateway vLLM plugin's fixes %s are not in place in vLLM's worker "
                "(does VLLM_PLUGINS leave out lora_gateway?): the engine serves correctly, "
                "but slower (docs/benchmarks.md)",
                ", ".join(missing),
            )
        else:
            log.info("vLLM fixes in place in the worker: %s", fixes)

    async def _probe(self, what: str) -> None:
        """One short greedy request through every layer (the null adapter's LoRA path too,
        where it is on) before the engine is handed out: a kernel that kills the worker then
        fails the start, not a tenant's first request."""
        params = GenerateParams(max_tokens=PROBE_TOKENS, temperature=0.0, ignore_eos=True)
        try:
            async for _ in self.generate(
                f"startup-probe-{uuid.uuid4().hex}", Prompt(text=PROBE_TEXT), params, None
            ):
                pass
        except Exception as exc:
            raise errors.Unavailable(
                f"engine start failed: the first forward pass on {what} "
                f"{'killed the engine core' if self._dead is not None else 'failed'}, before "
                "anything was served (vLLM's error is in the log: look for 'Worker failed')"
            ) from exc

    async def _add_reserved(self) -> None:
        for reserved in (self.null_adapter, self.canary_adapter):
            if reserved is not None:
                await self._add(reserved)

    def _is_reserved(self, adapter: LoadedAdapter) -> bool:
        return adapter is self.null_adapter or adapter is self.canary_adapter

    async def restart(self) -> None:
        """Replace the engine core with a fresh one, in-process, with the same settings.

        Every request in flight is aborted (its stream ends with UNAVAILABLE) and every adapter
        is gone; the null and canary adapters are loaded again. Meanwhile requests and loads
        are refused with UNAVAILABLE ("engine restarting"). Whoever tracks loaded adapters
        (residency) must forget them.
        """
        from vllm.v1.engine.async_llm import AsyncLLM

        if self._args is None:
            raise errors.Unavailable("this engine cannot be restarted in-process")
        self._restarting = True
        try:
            old = self._llm
            pending = [rid for ids in self._inflight.values() for rid in ids]
            await self._abort_quietly(pending)
            self._registered.clear()
            self._inflight.clear()
            began = time.perf_counter()
            await asyncio.to_thread(old.shutdown)
            old.shutdown = lambda *args, **kwargs: None
            stopped = time.perf_counter()
            self._llm = await asyncio.to_thread(
                _start_with_env,
                self._args,
                self._settings.cpu_queue_wait_us,
                AsyncLLM.from_engine_args,
            )
            self._dead = None
            await self._add_reserved()
        except BaseException as exc:
            self._dead = exc
            raise
        finally:
            self._restarting = False
        log.warning(
            "engine restarted in-process (old core stopped in %.1fs, new one up in %.1fs)",
            stopped - began,
            time.perf_counter() - stopped,
        )

    async def shutdown(self) -> None:
        await asyncio.to_thread(self._llm.shutdown)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)
        self._dead = errors.EngineDead("engine was shut down")
        # AsyncLLM.__del__ calls shutdown() again; at interpreter exit that second call fails on
        # torn-down module globals and prints a traceback. It has nothing left to do.
        self._llm.shutdown = lambda *args, **kwargs: None

    # --- tokenizer --------------------------------------------------------------------------
    async def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        self._raise_if_dead()
        tokenizer = self._llm.get_tokenizer()
        encode = functools.partial(tokenizer.encode, add_special_tokens=add_special_tokens)
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._tokenize_pool, encode, text)
        return [int(i) for i in ids]

    def tokenizer_info(self) -> TokenizerInfo:
        tokenizer = self._llm.get_tokenizer()
        template = getattr(tokenizer, "chat_template", None)
        special = getattr(tokenizer, "special_tokens_map", None) or {}
        return TokenizerInfo(
            chat_template=template if isinstance(template, str) else None,
            special_tokens={k: v for k, v in special.items() if isinstance(v, str)},
        )

    # --- generation -------------------------------------------------------------------------
    async def _token_ids(self, prompt: Prompt) -> list[int]:
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        assert prompt.text is not None
        return await self.tokenize(prompt.text)

    async def _structured(self, constraint: OutputConstraint | None) -> Any:
        """vLLM's structured-output parameters. Compact JSON (`disable_any_whitespace`) is
        compiled to its grammar here, with xgrammar: vLLM 0.32's xgrammar backend reads that
        option from the engine's configuration only, never from the request."""
        from vllm.sampling_params import StructuredOutputsParams

        if constraint is None:
            return None
        if constraint.json_schema is not None or constraint.json_object:
            schema = constraint.json_schema or '{"type": "object"}'
            if constraint.disable_any_whitespace:
                loop = asyncio.get_running_loop()
                grammar = await loop.run_in_executor(
                    self._grammar_pool, compact_json_grammar, schema
                )
                return StructuredOutputsParams(grammar=grammar)
            if constraint.json_object:
                return StructuredOutputsParams(json_object=True)
            return StructuredOutputsParams(json=schema)
        if constraint.regex is not None:
            return StructuredOutputsParams(regex=constraint.regex)
        if constraint.choice is not None:
            return StructuredOutputsParams(choice=list(constraint.choice))
        return StructuredOutputsParams(grammar=constraint.grammar)

    def _sampling_params(self, params: GenerateParams, structured: Any = None) -> Any:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        try:
            return SamplingParams(
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1,
                seed=params.seed,
                stop=list(params.stop) or None,
                stop_token_ids=list(params.stop_token_ids) or None,
                ignore_eos=params.ignore_eos,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                repetition_penalty=params.repetition_penalty,
                min_tokens=params.min_tokens,
                structured_outputs=structured,
                logprobs=params.logprobs,
                prompt_logprobs=params.prompt_logprobs,
                output_kind=RequestOutputKind.DELTA,
            )
        except (VLLMValidationError, ValueError) as exc:
            raise errors.InvalidArgument(f"sampling parameters rejected: {exc}") from None

    async def generate(
        self,
        request_id: str,
        prompt: Prompt,
        params: GenerateParams,
        adapter: LoadedAdapter | None,
    ) -> AsyncIterator[TokenChunk]:
        from vllm.exceptions import VLLMValidationError
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        self._raise_if_dead()
        target = adapter or self.null_adapter
        lora = (
            LoRARequest(target.lora_name, target.lora_int_id, str(target.path))
            if target is not None
            else None
        )
        ids = await self._token_ids(prompt)
        try:
            structured = await self._structured(params.structured)
        except (ValueError, RuntimeError) as exc:  # xgrammar's refusal of the schema
            raise errors.InvalidArgument(f"json_schema: {_first_line(exc)}") from None
        sampling = self._sampling_params(params, structured)
        finished = False
        completion = 0
        # Checked after the last await before submission, and the request joins the adapter's
        # in-flight set in the same step: `remove_adapter` either sees it (and aborts it) or it
        # sees the adapter gone. An adapter unknown to the engine must never reach vLLM: its
        # worker would try to load it from a path that may be deleted, and die.
        self._raise_if_dead()  # also when a restart began while the prompt was tokenized
        llm = self._llm
        if (
            adapter is not None
            and adapter.lora_int_id not in self._registered
            and not self._is_reserved(adapter)
        ):
            raise errors.Aborted("the adapter was removed from the engine")
        inflight = self._inflight.setdefault(target.lora_int_id, set()) if target else set()
        inflight.add(request_id)
        inputs: dict[str, Any] = {"prompt_token_ids": ids}
        if prompt.cache_salt:
            inputs["cache_salt"] = prompt.cache_salt  # the first block's hash includes it
        try:
            stream = llm.generate(inputs, sampling, request_id, lora_request=lora)
            first = True
            async for output in stream:
                out = output.outputs[0]
                completion += len(out.token_ids)
                finished = output.finished
                if finished and out.finish_reason == "error":
                    if params.structured is not None:
                        raise errors.InvalidArgument(
                            f"the engine could not compile the {params.structured.kind} "
                            "constraint (xgrammar's error is in the server log)"
                        )
                    raise errors.Unavailable("engine failed the request")
                reason = _FINISH.get(out.finish_reason) if finished else None
                chunk = TokenChunk(
                    token_ids=list(out.token_ids),
                    text=out.text,
                    finish_reason=reason or (FinishReason.STOP if finished else None),
                    prompt_tokens=len(ids),
                    completion_tokens=completion,
                )
                if params.logprobs is not None:
                    chunk.logprobs = _logprobs(out.token_ids, out.logprobs, params.logprobs)
                if first and params.prompt_logprobs is not None:
                    chunk.prompt_logprobs = await self._prompt_logprobs(
                        ids, output.prompt_logprobs, params.prompt_logprobs
                    )
                first = False
                yield chunk
        except EngineDeadError as exc:
            if llm is not self._llm:  # the core was replaced by restart() meanwhile
                raise errors.Unavailable("engine restarting: request aborted") from exc
            self._dead = exc
            raise errors.EngineDead("engine is not running") from exc
        except VLLMValidationError as exc:
            raise errors.InvalidArgument(str(exc)) from None
        except ValueError as exc:
            # vLLM raises ValueError for requests it cannot take (prompt too long, ...).
            raise errors.InvalidArgument(str(exc)) from None
        except EngineGenerateError as exc:
            raise errors.Unavailable("engine failed the request") from exc
        finally:
            inflight.discard(request_id)
            if adapter is not None and llm is self._llm:
                self._finished(adapter.lora_int_id)
            if not finished:
                # Cancelled, or the consumer stopped early: free the engine's slot at once.
                await asyncio.shield(self._abort_quietly([request_id]))

    async def _prompt_logprobs(
        self, ids: list[int], positions: Sequence[Any] | None, top: int
    ) -> list[TokenLogprob]:
        """vLLM gives None for the first prompt token (nothing precedes it): its text is decoded
        here, its logprob stays None."""
        tokenizer = self._llm.get_tokenizer()
        loop = asyncio.get_running_loop()
        head = await loop.run_in_executor(self._tokenize_pool, tokenizer.decode, ids[:1])
        entries = [TokenLogprob(ids[0], None, str(head))]
        entries += _logprobs(ids[1:], list(positions or [])[1:], top)
        return entries

    async def _abort_quietly(self, request_ids: Sequence[str]) -> None:
        try:
            await self._llm.abort(list(request_ids))
        except Exception:  # the engine may be gone; nothing to abort then
            log.debug("abort failed", exc_info=True)

    async def abort(self, request_ids: Sequence[str]) -> None:
        await self._abort_quietly(request_ids)

    # --- adapters ---------------------------------------------------------------------------
    async def add_adapter(self, adapter: LoadedAdapter) -> None:
        self._raise_if_dead()
        await self._add(adapter)

    async def _add(self, adapter: LoadedAdapter) -> None:
        from vllm.lora.request import LoRARequest

        reserved = self._is_reserved(adapter)
        if adapter.lora_int_id in self._registered:
            return
        if not reserved and len(self._registered) >= self.max_cpu_loras:
            raise errors.ResourceExhausted(
                f"engine adapter capacity is full (max_cpu_loras={self.max_cpu_loras})"
            )
        request = LoRARequest(adapter.lora_name, adapter.lora_int_id, str(adapter.path))
        llm = self._llm
        try:
            ok = await llm.add_lora(request)
        except Exception as exc:
            # Errors from the engine core come back as plain Exceptions.
            self._note_if_dead()
            if self._dead is not None:
                raise errors.EngineDead("engine died while loading an adapter") from exc
            raise errors.FailedPrecondition("the engine refused the adapter") from exc
        if ok is False:
            raise errors.FailedPrecondition("the engine refused the adapter")
        if llm is not self._llm:  # restart() replaced the core while this was loading
            raise errors.Unavailable("engine restarting; try again")
        if not reserved:
            self._registered.add(adapter.lora_int_id)

    async def remove_adapter(self, lora_int_id: int) -> int:
        """Stop new requests on the adapter, abort its in-flight ones until none is left, then
        unload it. Returns how many requests were aborted.

        Aborting once is not enough: a request that joined the in-flight set may still be on its
        way into the engine core, where an abort that arrived first is ignored. So the aborts are
        repeated until every request has ended (bounded by `REMOVE_DRAIN_S`); only then is the
        adapter unloaded, so no request of it can be scheduled after `remove_lora`.
        """
        self._raise_if_dead()
        self._registered.discard(lora_int_id)
        doomed: set[str] = set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REMOVE_DRAIN_S
        while self._inflight.get(lora_int_id):
            pending = list(self._inflight[lora_int_id])
            doomed.update(pending)
            await self._abort_quietly(pending)
            if loop.time() > deadline:
                log.warning("%d request(s) did not end after abort; unloading", len(pending))
                break
            await asyncio.sleep(0.01)
        self._inflight.pop(lora_int_id, None)
        try:
            await self._llm.remove_lora(lora_int_id)
        except Exception as exc:
            self._note_if_dead()
            raise errors.Unavailable("the engine failed to remove an adapter") from exc
        return len(doomed)

    async def list_adapters(self) -> set[int]:
        self._raise_if_dead()
        ids = {int(i) for i in await self._llm.list_loras()}
        for reserved in (self.null_adapter, self.canary_adapter):
            if reserved is not None:
                ids.discard(reserved.lora_int_id)
        return ids

    def watch_finished(self, listener: Callable[[int], None]) -> Callable[[], None]:
        """Call `listener(lora_int_id)` whenever a request on an adapter ends (not for base-model
        requests); returns the function that stops it."""
        self._finished_listeners.append(listener)
        return lambda: self._finished_listeners.remove(listener)

    def _finished(self, lora_int_id: int) -> None:
        for listener in list(self._finished_listeners):
            try:
                listener(lora_int_id)
            except Exception:
                log.exception("request-finished listener failed")

    # --- health -----------------------------------------------------------------------------
    def _note_if_dead(self) -> None:
        if getattr(self._llm, "errored", False) and self._dead is None:
            self._dead = self._llm.dead_error

    def _raise_if_dead(self) -> None:
        if self._restarting:
            raise errors.Unavailable("engine restarting; try again")
        self._note_if_dead()
        if self._dead is not None:
            raise errors.EngineDead("engine is not running")

    async def check_health(self) -> None:
        self._raise_if_dead()
        try:
            await self._llm.check_health()
        except Exception as exc:
            self._dead = exc
            raise errors.EngineDead("engine is not running") from exc


def _logprobs(
    tokens: Sequence[int], positions: Sequence[Any] | None, top: int
) -> list[TokenLogprob]:
    """vLLM's per-position {token id: Logprob(logprob, rank, decoded_token)} as TokenLogprobs:
    the token at each position, and the `top` best (ranks 1..top) in rank order."""
    entries: list[TokenLogprob] = []
    for token, candidates in zip(tokens, positions or [], strict=False):
        if not candidates:
            continue
        chosen = candidates.get(token)
        best = sorted(
            (
                item
                for item in candidates.items()
                if item[1].rank is not None and item[1].rank <= top
            ),
            key=lambda item: item[1].rank,
        )
        entries.append(
            TokenLogprob(
                token_id=int(token),
                logprob=float(chosen.logprob) if chosen is not None else None,
                token=(chosen.decoded_token or "") if chosen is not None else "",
                top=tuple(
                    TopLogprob(int(tid), float(lp.logprob), lp.decoded_token or "")
                    for tid, lp in best
                ),
            )
        )
    return entries


def compact_json_grammar(schema: str) -> str:
    """The EBNF grammar of `schema` with no whitespace between JSON tokens (xgrammar, vLLM's
    structured-output backend, writes it; vLLM then compiles it like any grammar)."""
    import xgrammar

    grammar = xgrammar.Grammar.from_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    return str(grammar)


def _first_line(exc: BaseException) -> str:
    """xgrammar's message without its time stamp and source location."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", lines[0])[:300]


def cpu_kernels() -> quantization.CpuKernels:
    """What the vLLM CPU kernel library that this machine loads provides (the engine's worker
    loads the same one): the ops the quantized linear kernels call."""
    import importlib.metadata

    import torch
    import vllm.envs as envs
    from vllm.platforms import CpuArchEnum, current_platform

    from lora_gateway.vllm_plugin import allow_lora_on_prepacked_int8

    current_platform.import_kernels()

    def op(name: str) -> Any:
        try:
            return getattr(torch.ops._C, name)
        except (AttributeError, RuntimeError):
            return None

    library = "vllm._C"
    if current_platform.get_cpu_architecture() == CpuArchEnum.X86:
        if not torch.cpu._is_avx512_supported():
            library = "vllm._C_AVX2"
        elif not torch.cpu._is_avx512_bf16_supported():
            library = "vllm._C_AVX512"
    fp8 = op("static_scaled_fp8_quant")
    plugins = [
        entry.name
        for entry in importlib.metadata.entry_points(group="vllm.general_plugins")
        if entry.value.startswith("lora_gateway.vllm_plugin:")
    ]
    allowed = envs.VLLM_PLUGINS
    plugin_loads = any(allowed is None or name in allowed for name in plugins)
    flags = quantization.cpu_flags()
    return quantization.CpuKernels(
        library=library,
        wna16=op("cpu_gemm_wna16") is not None,
        fp8=fp8 is not None and bool(fp8.default._schema.arguments),
        dyn_quant_4bit=hasattr(torch.ops.aten, "_dyn_quant_matmul_4bit"),
        int8_lora_fix=plugin_loads and allow_lora_on_prepacked_int8(),
        int8_dot=None if flags is None else bool(flags & quantization.INT8_DOT_FLAGS),
    )


_T = TypeVar("_T")

#: Held while an engine starts with its environment (`_start_with_env`): the environment is
#: the process's, so two engines starting at once in one process would mix their settings.
_START_LOCK = threading.Lock()


def _start_with_env(args: Any, queue_wait_us: int, start: Callable[[Any], _T]) -> _T:
    """`start(args)` with `_executor_env` set, one engine start at a time in this process
    (blocking: run it in a thread)."""
    with _START_LOCK, _executor_env(args, queue_wait_us):
        return start(args)


@contextlib.contextmanager
def _executor_env(args: Any, queue_wait_us: int) -> Iterator[None]:
    """The environment vLLM's processes start with, set for the start only (the engine-core
    process, and the worker it starts, inherit it) and restored afterwards, so that later engines
    in this process get their own settings:

    - `LORA_GATEWAY_CPU_QUEUE_WAIT_US` (`cpu_queue_wait_us`), which the package's vLLM plugin
      reads in those processes (`vllm_plugin.quiet_cpu_queue_waits`);
    - `engine_args: {distributed_executor_backend: uni}` keeps vLLM's Worker inside its
      EngineCore process. vLLM's CPU platform turns "uni" back into "mp" unless
      `VLLM_ENABLE_V1_MULTIPROCESSING` is 0; AsyncLLM runs EngineCore in its own process
      whatever that flag says."""
    flags = {QUEUE_WAIT_ENV: str(queue_wait_us)}
    if getattr(args, "distributed_executor_backend", None) == "uni":
        flags["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    before = {flag: os.environ.get(flag) for flag in flags}
    os.environ.update(flags)
    try:
        yield
    finally:
        for flag, value in before.items():
            if value is None:
                os.environ.pop(flag, None)
            else:
                os.environ[flag] = value
