# FinQA candidate ranking recipe: Qwen3-8B as the backbone (decoder body, no LM head), LoRA r=16 alpha=32 on the
# attention projections, bf16, effective batch 16 questions (8 candidates each; 2 per GPU pass x 8 accumulation).
# Data: python -m app ranking prepare / candidates / rewards (see app/tasks/ranking/README.md).
task = "ranking"
model_name = "Qwen/Qwen3-8B"
train_file = "data/finqa/train.rewards.jsonl"
dev_file = "data/finqa/dev.rewards.jsonl"
out_dir = "checkpoints/ranking"

finetuning = "lora"
quantization = None
dtype = "bfloat16"
mixed_precision = "bf16"
gradient_checkpointing = False   # on: activations are recomputed, and the shared prefix falls back to B x 8 rows
attn_implementation = "sdpa"     # the shared-prefix pass is tested with SDPA and eager attention, not flash-attention
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]

max_seq_length = 1024            # question + context + the longest candidate
overlength = "truncate"          # the context loses its end; the question and candidates stay
batch_size = 16                  # questions per optimizer step
micro_batch_size = 2             # questions per forward pass (x 8 candidates)
num_epochs = 3
learning_rate = 1e-4
lr_scheduler = "cosine"
warmup_ratio = 0.05
max_grad_norm = 1.0
weight_decay = 0.0

rank_loss = "ce"
rank_head_hidden = 1024
share_question_prefix = True
candidate_chunk = 8

eval_every = 200
eval_rows = None
eval_batch_size = 8
save_every = 200
infer_batch_size = 8
