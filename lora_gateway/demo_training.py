"""The demo's base model and its two trained adapters: what a LoRA adapter is for, in seconds.

`make demo` needs adapters that visibly do a job, on a model small enough to train on two CPU
cores while the reader waits. Everything here is synthetic, seeded and offline:

- `make_demo_model(out)`  a random Llama of the tiny model's shape (`devtools.TINY_*`) with a
  BPE tokenizer trained on the demo's own texts (digits one token each, so numbers are spelled
  digit by digit) and the tiny chat template. Standard initialisation, but a wider `lm_head`
  (std `HEAD_STD`): with the default 0.02 a frozen random head caps what any hidden state can
  make a token's probability (about 3 %), and a LoRA adapter on the layers below could not
  make its answers confident. The tests' tiny model (`devtools.make_model`) is not this one.
- Two tasks, each a generator of (prompt, answer) pairs from a seed:
  `invoice_example` (a one-line invoice -> compact JSON of `INVOICE_SCHEMA`: the number and the
  total are copied digit by digit from the text, the vendor is one of `VENDORS`, the currency
  one of `CURRENCIES`) and `support_example` (a customer's question -> an answer in the house
  style: `SUPPORT_GREETING` ... `SUPPORT_SIGNOFF`, naming the topic of the question, one of
  `TOPICS`). About one prompt in five (by its sha256, `held_out_prompt`) is held out: training
  never sees those, the demo and the tests show only those (`held_out`). So each invoice shown
  is a text the adapter never saw, its number and total drawn afresh (the adapter must copy
  them, not recall them: a 4-digit number may recur in some other training invoice), and
  each question pairs a phrasing with a topic it was never trained on; the vendors and topics
  themselves are from the training lists (a model this small cannot spell a name it never saw).
- `train_adapter(model, recipe, out)`  PEFT LoRA on every linear module of the frozen base,
  float32, AdamW, loss on the answer tokens only (and the end-of-sequence token after them).
- `cached_model` / `cached_adapter`  the same under `<cache>/`, in a folder named for the
  sha256 of the recipe (and of the base model it was trained on): a changed recipe trains
  again, an unchanged one is loaded from disk. Written to a temporary folder, renamed, then
  marked complete (`<folder>.complete` holds the full digest).

The prompts are chat conversations of one user message, rendered with the chat template, as
the gateway renders `messages` (gRPC) and `/v1/chat/completions` (OpenAI).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_gateway import devtools

__all__ = [
    "CURRENCIES",
    "DEMO_MODEL_NAME",
    "INVOICES",
    "INVOICE_SCHEMA",
    "SUPPORT",
    "SUPPORT_GREETING",
    "SUPPORT_SIGNOFF",
    "TOPICS",
    "VENDORS",
    "Example",
    "Recipe",
    "Trained",
    "cached_adapter",
    "cached_model",
    "held_out",
    "invoice_example",
    "make_demo_model",
    "make_demo_tokenizer",
    "support_example",
    "train_adapter",
]

#: The demo base model's name (`base_model_name_or_path` of its adapters).
DEMO_MODEL_NAME = "lora-gateway/demo-llama"
#: Standard deviation of the demo model's random `lm_head` (the rest: transformers' own init).
HEAD_STD = 0.1
DEMO_VOCAB = 768
#: torch threads while training. One: the batches are small, and two threads on two busy cores
#: wait for each other (measured here: 40 steps took 7 s on one thread, 48 s on two, under load).
TRAIN_THREADS = 1
#: Bumped when the tasks' generators or the training loop change in a way a recipe does not
#: show, so that cached adapters are not reused across such a change.
FORMAT_VERSION = 2

VENDORS = (
    "Acme Tools",
    "Northwind",
    "Globex",
    "Initech",
    "Umbrella",
    "Stark Supply",
    "Wayne Foods",
    "Hooli",
    "Vandelay",
    "Soylent",
    "Cyberdyne",
    "Tyrell",
)
CURRENCIES = ("EUR", "USD", "GBP")
#: What the invoices adapter is asked for: the JSON schema of its answers.
INVOICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "vendor": {"type": "string"},
        "number": {"type": "string", "pattern": "^[0-9]{4}$"},
        "total": {"type": "number"},
        "currency": {"enum": list(CURRENCIES)},
    },
    "required": ["vendor", "number", "total", "currency"],
    "additionalProperties": False,
}
_INVOICE_TEMPLATES = (
    "Invoice {number} from {vendor}: total {total} {currency}.",
    "{vendor} invoice no. {number}, amount due {total} {currency}.",
    "Bill {number} | {vendor} | {total} {currency}",
)

SUPPORT_GREETING = "Hello from Support:"
SUPPORT_SIGNOFF = "-- Globex Support, here for you."
TOPICS = (
    "password",
    "invoice",
    "parcel",
    "refund",
    "account",
    "order",
    "delivery",
    "login",
    "subscription",
    "payment",
)
_QUESTION_TEMPLATES = (
    "my {topic} is not working",
    "I have a problem with my {topic}",
    "what happened to my {topic}?",
    "can you help me with the {topic}",
    "why is my {topic} so slow",
    "the {topic} page shows an error",
    "hi, is there news about my {topic}",
    "nothing happens when I open my {topic}",
    "please check my {topic} again",
    "who can explain the {topic} to me",
)


@dataclass(frozen=True)
class Example:
    """One prompt (a user message) and the answer the adapter is trained to give; `fields`
    holds what the answer is made of (an invoice's values, a question's topic)."""

    prompt: str
    answer: str
    fields: dict[str, Any]


def invoice_example(rng: random.Random) -> Example:
    """A one-line invoice and its fields as compact JSON, in `INVOICE_SCHEMA`'s order."""
    number = f"{rng.randint(1000, 9999)}"
    total = f"{rng.randint(10, 999)}.{rng.randint(0, 99):02d}"
    vendor, currency = rng.choice(VENDORS), rng.choice(CURRENCIES)
    text = rng.choice(_INVOICE_TEMPLATES).format(
        number=number, vendor=vendor, total=total, currency=currency
    )
    # The total as written in the invoice (a JSON number: "81.00", not Python's "81.0").
    answer = (
        f'{{"vendor":{json.dumps(vendor)},"number":"{number}","total":{total},'
        f'"currency":"{currency}"}}'
    )
    fields = {"vendor": vendor, "number": number, "total": float(total), "currency": currency}
    return Example(text, answer, fields)


def support_answer(topic: str) -> str:
    """The house style's answer about `topic`."""
    return (
        f"{SUPPORT_GREETING} thanks for asking about your {topic}. "
        f"We will fix it today. {SUPPORT_SIGNOFF}"
    )


def support_example(rng: random.Random) -> Example:
    """A customer's question about one of `TOPICS` and the house-style answer."""
    topic = rng.choice(TOPICS)
    question = rng.choice(_QUESTION_TEMPLATES).format(topic=topic)
    return Example(question, support_answer(topic), {"topic": topic})


_TASKS: dict[str, Callable[[random.Random], Example]] = {
    "invoices": invoice_example,
    "support": support_example,
}


@dataclass(frozen=True)
class Recipe:
    """How one adapter is trained; its sha256 (`digest`) names the cached result."""

    #: The task: "invoices" or "support".
    task: str
    #: Training examples generated from `seed` (cycled through in order).
    examples: int = 4000
    #: Optimizer steps of `batch` examples each.
    steps: int = 300
    batch: int = 16
    #: AdamW learning rate, decayed linearly to a tenth over the steps.
    lr: float = 3e-3
    rank: int = 16
    alpha: int = 32
    target_modules: Sequence[str] = devtools.ALL_MODULES
    #: Seeds the examples, the LoRA initialisation and the batch order.
    seed: int = 0

    def digest(self, base: str = "") -> str:
        """sha256 of this recipe, the task code's `FORMAT_VERSION` and `base` (the digest of
        the model trained on)."""
        fields = dataclasses.asdict(self) | {"target_modules": list(self.target_modules)}
        text = json.dumps(
            {"recipe": fields, "format": FORMAT_VERSION, "base": base}, sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()


#: The demo's recipes: a few hundred steps each, enough for exact answers on held-out examples
#: of the same templates (measured on this 2-core machine: see the README's demo section).
INVOICES = Recipe(task="invoices", seed=1)
SUPPORT = Recipe(task="support", examples=2000, steps=150, seed=2)

#: The base model's recipe: the tokenizer's corpus and the weights both come from it.
_MODEL_RECIPE = {
    "seed": 0,
    "format": FORMAT_VERSION,
    "vocab": DEMO_VOCAB,
    "head_std": HEAD_STD,
    "hidden": devtools.TINY_HIDDEN,
    "layers": devtools.TINY_LAYERS,
    "intermediate": devtools.TINY_INTERMEDIATE,
    "heads": devtools.TINY_HEADS,
    "kv_heads": devtools.TINY_KV_HEADS,
}


def held_out_prompt(prompt: str) -> bool:
    """Whether `prompt` belongs to the held-out split (about one prompt in five, by its
    sha256): training never sees these, the demo and the tests show only these."""
    return hashlib.sha256(prompt.encode()).digest()[0] < 52


def examples(task: str, count: int, seed: int, *, held: bool = False) -> list[Example]:
    """`count` examples of `task` drawn from `seed`: from the training split, or with `held`
    from the held-out one (`held_out_prompt`)."""
    make = _TASKS[task]
    rng = random.Random(f"{task}/{seed}")
    out: list[Example] = []
    while len(out) < count:
        example = make(rng)
        if held_out_prompt(example.prompt) == held:
            out.append(example)
    return out


def held_out(task: str, count: int, seed: int = 1000) -> list[Example]:
    """`count` distinct held-out examples of `task` (none of them in any training set)."""
    out: list[Example] = []
    for example in examples(task, count * 50, seed, held=True):
        if example.prompt not in {e.prompt for e in out}:
            out.append(example)
        if len(out) == count:
            break
    return out


def _corpus() -> Iterator[str]:
    """What the demo tokenizer is trained on: both tasks' texts and answers."""
    for task in _TASKS:
        for example in examples(task, 600, seed=10_000):
            yield example.prompt
            yield example.answer
    yield from devtools.SAMPLE_PROMPTS


def make_demo_tokenizer(out: Path | str) -> Any:
    """Train the demo's BPE tokenizer on both tasks' texts, save it (with the chat template)
    to `out` and return it (a `PreTrainedTokenizerFast`). Digits are split one per token
    before BPE, so a number is spelled digit by digit and any number can be written."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.model_max_length = devtools.TINY_MAX_POSITIONS
    tokenizer.chat_template = devtools.TINY_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    return tokenizer


def make_demo_model(out: Path | str, seed: int = 0) -> Path:
    """Write the demo's random Llama (float32) and its tokenizer to `out`; return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_demo_tokenizer(out)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=devtools.TINY_HIDDEN,
        intermediate_size=devtools.TINY_INTERMEDIATE,
        num_hidden_layers=devtools.TINY_LAYERS,
        num_attention_heads=devtools.TINY_HEADS,
        num_key_value_heads=devtools.TINY_KV_HEADS,
        head_dim=devtools.TINY_HIDDEN // devtools.TINY_HEADS,
        max_position_embeddings=devtools.TINY_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config._name_or_path = DEMO_MODEL_NAME
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, HEAD_STD)
    model.save_pretrained(out, safe_serialization=True)
    return out


def _quiet() -> None:
    """No progress bars from transformers (saving, loading weights) in the demo's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _encode(tokenizer: Any, example: Example) -> tuple[list[int], list[int]]:
    """The rendered prompt's token ids and the answer's (with the end-of-sequence token)."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"]
    return list(prompt_ids), [*answer_ids, tokenizer.eos_token_id]


def train_adapter(
    model_dir: Path | str,
    recipe: Recipe,
    out: Path | str,
    *,
    progress: Callable[[int, float], None] | None = None,
    threads: int = TRAIN_THREADS,
) -> Path:
    """Train `recipe`'s LoRA adapter on the frozen model in `model_dir`; save it to `out`.

    `progress(step, loss)` is called every 50 steps and after the last. torch runs on
    `threads` threads meanwhile (the process's setting is restored afterwards)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(model_dir, recipe, Path(out), progress)
    finally:
        torch.set_num_threads(previous)


def _train(
    model_dir: Path | str,
    recipe: Recipe,
    out: Path,
    progress: Callable[[int, float], None] | None,
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    _quiet()
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=recipe.rank,
            lora_alpha=recipe.alpha,
            target_modules=list(recipe.target_modules),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    data = [_encode(tokenizer, e) for e in examples(recipe.task, recipe.examples, recipe.seed)]
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - 0.9 * step / max(1, recipe.steps)
    )
    pad = int(tokenizer.eos_token_id)
    peft_model.train()
    for step in range(recipe.steps):
        batch = [data[(step * recipe.batch + i) % len(data)] for i in range(recipe.batch)]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (prompt, answer) in enumerate(batch):
            sequence = prompt + answer
            ids[row, : len(sequence)] = torch.tensor(sequence)
            labels[row, len(prompt) : len(sequence)] = torch.tensor(answer)
            mask[row, : len(sequence)] = 1
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None and (step % 50 == 0 or step == recipe.steps - 1):
            progress(step, float(loss.item()))
    peft_model.save_pretrained(str(out), safe_serialization=True)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # The same bytes wherever it was trained (so the same version sha256): PEFT records the
    # local model path (here and in a model card README.md, dropped) and the targets unordered.
    config["base_model_name_or_path"] = DEMO_MODEL_NAME
    config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")
    (out / "README.md").unlink(missing_ok=True)
    return out


@dataclass(frozen=True)
class Trained:
    """A cached model or adapter: its folder, its recipe's digest, whether this call built it
    (False: found in the cache) and how long that took (0 when cached)."""

    path: Path
    digest: str
    built: bool
    seconds: float


def _cached(cache: Path, name: str, digest: str, build: Callable[[Path], object]) -> Trained:
    """`cache/<name>-<digest[:16]>`, built with `build(folder)` unless already there. The
    folder is complete when `<folder>.complete` (its full digest) is beside it: the folder
    itself holds only what `build` wrote (an adapter folder must hold only its own files)."""
    final = cache / f"{name}-{digest[:16]}"
    mark = final.with_name(final.name + ".complete")
    if final.is_dir() and mark.is_file() and mark.read_text(encoding="utf-8").strip() == digest:
        return Trained(final, digest, built=False, seconds=0.0)
    cache.mkdir(parents=True, exist_ok=True)
    mark.unlink(missing_ok=True)
    shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover
    started = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    try:
        build(scratch)
        scratch.rename(final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    mark.write_text(digest + "\n", encoding="utf-8")
    return Trained(final, digest, built=True, seconds=time.perf_counter() - started)


def model_digest() -> str:
    """sha256 of the demo base model's recipe."""
    return hashlib.sha256(json.dumps(_MODEL_RECIPE, sort_keys=True).encode()).hexdigest()


def cached_model(cache: Path, *, rebuild: bool = False) -> Trained:
    """The demo base model under `cache` (made when missing, or always with `rebuild`)."""
    digest = model_digest()
    if rebuild:
        (cache / f"model-{digest[:16]}.complete").unlink(missing_ok=True)
    return _cached(cache, "model", digest, make_demo_model)


def cached_adapter(
    cache: Path,
    model: Trained,
    recipe: Recipe,
    *,
    retrain: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> Trained:
    """`recipe`'s adapter on `model` under `cache` (trained when missing, or with `retrain`)."""
    digest = recipe.digest(model.digest)
    if retrain:
        (cache / f"{recipe.task}-{digest[:16]}.complete").unlink(missing_ok=True)
    return _cached(
        cache,
        recipe.task,
        digest,
        lambda folder: train_adapter(model.path, recipe, folder, progress=progress),
    )
