"""Pushing a final checkpoint's weights and tokenizer to the Hugging Face Hub (token from the environment)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


HUB_FILES = ["adapter_model.safetensors", "adapter_config.json", "model*.safetensors", "config.json",
             "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*",
             "vocab.json", "merges.txt", "*.model", "README.md"]


def push_to_hub(directory: Path, repo: str) -> bool:
    """Upload the weights and tokenizer of a checkpoint (not optimizer, RNG or trainer state) to a private Hub repo.
    A failure is logged, not raised: the checkpoint stays on disk and can be pushed again."""
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=hub_token())
        api.create_repo(repo, private=True, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo, allow_patterns=HUB_FILES,
                          commit_message="final adapter and tokenizer")
    except Exception as err:  # network, auth, quota: never lose the run over it
        log.warning("push to the Hub repo %s failed (%s: %s); the checkpoint is kept locally", repo,
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return False
    log.info("pushed the final adapter and tokenizer to %s", repo)
    return True
