# Ablation 1: larger adapter, larger effective batch (through accumulation), longer warmup, lower lr.
base_config = "default.py"
out_dir = "checkpoints/ablation1"

lora_r = 32
lora_alpha = 64
batch_size = 64          # micro_batch_size 4 -> 16 accumulation steps on one GPU
warmup_steps = 150
learning_rate = 1e-4
max_grad_norm = 1.0
