"""Run by tests/test_fsdp.py under torchrun (2 CPU processes, gloo): LoRA under FSDP2 trains the adapter and leaves
the sharded base weights as they were.

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_lora_worker.py MODEL_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.config import load_config  # noqa: E402
from app.lm import fsdp  # noqa: E402
from app.engine.optim import make_optimizer  # noqa: E402
from app.tasks import get_task  # noqa: E402


def main(model_dir: str) -> None:
    dist.init_process_group("gloo")
    cfg = load_config(ROOT / "configs/tiny.py", [f"--model_name={model_dir!r}", "--create_tiny_model=False",
                                                 "--finetuning='lora'", "--lora_dropout=0.0", "--learning_rate=1e-2",
                                                 "--share_prompt_prefix=False"])
    task = get_task(cfg.task)
    torch.manual_seed(0)
    model, tokenizer = task.model_kind(cfg).load(cfg, torch.device("cpu"))
    objective = task.objective(model, tokenizer, cfg)
    fsdp.shard(objective, task.model_kind(cfg).shard_blocks(objective), cpu_offload=False)
    optimizer = make_optimizer(cfg, task.model_kind(cfg).param_groups(objective, cfg))
    rows = task.load_rows(cfg, "train")[:8]
    features = [task.encode(r, tokenizer, cfg) for r in rows]
    mine = features[dist.get_rank() :: 2]
    for _ in range(3):
        objective(**task.collate(mine, tokenizer.pad_token_id)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    base = load_file(str(Path(model_dir) / "model.safetensors"))
    with fsdp.gathered(objective):
        if dist.get_rank() == 0:
            weights = {n: p.detach() for n, p in objective.named_parameters()}
            frozen = {n: w for n, w in weights.items() if "lora_" not in n}
            lora_b = [w for n, w in weights.items() if "lora_B" in n]
            matched = 0
            for name, w in frozen.items():
                key = name.split("base_model.model.", 1)[-1].replace(".base_layer", "")
                assert torch.equal(w, base[key]), f"{name} changed"
                matched += 1
            assert matched == len(base), (matched, len(base))
            assert lora_b and all(w.abs().max() > 0 for w in lora_b), "the adapter did not train"
            print(f"OK {matched} base tensors unchanged, {len(lora_b)} lora_B trained")
    # both ranks past their last collective before the group goes: a peer closing its gloo pairs while the other
    # still checks can abort that one ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
