# The embedded tiny model on the bundled sample data: CPU, about a minute on 2 cores.
# The model (random weights, in-repo tokenizer) is written to model_name on first use.
base_config = "default.py"
model_name = "checkpoints/tiny-model"
create_tiny_model = True
train_file = "data/sample/train.csv"
dev_file = "data/sample/dev.csv"
out_dir = "checkpoints/tiny"

quantization = None
dtype = "float32"
mixed_precision = "no"
gradient_checkpointing = False

finetuning = "full"      # a random-weight model has nothing to adapt; LoRA/QLoRA are covered by the tests
max_seq_length = 256
batch_size = 16
micro_batch_size = 16
num_epochs = 10      # the copy of the place word into the thought forms after ~200 steps
learning_rate = 2e-3
warmup_steps = 50
weight_decay = 0.1

eval_every = 100
eval_rows = 200
eval_batch_size = 64
infer_batch_size = 128
save_every = 100
log_every = 10
max_new_tokens = 48
