# Per-step confidence head on the embedded tiny model: CPU, synthetic steps (data/sample/steps/), under a minute.
# The model (random weights, in-repo tokenizer) is written to model_name on first use.
base_config = "confidence_head_full.py"
model_name = "checkpoints/tiny-model"
create_tiny_model = True
train_file = "data/sample/steps/train.jsonl"
dev_file = "data/sample/steps/dev.jsonl"
out_dir = "checkpoints/confidence_head_tiny"

quantization = None
dtype = "float32"
mixed_precision = "no"
gradient_checkpointing = False
attn_implementation = "sdpa"

finetuning = "full"
max_seq_length = 256
batch_size = 16
micro_batch_size = 16
num_epochs = 2
max_steps = None
learning_rate = 1e-3
warmup_steps = 2
weight_decay = 0.0

eval_every = 25
eval_rows = None
eval_batch_size = 50
save_every = 50
log_every = 5
