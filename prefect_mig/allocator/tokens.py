"""Per-client bearer tokens of the HTTP lease API, kept hashed in Redis.

A token reads ``pmig_<id>.<secret>``; Redis holds only the id, what the token may do (its tenant,
its priority ceiling, whether it is an admin) and the SHA-256 of the secret, so a copy of the Redis
data does not reveal a usable token. Revoking deletes the record; the next request with it is refused.

Examples:
    ```python
    from prefect_mig.allocator.tokens import TokenStore
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        store = TokenStore(server.client(), "doc")
        secret, grant = store.create(tenant="team-a", max_priority=50)
        assert store.verify(secret) == grant and grant.tenant == "team-a"
        assert [g.token_id for g in store.list()] == [grant.token_id]
        assert store.revoke(grant.token_id) and store.verify(secret) is None
    ```
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import redis
from pydantic import BaseModel, Field

from prefect_mig.allocator.redis_io import redis_errors
from prefect_mig.allocator.keys import Keys
from prefect_mig.allocator.models import PRIORITY_MAX, PRIORITY_MIN, Name, decode

PREFIX = "pmig_"


class TokenGrant(BaseModel):
    """What one API token may do (never its secret)."""

    token_id: str
    tenant: Name
    max_priority: int = Field(ge=PRIORITY_MIN, le=PRIORITY_MAX)
    admin: bool = False
    created_at: float = 0.0


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """``(token_id, secret)`` of a ``pmig_<id>.<secret>`` token, else ``None``."""
    if not token.startswith(PREFIX) or "." not in token:
        return None
    token_id, _, secret = token[len(PREFIX):].partition(".")
    return (token_id, secret) if token_id.isalnum() and secret else None


def check(record: bytes | str | None, secret: str, token_id: str) -> TokenGrant | None:
    """The grant a stored `record` gives `secret`, or ``None`` (no record, wrong secret)."""
    if not record:
        return None
    fields = json.loads(decode(record))
    if not secrets.compare_digest(fields.pop("sha256").encode(), _digest(secret).encode()):
        return None
    return TokenGrant(token_id=token_id, **fields)


class TokenStore:
    """Create, verify, list and revoke API tokens of one cluster (see the module example)."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.redis = client
        self.key = Keys(namespace).api_tokens

    def create(self, *, tenant: str, max_priority: int = PRIORITY_MAX, admin: bool = False) -> tuple[str, TokenGrant]:
        """A new token: ``(the secret token, shown once, its grant)``."""
        grant = TokenGrant(
            token_id=secrets.token_hex(6), tenant=tenant, max_priority=max_priority, admin=admin, created_at=time.time()
        )
        secret = secrets.token_urlsafe(32)
        record = {**grant.model_dump(exclude={"token_id"}), "sha256": _digest(secret)}
        with redis_errors("store an API token"):
            self.redis.hset(self.key, grant.token_id, json.dumps(record))
        return f"{PREFIX}{grant.token_id}.{secret}", grant

    def verify(self, token: str) -> TokenGrant | None:
        """The grant of `token`, or ``None`` when it is unknown, revoked or wrong."""
        parts = split_token(token)
        if parts is None:
            return None
        with redis_errors("check an API token"):
            record = self.redis.hget(self.key, parts[0])
        return check(record, parts[1], parts[0])

    def list(self) -> list[TokenGrant]:
        """Every token's grant, oldest first (no secrets)."""
        with redis_errors("list the API tokens"):
            rows = self.redis.hgetall(self.key)
        grants = []
        for token_id, raw in rows.items():
            fields = json.loads(decode(raw))
            fields.pop("sha256")
            grants.append(TokenGrant(token_id=decode(token_id), **fields))
        return sorted(grants, key=lambda g: g.created_at)

    def revoke(self, token_id: str) -> bool:
        """Delete the token; False when there was none with that id."""
        with redis_errors("revoke an API token"):
            return bool(self.redis.hdel(self.key, token_id))
