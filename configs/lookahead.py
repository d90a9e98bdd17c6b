# From-scratch lookahead experiment: MiniGPT vs ConfidenceAwareGPT on nine Shakespeare plays (data/lookahead/,
# character level), seeds 42, 123, 456, the fair variant (LM loss and lookahead at every position).
#   python -m app experiment configs/lookahead.py [--max_steps=N] [--lookahead_variant=seed]
task = "lookahead"
corpus_file = "data/lookahead/shakespeare.txt"
out_dir = "checkpoints/lookahead"

lookahead_variant = "fair"
confidence_alpha = 1.0
lookahead_steps = 2
confidence_init_bias = 2.0
context_length = 128
n_layer = 4
n_head = 4
d_model = 128
mlp_ratio = 4
experiment_seeds = [42, 123, 456]

finetuning = "full"
quantization = None
dtype = "float32"
mixed_precision = "auto"
group_by_length = False
share_prompt_prefix = False
batch_size = 64
micro_batch_size = 64
max_steps = 3000
learning_rate = 1e-3
lr_scheduler = "cosine"
warmup_steps = 100
weight_decay = 0.1
max_grad_norm = 1.0

eval_every = 250
eval_rows = 400
eval_batch_size = 64
save_every = 500
log_every = 25
tensorboard = False
