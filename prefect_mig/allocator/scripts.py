"""The allocator's Lua scripts: one per state transition, loaded once per Redis client.

Each ``lua/<name>.lua`` is prefixed with ``lua/_lib.lua`` (shared helpers: time, events, grant,
hand-off) and registered with redis-py's ``register_script``, which runs EVALSHA and reloads the
script on ``NOSCRIPT`` (after a restart or ``SCRIPT FLUSH``).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from prefect_mig.allocator.keys import Keys

NAMES = (
    "acquire",
    "release",
    "renew",
    "reap",
    "cancel",
    "touch_wait",
    "publish",
    "heartbeat",
    "drain",
    "set_quota",
)

#: KEYS order every script expects (see _lib.lua).
FIXED_KEYS = (
    "slices",
    "slice_state",
    "slice_lease",
    "slice_fence",
    "gpus",
    "gpu_busy",
    "nodes",
    "node_deadline",
    "pkeys",
    "leases",
    "fence",
    "seq",
    "requests",
    "waiting",
    "wait_deadline",
    "tenant_slices",
    "tenant_compute",
    "quotas",
    "events",
)


@cache
def source(name: str) -> str:
    lua = resources.files("prefect_mig.allocator").joinpath("lua")
    return lua.joinpath("_lib.lua").read_text() + "\n" + lua.joinpath(f"{name}.lua").read_text()


class Scripts:
    """The registered scripts of one client and namespace; call ``scripts.run(name, *args)``."""

    def __init__(self, client, keys: Keys, *, events_maxlen: int = 100_000) -> None:
        self.keys = keys
        self._key_list = [getattr(keys, name) for name in FIXED_KEYS]
        self._events_maxlen = events_maxlen
        self._scripts = {name: client.register_script(source(name)) for name in NAMES}

    def run(self, name: str, *args, now_ms: int | None = None, client=None):
        argv = [self.keys.prefix, "" if now_ms is None else int(now_ms), self._events_maxlen, *args]
        return self._scripts[name](keys=self._key_list, args=argv, client=client)
