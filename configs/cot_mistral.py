# Chain-of-thought training data for the NLI recipe through the Mistral API (python -m app cot ...):
#   export MISTRAL_API_KEY=...
#   python -m app cot generate data/train_raw.csv --output data/cot_gen.csv --config configs/cot_mistral.py
#   python -m app cot reflect data/cot_gen.csv --output data/cot_reflected.csv --config configs/cot_mistral.py
#   python -m app cot combine data/cot_reflected.csv --output data/train.csv --config configs/cot_mistral.py
#   python -m app cot stats data/cot_reflected.csv --output data/cot_stats.json --config configs/cot_mistral.py
# Every name is a field of app/tasks/nli_cot/datagen/config.py (DatagenConfig); override any with --name=value.
base_url = "https://api.mistral.ai/v1"
api_key_env = "MISTRAL_API_KEY"
model = "open-mistral-7b"            # first pass
reflect_model = "open-mistral-nemo"  # reflection of the wrong rows, given the gold label
temperature = 0.0
max_tokens = 400
concurrency = 8
rpm = 300                            # stay under the workspace's requests-per-minute limit
tpm = 500_000
max_retries = 6
structured_output = "auto"           # JSON schema response_format, prompt-only JSON if the server refuses it
prompt_version = "v1"
consistency_check = False
prices = {                           # USD per million tokens
    "open-mistral-7b": {"input": 0.25, "output": 0.25},
    "open-mistral-nemo": {"input": 0.15, "output": 0.15},
}
tokenizer = "mistralai/Mistral-7B-v0.3"  # the model configs/default.py trains: stats count its tokens
length_bands = [250, 400]
