"""Token-exact capture for RL: asking the engine for token ids and logprobs
(`capture`), the normalised `tokens` field of a record (`normalise`), whether a
session's calls extend one another (`continuity`) and rows for trainers
(`export`). Knows nothing of mitmproxy."""
