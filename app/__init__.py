"""finetune-runner: fine-tune LLMs and run batched inference from Python config modules."""

__version__ = "0.1.0"
