# Per-step confidence regression head with LoRA on Qwen3-4B-Instruct-2507: adapters on q,k,v,o (r=16, alpha=32,
# dropout 0.1); the MLP head and the new <CONFIDENCE> embedding row train fully (the row is saved with the adapter).
base_config = "confidence_head_full.py"
out_dir = "checkpoints/confidence_head_lora"

finetuning = "lora"
lora_r = 16
lora_alpha = 32
lora_dropout = 0.1
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
learning_rate = 1e-4
