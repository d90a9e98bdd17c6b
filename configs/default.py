# NLI chain-of-thought recipe: Mistral-7B-v0.3 with QLoRA (nf4, double quantisation, bf16 compute).
# Every name here is a field of app.config.Config; `python -m app config --list` shows them all.
task = "nli_cot"
model_name = "mistralai/Mistral-7B-v0.3"
train_file = "data/train.csv"
dev_file = "data/dev.csv"
out_dir = "checkpoints/default"

finetuning = "lora"
quantization = "4bit"
bnb_4bit_quant_type = "nf4"
bnb_4bit_use_double_quant = True
bnb_4bit_compute_dtype = "bfloat16"
dtype = "bfloat16"
mixed_precision = "bf16"
gradient_checkpointing = True

lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]

max_seq_length = 512
batch_size = 16          # effective batch
micro_batch_size = 4     # per GPU; accumulation = batch_size / (micro_batch_size x GPUs)
num_epochs = 2
learning_rate = 2e-4
lr_scheduler = "cosine"
warmup_steps = 75
max_grad_norm = 1.0
weight_decay = 0.0

eval_every = 100
eval_rows = 200
save_every = 100
max_new_tokens = 256
