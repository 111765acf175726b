"""The HTTP lease API (FastAPI, OpenAPI at ``/docs``), for processes that are not Python.

Every route needs ``Authorization: Bearer <PREFECT_MIG_API_TOKEN>``. Served by
``prefect-mig api serve``. A client that is not Python acquires, renews every TTL/3, and releases:

```
POST   /v1/leases                 {"request": {"profile": "1g.10gb", "priority": 5}, "timeout_s": 30}
POST   /v1/leases/{id}/renew      {"fence": 7, "ttl_s": 60}
DELETE /v1/leases/{id}?fence=7
GET    /v1/leases                 GET /v1/status
```

Examples:
    ```python
    from fastapi.testclient import TestClient
    from prefect_mig.allocator import Allocator
    from prefect_mig.api import create_app
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        alloc = Allocator(server.client(), "doc")
        alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
        http = TestClient(create_app(alloc, token="s3cret-token-for-docs"))
        auth = {"Authorization": "Bearer s3cret-token-for-docs"}
        got = http.post("/v1/leases", json={"request": {"profile": "4g.24gb"}}, headers=auth).json()
        assert got["slice"]["profile"] == "4g.24gb"
        assert http.delete(f"/v1/leases/{got['lease_id']}", params={"fence": got["fence"]}, headers=auth).json() == {"released": True}
    ```
"""


import secrets
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from prefect_mig import __version__
from prefect_mig.allocator import Allocator, LeaseInfo, SliceRequest
from prefect_mig.errors import (
    ConfigError,
    LeaseLost,
    LeaseNotOwned,
    NoCapacity,
    PrefectMigError,
    RedisUnavailable,
    Unsatisfiable,
    WaitTimeout,
)


class AcquireBody(BaseModel):
    request: SliceRequest
    timeout_s: float | None = Field(default=30.0, ge=0, le=3600, description="Seconds to wait; 0 = no wait.")


class RenewBody(BaseModel):
    fence: int = Field(ge=1)
    ttl_s: float = Field(default=60.0, ge=1, le=86_400)


_STATUS = {
    NoCapacity: 409,
    Unsatisfiable: 409,
    LeaseNotOwned: 409,
    LeaseLost: 410,
    WaitTimeout: 408,
    ConfigError: 422,
    RedisUnavailable: 503,
}


def create_app(allocator: Allocator, *, token: str) -> FastAPI:
    """The API over `allocator`, guarded by bearer `token`."""
    if not token or len(token) < 16:
        raise ConfigError("api_token: a bearer token of at least 16 characters is required.", field="api_token")
    app = FastAPI(title="prefect-mig lease API", version=__version__)
    bearer = HTTPBearer(auto_error=False)

    def authorized(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if creds is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(403, "wrong bearer token")

    @app.exception_handler(PrefectMigError)
    async def _mig_error(request, exc: PrefectMigError):  # noqa: ANN001
        code = next((c for cls, c in _STATUS.items() if isinstance(exc, cls)), 500)
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=code)

    guarded = [Depends(authorized)]

    @app.post("/v1/leases", dependencies=guarded, status_code=201, response_model=LeaseInfo)
    def acquire(body: AcquireBody) -> LeaseInfo:
        """Acquire a slice, waiting up to timeout_s (pushed, not polled)."""
        return allocator.acquire(body.request, timeout_s=body.timeout_s)

    @app.post("/v1/leases/{lease_id}/renew", dependencies=guarded)
    def renew(lease_id: str, body: RenewBody) -> dict[str, int]:
        return {"expires_at_ms": allocator.renew(lease_id, body.fence, body.ttl_s)}

    @app.delete("/v1/leases/{lease_id}", dependencies=guarded)
    def release(lease_id: str, fence: Annotated[int, Query(ge=1)]) -> dict[str, bool]:
        return {"released": allocator.release(lease_id, fence)}

    @app.get("/v1/leases", dependencies=guarded)
    def leases() -> list[dict[str, Any]]:
        return allocator.status()["leases"]

    @app.get("/v1/status", dependencies=guarded)
    def status() -> dict[str, Any]:
        return allocator.status()

    return app
