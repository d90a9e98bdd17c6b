# Per-step confidence regression head (task confidence_head, app/tasks/confidence_head/README.md), full
# fine-tuning: backbone + MLP head + the new <CONFIDENCE> embedding train together on Qwen3-4B-Instruct-2507.
# Data: generic step JSONL; PRM800K / REVEAL / eQASC files are read in their own schemas
# (app/tasks/confidence_head/step_data.py), and several files mix by weight, e.g.
# step_train_files = {"data/prm800k/phase2_train.jsonl": 3.0, "data/steps.jsonl": 1.0}.
base_config = "default.py"
task = "confidence_head"
model_name = "Qwen/Qwen3-4B-Instruct-2507"
train_file = "data/steps/train.jsonl"
dev_file = "data/steps/dev.jsonl"
out_dir = "checkpoints/confidence_head_full"

# the head: Linear(hidden->1024)+GELU+Dropout(0.1), Linear(1024->256)+GELU+Dropout(0.1), Linear(256->1)+Sigmoid
step_marker = "<CONFIDENCE>"
head_hidden_sizes = [1024, 256]
head_dropout = 0.1
head_loss = "mse"           # or "huber" (head_huber_delta)
metric_for_best = "dev_loss"

finetuning = "full"
quantization = None
dtype = "bfloat16"
mixed_precision = "bf16"
gradient_checkpointing = True
max_seq_length = 1024
overlength = "truncate"      # keeps the problem and the first steps; cut steps lose their labels

optimizer = "adamw"          # or "adamw_8bit" (bitsandbytes)
adam_beta1 = 0.9
adam_beta2 = 0.999
weight_decay = 0.01
learning_rate = 2e-5
lr_scheduler = "cosine"
warmup_steps = 500
max_grad_norm = 1.0
batch_size = 16              # effective batch 4 x 4: micro-batches of 4, 4 accumulation steps on one GPU
micro_batch_size = 4
num_epochs = 2

eval_every = 500
eval_rows = None
eval_batch_size = 16
save_every = 500
