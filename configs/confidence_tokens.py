# Confidence tokens recipe: Qwen2.5-7B-Instruct answers, then appends <C_…> / <U_…>; loss on that token only.
# Training data comes from `python -m app tag` (raw BoolQ / MedQA rows + this model);
# see app/tasks/confidence_tokens/README.md.
task = "confidence_tokens"
model_name = "Qwen/Qwen2.5-7B-Instruct"
train_file = "data/confidence/train.jsonl"
dev_file = None
validation_files = {
    "boolq": "data/confidence/boolq_validation.jsonl",
    "medqa": "data/confidence/medqa_validation.jsonl",
}
out_dir = "checkpoints/confidence_tokens"

confidence_tokens = {"boolq": ["<C_READ>", "<U_READ>"], "medqa": ["<C_MED>", "<U_MED>"]}
confidence_loss = "full_vocab"      # or "pair": cross-entropy over the domain's two tokens
confidence_chat_template = True     # the question goes into Qwen's chat template
calib_beta = 50                     # equal-mass calibration bins of 50 samples
n_bins = 10
calibration_metric = "ce_l2_debiased"
hub_repo = None                     # e.g. "your-name/qwen2.5-7b-confidence-tokens" (HF_TOKEN from the environment)

finetuning = "lora"
quantization = "8bit"
dtype = "bfloat16"
mixed_precision = "bf16"
gradient_checkpointing = True
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

max_seq_length = 2048
overlength = "truncate"
batch_size = 8
micro_batch_size = 8     # lower it (accumulation makes up the rest) if a GPU runs out of memory
num_epochs = 3
learning_rate = 2e-4
lr_scheduler = "linear"
warmup_steps = None
warmup_ratio = 0.03
weight_decay = 0.01
max_grad_norm = 1.0
optimizer = "adamw"

eval_every = 2375        # one epoch of ~19K examples at batch 8: reliability_epoch_N.json at each epoch's end
eval_rows = 500
eval_batch_size = 32
max_new_tokens = 64      # answer + token; generation stops at the token
infer_batch_size = 32    # `python -m app tag` generation batch
save_every = 500
keep_last = 2
log_every = 10
