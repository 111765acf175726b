"""Redis failures as the project's own error: `redis_errors` wraps every call the allocator and its
clients make, so an outage or a refusal reads as `RedisUnavailable` naming what was being done."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import redis
import redis.asyncio.sentinel
import redis.sentinel

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
    except (redis.sentinel.MasterNotFoundError, redis.asyncio.sentinel.MasterNotFoundError) as exc:
        raise RedisUnavailable(f"Redis could not be reached to {action}: {no_primary(exc)}") from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailable(
            f"Redis did not answer while trying to {action} ({exc.__class__.__name__}: {exc}). "
            "Check PREFECT_MIG_REDIS_URL and that redis-server runs."
        ) from exc
    except redis.exceptions.NoPermissionError as exc:
        raise RedisUnavailable(
            f"Redis refused to {action}: prefect-mig's Redis user lacks a right ({exc}). Give it the "
            "rights in prefect_mig.allocator.connection.MINIMAL_ACL (README, \"A shared Redis\")."
        ) from exc
    except redis.RedisError as exc:
        raise RedisUnavailable(
            f"Redis refused to {action} ({exc.__class__.__name__}: {exc}). "
            "Check the server's memory (maxmemory), long scripts, and that it is a primary."
        ) from exc


def no_primary(exc: Exception) -> str:
    """What a Sentinel lookup that found no primary means, in a line: the service, each Sentinel
    asked and how it failed, and what to check (redis-py's own message repeats every Sentinel
    client's full connection settings).

    Examples:
        ```python
        import redis.sentinel
        from prefect_mig.allocator.redis_io import no_primary

        why = no_primary(redis.sentinel.MasterNotFoundError("No master found for 'pmig'"))
        assert why.startswith("no Sentinel named a primary for service 'pmig'")
        ```
    """
    head, _, asked = str(exc).partition(" : ")
    service = head.removeprefix("No master found for ")
    where = re.findall(r"host=([^,]+),port=(\d+)", asked)
    how = re.findall(r"\)> - (\w[\w:]*)", asked)
    tried = [f"{host}:{port}" + (f" ({how[i]})" if i < len(how) else "") for i, (host, port) in enumerate(where)]
    said = f"; asked {', '.join(tried)}" if tried else " (the Sentinels that answered know no such service, or its primary is down)"
    return (
        f"no Sentinel named a primary for service {service}{said}. Check the Sentinel addresses and the "
        "service name in PREFECT_MIG_REDIS_URL, the Sentinels' own password (sentinel_password) and TLS "
        "(rediss+sentinel://), and that the Sentinels run."
    )
