"""Where LLM calls go: the upstream config (`config`), the registry made of it
(`registry`) and the client that forwards with retries and timeouts (`client`)."""
