"""Loading tokenizers and models: hub name or local directory, full / LoRA / QLoRA, attention backend.

The tiny model and a 7B hub model go through exactly the same `from_pretrained` calls here.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from app.config import Config
from app.errors import UserError
from app.packages import missing

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_attn_implementation(cfg: Config, device: torch.device) -> str:
    if cfg.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise missing("flash-attn", "attn_implementation='flash_attention_2'", "leave attn_implementation='auto' (sdpa)")
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(cfg: Config, path: str | None = None):
    from transformers import AutoTokenizer

    name = path or cfg.tokenizer_name or cfg.model_name
    _require_tokenizer_files(name)
    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:  # a corrupt tokenizer file raises anything of these
        raise UserError(f"cannot load tokenizer {name!r}: {_first_line(err)}") from None
    # Tokenizers saved with fixed padding/truncation (seen in the wild) would silently pad every
    # example to 2048 or cut it: the collator decides padding, the task decides truncation.
    backend = getattr(tok, "_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # pad == eos would mask EOS out of the loss and the model would never learn to stop
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def _quantization_config(cfg: Config, compute_dtype: torch.dtype):
    if cfg.quantization is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise missing("bitsandbytes", f"quantization={cfg.quantization!r}")
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=_DTYPES[cfg.bnb_4bit_compute_dtype],
    )


def load_base_model(cfg: Config, device: torch.device, path: str | None = None):
    """The causal LM as `from_pretrained` gives it (quantized if asked), before any adapter."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from app.checkpoint import require_safetensors

    name = path or cfg.model_name
    require_safetensors(name)  # a local directory with pickle weights only: one line saying how to convert
    dtype = resolve_dtype(cfg, device)
    attn = resolve_attn_implementation(cfg, device)
    kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code,
                  use_safetensors=True)  # never unpickle weights, also for a hub name
    quant = _quantization_config(cfg, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, SafetensorError) as err:
        raise UserError(f"cannot load model {name!r}: {_first_line(err)}") from None
    log.info("model %s: dtype=%s attention=%s quantization=%s", name, dtype, attn, cfg.quantization)
    return model


def fit_embeddings(model, tokenizer, new_ids: list[int] = ()) -> None:
    """Grow the embedding matrix for added tokens; new rows start exactly at the mean of the old ones
    (deterministic, unlike sampling around it, so training and inference rebuild the same rows). `new_ids`: tokens
    just added to the tokenizer, set to the mean of the rows before them even where the matrix had spare rows
    (Qwen-style padded vocabularies) that would otherwise give them arbitrary starting rows."""
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    rows = sorted(set(range(old, len(tokenizer))) | set(new_ids))
    if not rows:
        return
    with torch.no_grad():
        for emb in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
            emb.weight[rows] = emb.weight[: rows[0]].float().mean(0).to(emb.weight.dtype)


def enable_activation_checkpointing(model) -> None:
    """Recompute activations in the backward pass (non-reentrant: works with frozen inputs and DDP)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _trainable_token_indices(model, ids: list[int], head_rows: bool):
    """peft's trainable_token_indices: the ids' rows of the input embeddings, and with `head_rows` of an untied LM
    head too (else an untied head keeps identical rows for all new tokens and cannot tell them apart)."""
    if not ids:
        return None
    head = model.get_output_embeddings()
    if not head_rows or head is None or getattr(model.config, "tie_word_embeddings", False):
        return list(ids)
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    return {names[id(model.get_input_embeddings())]: list(ids), names[id(head)]: list(ids)}


def add_adapters(model, cfg: Config, trainable_token_ids: list[int] = (), head_rows: bool = False):
    """Make the model trainable as the config says: LoRA (optionally on a k-bit base) or full.

    With LoRA, the rows of `trainable_token_ids` (added tokens) train and are saved with the adapter; `head_rows`
    makes their LM-head rows trainable too."""
    if cfg.finetuning == "full":
        if cfg.quantization is not None:
            raise UserError("finetuning='full' cannot train a quantized base; use finetuning='lora' (QLoRA)")
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
        trainable_token_indices=_trainable_token_indices(model, list(trainable_token_ids), head_rows),
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise UserError(f"target_modules={cfg.target_modules}: {str(err).splitlines()[0]}") from None


def load_trainable(cfg: Config, device: torch.device, added_tokens: list[str] = (), weights_dir: Path | None = None,
                   head_rows: bool = False):
    """(model, tokenizer) ready to train: tokenizer with the task's added tokens, base model (or a full checkpoint),
    embeddings fitted, adapters added, and a LoRA checkpoint's adapter weights loaded when resuming."""
    tokenizer = load_tokenizer(cfg, str(weights_dir) if weights_dir else None)
    new = [t for t in added_tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    full_ckpt = weights_dir is not None and not is_adapter_dir(weights_dir)
    model = load_base_model(cfg, device, path=str(weights_dir) if full_ckpt else None)
    fit_embeddings(model, tokenizer, tokenizer.convert_tokens_to_ids(new) if new else ())
    model = add_adapters(model, cfg, tokenizer.convert_tokens_to_ids(list(added_tokens)), head_rows=head_rows)
    if weights_dir is not None and is_adapter_dir(weights_dir):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(Path(weights_dir) / "adapter_model.safetensors")))
    return model, tokenizer


def save_weights(model, tokenizer, directory: Path) -> None:
    """Weights as safetensors (LoRA: the adapter; added-token rows travel as trainable-token deltas and the resized
    matrices are rebuilt at load) and the tokenizer."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
    else:
        model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def load_for_inference(checkpoint: str | Path, cfg: Config, device: torch.device):
    """Model + tokenizer from a run checkpoint (adapter over its base, or a full model).

    A broken checkpoint is a one-line UserError: the cheap checks of `verify_checkpoint` run first (manifest sizes,
    safetensors headers, JSON, tokenizer, no pickle-only weights); call `verify_checkpoint` for the checksums too."""
    from app.checkpoint import verify_checkpoint

    checkpoint = Path(checkpoint)
    verify_checkpoint(checkpoint, hashes=False)
    tokenizer = load_tokenizer(cfg, str(checkpoint))
    if is_adapter_dir(checkpoint):
        from peft import PeftModel

        model = load_base_model(cfg, device)
        fit_embeddings(model, tokenizer)
        # peft has no use_safetensors switch: it reads adapter_model.safetensors when the directory has it (checked
        # above) and would fall back to adapter_model.bin only without it
        model = PeftModel.from_pretrained(model, str(checkpoint))
    else:
        model = load_base_model(cfg, device, path=str(checkpoint))
    if cfg.quantization is None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _first_line(err: Exception) -> str:
    """The first line of an exception's message; its type too where the message alone says little (KeyError)."""
    line = (str(err).strip().splitlines() or [""])[0]
    return line if isinstance(err, OSError) else f"{type(err).__name__}: {line}"


def _require_tokenizer_files(name: str) -> None:
    """A local directory without tokenizer.json or tokenizer_config.json is a one-line error, not a traceback."""
    files = ("tokenizer.json", "tokenizer_config.json")
    if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in files):
        raise UserError(f"{name}: no tokenizer files ({' or '.join(files)})")
