"""The embedded tiny model: a random-weight Mistral-architecture model and a BPE tokenizer built in-repo.

Nothing is downloaded. The directory written here is an ordinary Hugging Face model directory
(config.json, model.safetensors, tokenizer files) and is loaded through the same `from_pretrained`
path as any hub model.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from app.atomic import give_new_modes
from app.errors import UserError

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# A plain role-labelled template, so that a chat server (`transformers serve`, the compose serve-cpu service) can
# answer chat requests with the tiny model or a checkpoint trained from it; the tasks' own prompts never use it.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")

# The tokenizer's training text: short English sentences about people, activities and places, and the JSON answer
# scaffolding. It is fixed here, apart from the tasks' sample data (app/tasks/sample_vocab.py), because every figure
# the tests compute on the tiny model depends on this vocabulary: a change to the samples must not change it.
_NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemal", "Lucia"]
_ACTIVITIES = ["reading", "cooking", "sleeping", "singing", "painting", "talking", "waiting", "writing"]
_PLACES = {"kitchen": "indoors", "library": "indoors", "office": "indoors", "bedroom": "indoors", "museum": "indoors",
           "garage": "indoors", "park": "outdoors", "garden": "outdoors", "forest": "outdoors", "beach": "outdoors",
           "street": "outdoors", "field": "outdoors"}
_PREMISES = ["{name} is {activity} in the {place}.", "In the {place}, {name} is {activity}."]
_HYPOTHESES = ["{name} is {claim}.", "{name} is {activity} {claim}."]
_INSTRUCTION = ("Premise: Hypothesis: Does the premise entail the hypothesis? Think step by step, then answer with a "
                'JSON object holding "thought_process" and "predicted_label" (1 = entailed, 0 = not).\nAnswer: ')


def tokenizer_corpus(sentences: int = 400, seed: int = 99) -> list[str]:
    """The lines the tiny tokenizer is trained on (deterministic): per drawn sentence pair a premise, a hypothesis,
    a reasoning line and the JSON answer holding it, then an instruction line and label words."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        name, activity, place = rng.choice(_NAMES), rng.choice(_ACTIVITIES), rng.choice(list(_PLACES))
        where = _PLACES[place]
        claim = rng.choice(["indoors", "outdoors"])
        label = int(claim == where)
        premise = rng.choice(_PREMISES).format(name=name, activity=activity, place=place)
        hypothesis = rng.choice(_HYPOTHESES).format(name=name, activity=activity, claim=claim)
        thought = f"The {place} is {where}. The hypothesis says {claim}. {'They agree.' if label else 'They differ.'}"
        lines += [premise, hypothesis, thought,
                  '{"thought_process": "' + thought + '", "predicted_label": ' + str(label) + "}"]
    return lines + [_INSTRUCTION, "entailment not_entailment contradiction neutral true false yes no 0 1"]


def build_tokenizer(vocab_size: int = 640):
    """Byte-level BPE trained on `tokenizer_corpus()`: deterministic, and any text still encodes."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS, model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, seed: int = 0, hidden_size: int = 96, layers: int = 2):
    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=2048,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    return MistralForCausalLM(config)


def write_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write model + tokenizer to out_dir atomically (a half-written model dir is never left behind)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    ids = [tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[k]) for k in ("bos_token", "eos_token", "pad_token")]
    assert ids == [1, 2, 3], ids  # the model config above relies on this order
    model = build_model(vocab_size=len(tokenizer), seed=seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        give_new_modes(tmp)  # mkdtemp and safetensors make them private; a model is shared like any file
        if out_dir.exists():
            raise UserError(f"{out_dir}: already exists")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_tiny_model(path: str | Path) -> None:
    """Create the tiny model at `path` unless a model is already there (configs/tiny.py asks for this)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return
    if path.exists() and any(path.iterdir()):
        raise UserError(f"{path}: exists but holds no config.json; remove it or point model_name elsewhere")
    if path.exists():
        path.rmdir()
    try:
        write_tiny_model(path)
    except (OSError, UserError):
        if not (path / "config.json").is_file():
            raise
        # another process of a multi-process run wrote it first


def cli(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        raise UserError("usage: python -m app tiny-model DIR")
    out = write_tiny_model(argv[0])
    print(f"wrote tiny model and tokenizer to {out}")
    return 0
