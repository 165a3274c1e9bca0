"""llm-traj on Ray (the optional extra `ray`): `ProxyPool` runs proxies as Ray
actors, one per slot of the cluster it is given, for thousands of agent
sessions and one trainer. See `pool.py`."""

from .pool import ProxyPool, SessionHandle

__all__ = ["ProxyPool", "SessionHandle"]
