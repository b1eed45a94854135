"""Generators for trying the gateway with no download: a tiny Llama, PEFT adapters, a reference.

Everything here is deterministic (seeded) and offline. The heavy libraries (torch, transformers,
tokenizers, peft) are imported inside the functions so that the server does not pay for them.

- `make_model(out)`          a random Llama with a small BPE tokenizer and a chat template
                             (`TINY_CHAT_TEMPLATE`), saved with save_pretrained.
- `make_quantized_model(out, scheme)`  the same model quantized with compressed-tensors (W8A8,
                             W4A8, W4A16), in the format llm-compressor writes and vLLM reads.
- `dequantize_model(q, out)` a quantized checkpoint's weights dequantized back to a float32 model
                             (numpy, independent of compressed-tensors): the reference's base.
- `make_adapter(model, out)` a PEFT LoRA adapter (rank, targets, rsLoRA, AdaLoRA selectable).
- `write_random_lora(model, out)`  a LoRA adapter folder with random (or zero) weights, written
                             with numpy (no torch, no PEFT: fast enough for a thousand): the
                             engine's null and canary adapters, the self-test's, the benchmarks'.
- `ReferenceGenerator`       the PEFT-merged model run greedily in transformers, float32: the
                             token-for-token reference that the engine's outputs must equal,
                             and the log-softmax its logprobs are held to (`log_softmax`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapter_store.model import MODULE_PARENTS

# The tiny model. head_dim must be 64: vLLM's CPU attention kernel rejects smaller ones.
TINY_HIDDEN = 128
TINY_HEADS = 2
TINY_KV_HEADS = 1
TINY_LAYERS = 2
TINY_INTERMEDIATE = 256
TINY_VOCAB = 384
TINY_MAX_POSITIONS = 512
TINY_MODEL_NAME = "lora-gateway/tiny-llama"
#: The tiny model's chat template (saved with its tokenizer as `chat_template`): each message is
#: `<s>{role}\n{content}</s>\n`, the generation prompt `<s>assistant\n`. Roles other than
#: system, user and assistant are refused by the template itself (`raise_exception`), as real
#: templates do. It adds no token to the vocabulary, so the model's weights are unchanged.
TINY_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unsupported role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- bos_token + message['role'] + '\\n' + message['content'] + eos_token + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- bos_token + 'assistant\\n' -}}{%- endif -%}"
)

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES = ATTENTION_MODULES + MLP_MODULES

_CORPUS_TEXT = """
the a an of to in and or but is are was were be been have has had do does did will would can
could should may might must shall model adapter tenant gateway request response token prompt
server client store cache engine batch rank alpha weight layer query key value support sales
legal finance billing search summary answer question hello world beta gamma delta one two three
four five six seven eight nine ten red green blue cat dog fish quick brown fox jumps over lazy
river mountain city ocean data code test build run
"""
_CORPUS_WORDS = _CORPUS_TEXT.split()

#: Prompts used by tests, the demo and the start-up self-test.
SAMPLE_PROMPTS = (
    "hello world the quick brown fox",
    "the tenant sends a request to the gateway",
    "one two three four five",
    "support answer for the billing question",
    "red green blue cat dog fish",
    "the model and the adapter share a layer",
)


def _corpus(seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(_CORPUS_WORDS) for _ in range(rng.randint(4, 14))) for _ in range(2000)
    ]
    lines.extend(SAMPLE_PROMPTS)
    return lines


def make_model(
    out: Path | str,
    seed: int = 0,
    *,
    hidden: int = TINY_HIDDEN,
    layers: int = TINY_LAYERS,
    intermediate: int = TINY_INTERMEDIATE,
    heads: int = TINY_HEADS,
    kv_heads: int = TINY_KV_HEADS,
) -> Path:
    """Write a tiny random Llama (float32) and its BPE tokenizer to `out`; return the path.

    The sizes default to the tiny model's; a benchmark may ask for a wider or deeper one (keep
    `hidden // heads` at 64, the head size vLLM's CPU attention accepts)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.model_max_length = TINY_MAX_POSITIONS
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=TINY_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config._name_or_path = TINY_MODEL_NAME
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger random weights than the default init so that outputs vary with the prompt and
    # a LoRA delta visibly changes them.
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    return out


#: Quantization schemes `make_quantized_model` writes: compressed-tensors presets, named as
#: llm-compressor names them. W8A8: int8 weights (one scale per output channel) and dynamic
#: per-token int8 activations ("int-quantized" format). W4A8: int4 weights in groups of 128 and
#: dynamic per-token int8 activations ("int-quantized": int4 values stored one per int8). W4A16:
#: int4 weights in groups of 128, activations unquantized ("pack-quantized": eight int4 values
#: per int32, GPTQ-style symmetric). lm_head and the embeddings stay float32 in all three.
QUANT_SCHEMES = ("W8A8", "W4A8", "W4A16")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def make_quantized_model(
    out: Path | str, scheme: str = "W8A8", *, source: Path | str | None = None, seed: int = 0
) -> Path:
    """Write `source` (default: a fresh `make_model(seed=seed)`) quantized to `out`; return it.

    Round-to-nearest with min-max scales taken from the weights themselves (no calibration data:
    the weight observer llm-compressor calls "memoryless_minmax"), then compressed and saved
    with compressed-tensors' `ModelCompressor`, which writes the `quantization_config` of
    config.json. The result loads in vLLM with `quantization` unset (it reads the config)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        QuantizationStrategy,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import LlamaForCausalLM

    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(QUANT_SCHEMES)}, not {scheme!r}")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="tiny-llama-float-") as scratch:
        base = Path(source) if source is not None else make_model(Path(scratch), seed=seed)
        model = LlamaForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
        config = QuantizationConfig(
            config_groups={"group_0": preset_name_to_scheme(scheme, ["Linear"])},
            ignore=["lm_head"],
        )
        apply_quantization_config(model, config)
        with torch.no_grad():
            module: Any
            for module in model.modules():
                args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
                if args is None:
                    continue
                weight = module.weight
                if args.strategy == QuantizationStrategy.CHANNEL:
                    low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
                elif args.strategy == QuantizationStrategy.GROUP:
                    grouped = weight.reshape(weight.shape[0], -1, args.group_size)
                    low, high = grouped.amin(2), grouped.amax(2)
                else:  # the presets above use only these two
                    raise ValueError(f"unsupported weight strategy {args.strategy}")
                scale, zero_point = calculate_qparams(low, high, args)
                module.weight_scale.copy_(scale.to(module.weight_scale.dtype))
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.copy_(zero_point.to(module.weight_zero_point.dtype))
                module.quantization_status = QuantizationStatus.FROZEN
        compressor = ModelCompressor.from_pretrained_model(model)
        compressor.compress_model(model)
        model.save_pretrained(str(out))
        compressor.update_config(str(out))
        for name in _TOKENIZER_FILES:
            shutil.copy(base / name, out / name)
    return out


def dequantize_model(quantized: Path | str, out: Path | str) -> Path:
    """Write the float32 model whose weights are `quantized`'s dequantized ones; return `out`.

    Reads the compressed-tensors formats `make_quantized_model` writes ("int-quantized": int8
    `weight` times `weight_scale`; "pack-quantized": int4 values packed eight per int32 in
    `weight_packed`, stored +8, times `weight_scale`), symmetric, one scale per output channel or
    per group along the input. Written from the format, with numpy, so that it does not share
    code with the writer (compressed-tensors) nor with the reader under test (vLLM)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    quantized, out = Path(quantized), Path(out)
    config = json.loads((quantized / "config.json").read_text(encoding="utf-8"))
    qconfig = config.pop("quantization_config", None)
    if not qconfig or qconfig.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{quantized} is not a compressed-tensors checkpoint")
    for group in qconfig["config_groups"].values():
        weights = group["weights"]
        if group.get("format") not in ("int-quantized", "pack-quantized"):
            raise ValueError(f"unsupported format {group.get('format')!r}")
        if not weights["symmetric"] or weights.get("actorder"):
            raise ValueError("only symmetric weights without activation ordering are supported")
    tensors = load_file(str(quantized / "model.safetensors"))
    dense: dict[str, Any] = {}
    for key, value in tensors.items():
        base, _, kind = key.rpartition(".")
        if kind in ("weight_packed", "weight_shape", "weight_zero_point") or (
            kind == "weight" and f"{base}.weight_scale" in tensors
        ):
            continue
        if kind != "weight_scale":
            dense[key] = value
            continue
        scale = value.astype(np.float32)
        if f"{base}.weight" in tensors:
            values = tensors[f"{base}.weight"].astype(np.float32)
        else:
            packed = tensors[f"{base}.weight_packed"].astype(np.int64) & 0xFFFFFFFF
            rows, cols = (int(n) for n in tensors[f"{base}.weight_shape"])
            nibbles = np.stack([(packed >> (4 * i)) & 0xF for i in range(8)], axis=-1)
            values = nibbles.reshape(rows, -1)[:, :cols].astype(np.float32) - 8.0
        group = values.shape[1] // scale.shape[1]
        dense[f"{base}.weight"] = values * np.repeat(scale, group, axis=1)
    out.mkdir(parents=True, exist_ok=True)
    save_file(dense, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in _TOKENIZER_FILES:
        if (quantized / name).exists():
            shutil.copy(quantized / name, out / name)
    return out


@dataclass(frozen=True)
class AdapterSpec:
    """What `make_adapter` builds."""

    seed: int = 1
    rank: int = 8
    alpha: int = 16
    target_modules: Sequence[str] = ATTENTION_MODULES
    use_rslora: bool = False
    adalora: bool = False
    #: Standard deviation of the random A and B matrices (PEFT inits B to zero; we do not).
    scale: float = 0.08


def make_adapter(model_dir: Path | str, out: Path | str, spec: AdapterSpec | None = None) -> Path:
    """Write a PEFT adapter with random (non-zero) weights for the model in `model_dir`."""
    import torch
    from peft import AdaLoraConfig, LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    spec = spec or AdapterSpec()
    out = Path(out)
    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    peft_config: Any
    if spec.adalora:
        peft_config = AdaLoraConfig(
            init_r=spec.rank,
            target_r=spec.rank,
            lora_alpha=spec.alpha,
            target_modules=list(spec.target_modules),
            total_step=10,
            task_type="CAUSAL_LM",
        )
    else:
        peft_config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            target_modules=list(spec.target_modules),
            use_rslora=spec.use_rslora,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
    peft_model = get_peft_model(model, peft_config)
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * spec.scale)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    # PEFT records the local path; record the model's own name so the adapter is portable.
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = TINY_MODEL_NAME
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def model_module_shapes(model_dir: Path | str) -> tuple[int, dict[str, tuple[int, int]]]:
    """The layer count and each LoRA target's (fan_in, fan_out) of a local HF model directory
    (its `config.json`; a multimodal model's `text_config`)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads", heads))
    head_dim = int(config.get("head_dim") or hidden // heads)
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
    }
    if "intermediate_size" in config:
        intermediate = int(config["intermediate_size"])
        shapes |= {
            "gate_proj": (hidden, intermediate),
            "up_proj": (hidden, intermediate),
            "down_proj": (intermediate, hidden),
        }
    return int(config["num_hidden_layers"]), shapes


def random_lora_tensors(
    model_dir: Path | str,
    *,
    rank: int = 8,
    seed: int | None = 1,
    modules: Sequence[str] = ATTENTION_MODULES,
    scale: float = 0.02,
) -> dict[str, Any]:
    """float32 LoRA A/B tensors (PEFT names) for `modules` of every layer: N(0, `scale`) drawn
    from `seed` (layer by layer, module by module, A then B), or zeros where `seed` is None."""
    import numpy as np

    layers, shapes = model_module_shapes(model_dir)
    rng = np.random.default_rng(seed)
    tensors: dict[str, Any] = {}
    for layer in range(layers):
        for module in modules:
            fan_in, fan_out = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{MODULE_PARENTS[module]}.{module}"
            if seed is None:
                a = np.zeros((rank, fan_in), np.float32)
                b = np.zeros((fan_out, rank), np.float32)
            else:
                a = rng.normal(0.0, scale, (rank, fan_in)).astype(np.float32)
                b = rng.normal(0.0, scale, (fan_out, rank)).astype(np.float32)
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
    return tensors


def lora_config(
    rank: int,
    modules: Sequence[str],
    *,
    lora_alpha: float | None = None,
    base_model: str = TINY_MODEL_NAME,
) -> dict[str, Any]:
    """A PEFT LoRA adapter_config.json for `rank` and `modules` (alpha 2·rank unless given)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": float(2 * rank if lora_alpha is None else lora_alpha),
        "lora_dropout": 0.0,
        "target_modules": sorted(modules),
        "bias": "none",
        "base_model_name_or_path": base_model,
    }


def save_lora(out: Path | str, tensors: dict[str, Any], config: dict[str, Any]) -> Path:
    """Write `tensors` and `config` as an adapter folder (safetensors + adapter_config.json)."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


def write_random_lora(
    model_dir: Path | str,
    out: Path | str,
    *,
    rank: int = 8,
    seed: int | None = 1,
    modules: Sequence[str] = ATTENTION_MODULES,
    scale: float = 0.02,
    lora_alpha: float | None = None,
    base_model: str = TINY_MODEL_NAME,
) -> Path:
    """A LoRA adapter folder for the model in `model_dir` with random N(0, `scale`) weights
    (zeros where `seed` is None), written with numpy; returns `out`. The one random-LoRA
    writer: the engine's null and canary adapters, the start-up self-test, tests, benchmarks."""
    tensors = random_lora_tensors(model_dir, rank=rank, seed=seed, modules=modules, scale=scale)
    config = lora_config(rank, modules, lora_alpha=lora_alpha, base_model=base_model)
    return save_lora(out, tensors, config)


class ReferenceGenerator:
    """Greedy generation with the PEFT-merged model in transformers (float32, CPU)."""

    def __init__(self, model_dir: Path | str) -> None:
        from transformers import AutoTokenizer

        self._model_dir = str(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
        self._models: dict[str, Any] = {}

    def _model(self, adapter_dir: Path | str | None) -> Any:
        import torch
        from transformers import LlamaForCausalLM

        key = str(adapter_dir or "")
        if key not in self._models:
            model = LlamaForCausalLM.from_pretrained(self._model_dir, torch_dtype=torch.float32)
            if adapter_dir is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
            model.eval()
            self._models[key] = model
        return self._models[key]

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def generate(
        self, prompt: str | Sequence[int], adapter_dir: Path | str | None, max_tokens: int
    ) -> list[int]:
        """Greedy token ids after `prompt`, at most `max_tokens`, stopping after EOS."""
        import torch

        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        model = self._model(adapter_dir)
        with torch.no_grad():
            output = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        return [int(t) for t in output[0][len(ids) :]]

    def log_softmax(
        self, prompt: str | Sequence[int], adapter_dir: Path | str | None, tokens: Sequence[int]
    ) -> Any:
        """Teacher-forced along `tokens` after `prompt`: the float32 log-softmax of the logits
        at every position of prompt + tokens but the last, as a numpy array [positions, vocab].
        Row i is the distribution of token i + 1: rows len(prompt) - 1 onwards are those of
        the generated tokens, rows 0 .. len(prompt) - 2 those of the prompt's own tokens."""
        import torch

        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        model = self._model(adapter_dir)
        with torch.no_grad():
            logits = model(torch.tensor([ids + list(tokens)])).logits[0, :-1]
        return torch.log_softmax(logits.float(), dim=-1).numpy()

    def logprob_gaps(
        self, prompt: str | Sequence[int], adapter_dir: Path | str | None, tokens: Sequence[int]
    ) -> list[float]:
        """Teacher-forced along `tokens` (another engine's output after `prompt`): at each
        position, the reference's best log-probability minus that of the token chosen there.
        0 where the reference agrees; small where it was a near tie; large where the output
        is not what this model would say."""
        import torch

        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            return []
        model = self._model(adapter_dir)
        with torch.no_grad():
            logits = model(torch.tensor([ids + list(tokens)])).logits[0, len(ids) - 1 : -1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        chosen = logprobs[torch.arange(len(tokens)), torch.tensor(list(tokens))]
        return [float(g) for g in logprobs.max(dim=-1).values - chosen]
