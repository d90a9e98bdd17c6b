# The lookahead experiment on a CPU: small models, the first 300k characters of the corpus, 3 seeds x 2 models.
#   python -m app experiment configs/lookahead_tiny.py
base_config = "lookahead.py"
out_dir = "checkpoints/lookahead_tiny"
corpus_chars = 300_000
context_length = 64
n_layer = 2
n_head = 2
d_model = 64
mlp_ratio = 4
mixed_precision = "no"
batch_size = 32
micro_batch_size = 32
max_steps = 300
learning_rate = 3e-3
warmup_steps = 20
eval_every = 100
eval_rows = 150
eval_batch_size = 64
save_every = 100
log_every = 20
calibration_points = 3000
