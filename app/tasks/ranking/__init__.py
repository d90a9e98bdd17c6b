"""FinQA candidate ranking: an LLM backbone and a score head pick the best of N candidate answers."""
