"""From-scratch lookahead experiment: a plain MiniGPT against ConfidenceAwareGPT (two-pass lookahead confidence)."""
