"""Generators for trying the gateway with no download: a tiny Llama, PEFT adapters, a reference.

Everything here is deterministic (seeded) and offline. The heavy libraries (torch, transformers,
tokenizers, peft) are imported inside the functions so that the server does not pay for them.

- `make_model(out)`          a random Llama with a small BPE tokenizer, saved with save_pretrained.
- `make_adapter(model, out)` a PEFT LoRA adapter (rank, targets, rsLoRA, AdaLoRA selectable).
- `ReferenceGenerator`       the PEFT-merged model run greedily in transformers, float32: the
                             token-for-token reference that the engine's outputs must equal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The tiny model. head_dim must be 64: vLLM's CPU attention kernel rejects smaller ones.
TINY_HIDDEN = 128
TINY_HEADS = 2
TINY_KV_HEADS = 1
TINY_LAYERS = 2
TINY_INTERMEDIATE = 256
TINY_VOCAB = 384
TINY_MAX_POSITIONS = 512
TINY_MODEL_NAME = "lora-gateway/tiny-llama"

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


def make_model(out: Path | str, seed: int = 0) -> Path:
    """Write a tiny random Llama (float32) and its BPE tokenizer to `out`; return the path."""
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
    tokenizer.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        intermediate_size=TINY_INTERMEDIATE,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_KV_HEADS,
        head_dim=TINY_HIDDEN // TINY_HEADS,
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
