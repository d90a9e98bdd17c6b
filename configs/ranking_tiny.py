# Candidate ranking on the embedded tiny model: CPU, the bundled synthetic set (data/sample/ranking/), about a minute.
# The model (random weights, in-repo tokenizer) is written to model_name on first use.
base_config = "ranking.py"
model_name = "checkpoints/tiny-model"
create_tiny_model = True
train_file = "data/sample/ranking/train.jsonl"
dev_file = "data/sample/ranking/dev.jsonl"
out_dir = "checkpoints/ranking_tiny"

finetuning = "full"
dtype = "float32"
mixed_precision = "no"
attn_implementation = "sdpa"

max_seq_length = 128
batch_size = 16
micro_batch_size = 16
num_epochs = 6
warmup_ratio = 0.0
warmup_steps = 5
learning_rate = 2e-3
rank_head_hidden = 64
rank_head_dropout = 0.0
candidate_chunk = None

eval_every = 30
eval_batch_size = 64
save_every = 60
log_every = 5
infer_batch_size = 32
