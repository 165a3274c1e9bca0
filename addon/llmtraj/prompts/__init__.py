"""The prompt registry: versioned system prompts, matching a call's system prompt to them, overrides and A/B."""
