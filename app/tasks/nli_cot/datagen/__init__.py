"""Chain-of-thought training data for the NLI task, made by models behind an OpenAI-compatible API.

  config.py    the datagen settings (`DatagenConfig`), loaded from a config module plus `--key=value` overrides
  prompts.py   the versioned prompts (Markdown instructions, XML-tagged inputs, JSON only) and reply parsers
  client.py    AsyncOpenAI with bounded concurrency, RPM/TPM limits, retries (backoff, jitter, Retry-After),
               identical requests in flight sent once
  cache.py     the append-only cache of raw responses, keyed by hash(model, messages, parameters, prompt version)
  pipeline.py  generate, reflect, combine, judge: one output row per input row, written atomically
  stats.py     accuracy, reflection success, thought lengths in tokens, accuracy by length band, histogram, cost

Commands: `python -m app cot generate|reflect|combine|stats|judge` (app/tasks/nli_cot/commands.py).
"""
