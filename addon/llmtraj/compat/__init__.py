"""Drop-ins for the proxies RL frameworks ship, backed by llm-traj (`verl`: the
SWE-agent recipe's ModelProxy)."""
