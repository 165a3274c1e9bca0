"""Token-exact capture for RL: asking the engine for token ids and logprobs and
hiding them from the agent again (`capture`), the normalised `tokens` field of
a record (`normalise`), what the record writer makes of a captured call
(`recording`), whether a session's calls extend one another and their linear
chains (`continuity`), and sampling control per route (`sampling`). The rows
for trainers are an export format (`inspect.export.tokens`). Knows nothing of
mitmproxy."""
