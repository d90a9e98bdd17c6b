# Confidence tokens on the embedded tiny model and the synthetic sample in data/sample/confidence/ (CPU, a few minutes).
# The tiny model has random weights: it learns which token follows the answer (that follows from one word of the
# question), but it was never taught to answer, so its validation answers do not parse and every expected token is U.
# Full fine-tuning and the pair loss: on a random-weight model LoRA and the full-vocabulary loss learn the token's
# dependence on the input far more slowly (the recipe's full_vocab + LoRA is covered by the tests).
base_config = "confidence_tokens.py"
model_name = "checkpoints/tiny-model"
create_tiny_model = True
train_file = "data/sample/confidence/train.jsonl"
validation_files = {
    "boolq": "data/sample/confidence/dev_boolq.jsonl",
    "medqa": "data/sample/confidence/dev_medqa.jsonl",
}
out_dir = "checkpoints/confidence_tokens_tiny"
confidence_chat_template = False   # the tiny tokenizer has no chat template
calib_beta = 16

finetuning = "full"
confidence_loss = "pair"
quantization = None
dtype = "float32"
mixed_precision = "no"
gradient_checkpointing = False
lora_r = 8
lora_alpha = 16
lora_dropout = 0.0

max_seq_length = 256
batch_size = 16
micro_batch_size = 16
num_epochs = 6
learning_rate = 1e-2
warmup_ratio = 0.05
weight_decay = 0.0

eval_every = 48          # 384 examples / 16 = 24 steps per epoch: an evaluation every second epoch
eval_rows = None
eval_batch_size = 48
max_new_tokens = 6
save_every = 48
log_every = 8
