"""Redis failures as the project's own error: `redis_errors` wraps every call the allocator and its
clients make, so an outage or a refusal reads as `RedisUnavailable` naming what was being done."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from prefect_mig.allocator.scripts import DeadlinePassed
from prefect_mig.errors import RedisUnavailable


@contextmanager
def redis_errors(action: str) -> Iterator[None]:
    """Turn any Redis failure into `RedisUnavailable` that names what was being done: no answer,
    and refusals too (OOM under ``maxmemory``, BUSY, READONLY after a failover, NOPERM), which a
    holder must treat like an outage rather than die on."""
    try:
        yield
    except DeadlinePassed:
        raise  # the caller's own deadline, not an outage
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailable(
            f"Redis did not answer while trying to {action} ({exc.__class__.__name__}: {exc}). "
            "Check PREFECT_MIG_REDIS_URL and that redis-server runs."
        ) from exc
    except redis.RedisError as exc:
        raise RedisUnavailable(
            f"Redis refused to {action} ({exc.__class__.__name__}: {exc}). "
            "Check the server's memory (maxmemory), long scripts, and that it is a primary."
        ) from exc
