"""`python -m app export CHECKPOINT --output DIR [--merge]`: a checkpoint as a directory other tools serve.

  --merge      an adapter is merged into its base model and saved as a plain Hugging Face model (safetensors) in the
               base's dtype; a 4-bit or 8-bit base is reloaded unquantized in 16-bit (bnb_4bit_compute_dtype) for
               merging, and the output says so. Loads with `AutoModelForCausalLM.from_pretrained(DIR)` alone; its
               logits equal the adapter model's (float32: within 1e-4, tested).
  (default)    an adapter checkpoint is copied as a clean adapter (adapter weights + config, tokenizer); a full
               checkpoint is copied as a model. Optimizer, scheduler, RNG and trainer state are left out.

Both write the tokenizer with the task's added tokens, `generation_config.json`, the task's extra weights (e.g.
`score_head.safetensors`), `run_config.json` and the model card (README.md) when the checkpoint has one, then print
ready-to-run `vllm serve` and `transformers serve` commands. An adapter with `modules_to_save` or trainable token
rows cannot be served as a LoRA by vLLM: the output says to export it with --merge.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from app.atomic import give_new_modes
from app.errors import UserError

# files of a checkpoint that are training state, never exported
_STATE = ("optimizer.safetensors", "optimizer.json", "scheduler.json", "trainer_state.json", "manifest.json")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
_ADAPTER = ("adapter_model.safetensors", "adapter_config.json")
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts
MERGE_TOLERANCE = 1e-4  # float32 merge: max |logit difference| against the adapter model (tested)


def vllm_max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts that holds an adapter of rank r."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= r:
            return allowed
    raise UserError(f"adapter rank {r} is above what vLLM serves ({VLLM_LORA_RANKS[-1]}); export with --merge")


def adapter_blockers(adapter_config: dict) -> list[str]:
    """Why vLLM cannot serve this adapter as a LoRA (empty: it can)."""
    why = []
    if adapter_config.get("modules_to_save"):
        why.append(f"modules_to_save={adapter_config['modules_to_save']}")
    if adapter_config.get("trainable_token_indices"):
        why.append("trainable token rows (trainable_token_indices: the task's added tokens)")
    return why


def serve_commands(output: Path, merged: bool, base: str | None = None, adapter_config: dict | None = None,
                   name: str = "finetuned") -> list[str]:
    """The serving commands for an exported directory (shell-quoted, one per line)."""
    out = shlex.quote(str(output))
    tf = f"transformers serve {out} --host 127.0.0.1 --port 8000"
    if merged:
        return [f"vllm serve {out} --served-model-name {name} --port 8000", tf]
    rank = vllm_max_lora_rank(int(adapter_config.get("r", 8)))
    vllm = (f"vllm serve {shlex.quote(str(base))} --enable-lora --lora-modules {name}={out} "
            f"--max-lora-rank {rank} --port 8000")
    return [vllm, tf]


def _copy(src: Path, dst: Path) -> None:
    shutil.copy2(src, dst)


def _extras(checkpoint: Path) -> list[Path]:
    """The task's extra weights (e.g. score_head.safetensors) and JSON beside them."""
    skip = set(_STATE) | set(_ADAPTER) | set(_TOKENIZER) | {"config.json", "generation_config.json", "run_config.json",
                                                            "README.md"}
    out = []
    for f in sorted(checkpoint.iterdir()):
        if not f.is_file() or f.name in skip or f.name.startswith("rng_rank") or f.name.startswith("model"):
            continue
        if f.suffix in (".safetensors", ".json"):
            out.append(f)
    return out


def _base_dtype(cfg):
    """The dtype to merge in: the config's, else the base model's own (config.json), else float32; a quantized base
    is merged in bnb_4bit_compute_dtype (16-bit)."""
    import torch

    from app.lm.modeling import _DTYPES

    if cfg.quantization is not None:
        return _DTYPES[cfg.bnb_4bit_compute_dtype]
    if cfg.dtype != "auto":
        return _DTYPES[cfg.dtype]
    try:
        from transformers import AutoConfig

        dtype = getattr(AutoConfig.from_pretrained(cfg.model_name), "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32
    except (OSError, ValueError):
        return torch.float32


def export(checkpoint: str, output: str, merge: bool = False, overrides=(), echo=print) -> dict:
    """Export `checkpoint` to `output`; returns {"merged", "output", "commands", "notes"}."""
    from app.runs import check_new_folder, checkpoint_config, ensure_base_model, resolve_checkpoint, verify

    ckpt, why = resolve_checkpoint(checkpoint)
    out = Path(output)
    check_new_folder(out, f"--output {out}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--output {out}: exists and is not an empty directory; choose a new one")
    if out.resolve() == ckpt.resolve():
        raise UserError(f"--output {out} is the checkpoint itself; choose a new directory")
    if ckpt.resolve() in out.resolve().parents:
        raise UserError(f"--output {out}: inside the checkpoint {ckpt}, which it would change; choose a directory "
                        "outside it")
    verify(ckpt)
    cfg = checkpoint_config(ckpt, overrides)
    adapter = (ckpt / "adapter_config.json").is_file()
    notes: list[str] = []
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    adapter_config = json.loads((ckpt / "adapter_config.json").read_text(encoding="utf-8")) if adapter else None
    merged = merge or not adapter
    try:
        if adapter and merge:
            notes += _merge(ckpt, cfg, tmp, ensure_base_model)
        else:
            names = _ADAPTER if adapter else ("config.json",)
            for f in [*names, *_TOKENIZER, "generation_config.json"]:
                if (ckpt / f).is_file():
                    _copy(ckpt / f, tmp / f)
            if not adapter:
                for f in ckpt.glob("model*.safetensors*"):
                    _copy(f, tmp / f.name)
            if merge and not adapter:
                notes.append("a full checkpoint: nothing to merge, the model is copied")
        for f in [*_extras(ckpt), ckpt / "run_config.json", ckpt / "README.md"]:
            if f.is_file() and not (tmp / f.name).exists():
                _copy(f, tmp / f.name)
        if not (tmp / "generation_config.json").is_file():
            _write_generation_config(tmp, cfg)
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        give_new_modes(tmp)  # copies keep the checkpoint's modes; safetensors writes 0600
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commands = serve_commands(out, merged, base=cfg.model_name, adapter_config=adapter_config)
    if adapter and not merge:
        blockers = adapter_blockers(adapter_config)
        if blockers:
            notes.append("vLLM cannot serve this adapter as a LoRA (" + "; ".join(blockers) + "): export it with "
                         "--merge first, then serve the merged directory")
            commands = [commands[1]]
    echo(f"exported {ckpt} ({why}) to {out}: " + ("merged model" if adapter and merge else
                                                   "adapter" if adapter else "full model"))
    for note in notes:
        echo(f"note: {note}")
    echo("serve it (OpenAI-compatible API on port 8000):")
    for c in commands:
        echo(f"  {c}")
    return {"merged": merged, "output": out, "commands": commands, "notes": notes}


def _write_generation_config(directory: Path, cfg) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(directory))
    gen = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    gen.save_pretrained(str(directory))


def _merge(ckpt: Path, cfg, tmp: Path, ensure_base_model) -> list[str]:
    import torch

    from app.lm.modeling import load_for_inference

    notes = []
    dtype = _base_dtype(cfg)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
    if cfg.quantization is not None:
        notes.append(f"the base was trained {cfg.quantization}-quantized; it is reloaded unquantized in {name} for "
                     "merging (merged weights differ from the quantized model by the quantization error)")
    merge_cfg = cfg.model_copy(update={"quantization": None, "dtype": name})
    ensure_base_model(merge_cfg, ckpt)
    model, tokenizer = load_for_inference(ckpt, merge_cfg, torch.device("cpu"))
    model = model.merge_and_unload()
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    notes.append(f"merged in {name}")
    return notes
