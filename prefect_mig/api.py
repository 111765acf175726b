"""The HTTP lease API (FastAPI), for processes that are not Python.

Every request needs ``Authorization: Bearer <token>``, checked before its body is read. A token is
either the shared admin token ``PREFECT_MIG_API_TOKEN`` or a per-client token made with
``prefect-mig api token create --tenant team-a --max-priority 50``: a client token leases only as its
tenant, up to its priority ceiling, and may renew or release only the leases it took (with their
fence); the admin token may do anything, including revoking a lease without its fence. Fences appear
only in the acquire reply to the client that took the lease; listings and errors never show them.

Served by ``prefect-mig api serve``. A client acquires, renews every TTL/3, and releases:

```
POST   /v1/leases                 {"request": {"profile": "1g.10gb", "priority": 5}, "timeout_s": 30}
POST   /v1/leases/{id}/renew      {"fence": 7, "ttl_s": 60}    (no ttl_s: the lease's own TTL)
DELETE /v1/leases/{id}?fence=7
GET    /v1/leases                 GET /v1/status
GET    /metrics                   (Prometheus text format; admin token only, see prefect_mig.metrics)
```

Every error body is ``{"error": <kind>, "detail": <message>}`` (a malformed body's 422: ``detail`` is
the list of its field errors).

A waiting acquire holds no server thread; it waits at most ``max_wait_s`` (``PREFECT_MIG_API_MAX_WAIT_S``)
and is withdrawn the moment its client disconnects (a grant that races the disconnect is released).
A grant, made at once or after a wait, is answered only to a client still connected: one whose client
has gone (it closed right after asking, or gave up while the store was slow) is released at once, not
held for its TTL with a fence nobody read. A client that leaves after its reply was written keeps its
lease: the fence was sent to it.

Examples:
    ```python
    from fastapi.testclient import TestClient
    from prefect_mig.allocator import Allocator
    from prefect_mig.api import create_app
    from prefect_mig.testing.redis_server import RedisServer

    with RedisServer() as server:
        alloc = Allocator(server.client(), "doc")
        alloc.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]})
        with TestClient(create_app(alloc, token="s3cret-token-for-docs")) as http:
            auth = {"Authorization": "Bearer s3cret-token-for-docs"}
            got = http.post("/v1/leases", json={"request": {"profile": "4g.24gb"}}, headers=auth).json()
            assert got["slice"]["profile"] == "4g.24gb"
            gone = http.delete(f"/v1/leases/{got['lease_id']}", params={"fence": got["fence"]}, headers=auth)
            assert gone.json() == {"released": True}
    ```
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from contextlib import suppress
from functools import partial
from typing import Annotated, Any

import anyio
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefect_mig import __version__
from prefect_mig.allocator import Allocator, LeaseInfo, SliceRequest
from prefect_mig.allocator.models import lease_row_numbers
from prefect_mig.allocator.redis_io import redis_errors
from prefect_mig.allocator.tokens import TokenGrant, check, split_token
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
from prefect_mig.metrics import CONTENT_TYPE_LATEST, registry_for, render

ADMIN = TokenGrant(token_id="admin", tenant="default", max_priority=100, admin=True)


class AcquireBody(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt "timeout" must not wait the default

    request: SliceRequest
    timeout_s: float | None = Field(
        default=30.0, ge=0, le=86_400, allow_inf_nan=False, description="Seconds to wait (capped by the server's maximum); 0 = no wait."
    )


class RenewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt "ttl" must not renew for the default

    fence: int = Field(ge=1)
    ttl_s: float | None = Field(
        default=None, ge=1, le=86_400, allow_inf_nan=False, description="New TTL in seconds; unset: the lease's own (granted or last renewed with)."
    )


log = logging.getLogger(__name__)

#: The ``error`` of a refusal that is not one of prefect-mig's own errors, by status.
_HTTP_ERROR = {401: "Refused", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed", 413: "Refused",
               422: "InvalidRequest", 503: "Refused"}

_STATUS = {
    NoCapacity: 409,
    Unsatisfiable: 409,
    LeaseNotOwned: 409,
    LeaseLost: 410,
    WaitTimeout: 408,
    ConfigError: 422,
    RedisUnavailable: 503,
}


def _json_safe(value: Any) -> Any:
    """`value` with each non-finite float written as the JSON literal it came in as (``NaN``,
    ``Infinity``, ``-Infinity``), so a 422 that echoes such an input can itself be sent as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _name_allowed(errors: list[dict[str, Any]], body: type[BaseModel], highest: dict[str, float]) -> list[dict[str, Any]]:
    """`errors` with each unknown field's message naming the fields its object allows, and each
    non-finite number's naming its field, its value and the range allowed (up to `highest` for the
    fields it names, else the model's bound)."""
    for error in errors:
        names = [part for part in error["loc"] if part != "body"]
        model: Any = body
        for part in names[:-1]:
            field = model.model_fields.get(part) if isinstance(part, str) else None
            model = field.annotation if field else None
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                break
        else:
            if error["type"] == "extra_forbidden" and names:
                error["msg"] = f"unknown field {names[-1]!r}; allowed: {', '.join(model.model_fields)}"
            elif error["type"] == "finite_number" and names and names[-1] in model.model_fields:
                bounds = {k: getattr(m, k) for m in model.model_fields[names[-1]].metadata for k in ("ge", "gt", "le") if hasattr(m, k)}
                bounds["le"] = highest.get(names[-1], bounds["le"])
                lowest = f"{bounds['ge']:g}" if "ge" in bounds else f"more than {bounds['gt']:g}"
                error["msg"] = (f"{names[-1]} must be a finite number, not {_json_safe(error['input'])}; "
                                f"allowed: {lowest} to {bounds['le']:g}")
                error["ctx"] = bounds
    return errors


_FENCE_REQUIRED = "fence: required (only an admin token may revoke a lease without it)."
def _detail(exc: PrefectMigError) -> str:
    if isinstance(exc, LeaseNotOwned):  # never echo a fence: it is what a release needs
        return f"lease {exc.lease_id}: stale or not yours."
    if isinstance(exc, RedisUnavailable):  # the store's address is not the client's business
        return "the lease store did not answer or refused the change; try again shortly (the API server's log says why)."
    return str(exc)


async def _reply(send, status: int, detail: str, **headers: str) -> None:  # noqa: ANN001
    body = json.dumps({"error": "Refused", "detail": detail}).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *extra]})
    await send({"type": "http.response.body", "body": body})


class _Gate:
    """ASGI middleware: the token is checked, and the body capped, before anything reads the body."""

    def __init__(self, app, *, authenticate, max_body_bytes: int) -> None:  # noqa: ANN001
        self.app = app
        self.authenticate = authenticate
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, credential = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            return await _reply(send, 401, "missing bearer token", **{"WWW-Authenticate": "Bearer"})
        try:
            grant = await self.authenticate(credential.strip())
        except RedisUnavailable as exc:
            return await _reply(send, 503, _detail(exc))
        if grant is None:
            return await _reply(send, 401, "unknown or revoked bearer token", **{"WWW-Authenticate": 'Bearer error="invalid_token"'})
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            return await _reply(send, 413, f"request body over {self.max_body_bytes} bytes")
        body, more = b"", True
        while more:  # read at most the limit (a chunked body may not declare its length)
            message = await receive()
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await _reply(send, 413, f"request body over {self.max_body_bytes} bytes")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        scope.setdefault("state", {})["grant"] = grant
        await self.app(scope, replay, send)


#: what an asyncio Sentinel client takes over from the sync one (TLS files included: rediss+sentinel://)
_ASYNC_SENTINEL_KWARGS = (
    "db", "username", "password", "socket_timeout", "socket_connect_timeout",
    "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname",
)


def _async_client(client) -> redis.asyncio.Redis:  # noqa: ANN001
    """An asyncio client to the same server (same address, credentials and TLS) as `client`."""
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):  # the primary Sentinel names, followed
        manager = pool.sentinel_manager
        sentinels = [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
                     for s in manager.sentinels]
        kwargs = {k: v for k, v in pool.connection_kwargs.items() if k in _ASYNC_SENTINEL_KWARGS}
        if issubclass(pool.connection_class, redis.connection.SSLConnection):
            kwargs["ssl"] = True
        return redis.asyncio.sentinel.Sentinel(sentinels, sentinel_kwargs=manager.sentinel_kwargs).master_for(
            pool.service_name, **kwargs
        )
    kwargs = dict(pool.connection_kwargs)
    kind = getattr(redis.asyncio.connection, pool.connection_class.__name__, redis.asyncio.Connection)
    return redis.asyncio.Redis(connection_pool=redis.asyncio.ConnectionPool(connection_class=kind, **kwargs))


async def _disconnected(receive) -> None:  # noqa: ANN001
    while (await receive())["type"] != "http.disconnect":
        pass


async def _left(receive) -> bool:  # noqa: ANN001
    """Whether the client has disconnected, without waiting (as Starlette's `Request.is_disconnected`)."""
    with anyio.CancelScope() as now_only:
        now_only.cancel()  # a receive that would wait is cancelled: nothing has happened yet
        return (await receive())["type"] == "http.disconnect"
    return False


class _Granted(JSONResponse):
    """The acquire's 201 reply (the lease, with its fence), sent only to a client still connected:
    `drop` releases the lease when the client has gone or the reply could not be sent."""

    def __init__(self, lease: LeaseInfo, drop) -> None:  # noqa: ANN001
        super().__init__(lease.model_dump(mode="json"), status_code=201)
        self.drop = drop

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        # The last check comes right before the first byte is written, with no await between them that
        # yields to the server: the server learns of a disconnect only in a callback of the event loop,
        # and its `send` drops a reply to a connection it knows closed, so a reply the check let through
        # is written to the socket. A grant therefore ends released (the check saw the client gone, or
        # the send failed) or written to the client, never both unreleased and unsent. What remains: a
        # client that closes after the bytes are written, before reading them (or in the microseconds
        # between check and write) loses its fence; its lease lapses at its TTL or an admin revokes it.
        # Checking after the send would be wrong: a client may close as soon as it has read its reply.
        if await _left(receive):
            return await self.drop()
        try:
            await super().__call__(scope, receive, send)
        except BaseException:
            await asyncio.shield(self.drop())
            raise


def create_app(
    allocator: Allocator,
    *,
    token: str,
    max_wait_s: float = 300.0,
    max_body_bytes: int = 65_536,
    docs: bool = False,
) -> FastAPI:
    """The API over `allocator`; `token` is the admin token (see the module docstring)."""
    if not token or len(token) < 16:
        raise ConfigError("api_token: a bearer token of at least 16 characters is required.", field="api_token")
    app = FastAPI(
        title="prefect-mig lease API",
        version=__version__,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    aredis = _async_client(allocator.redis)
    tokens_key = allocator.keys.api_tokens
    # acquires run their short Redis calls on their own few threads, so renew/release never queue behind them
    acquire_threads = anyio.CapacityLimiter(8)

    async def off_thread(fn, *args, **kwargs):  # noqa: ANN001, ANN202
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=acquire_threads)

    async def authenticate(credential: str) -> TokenGrant | None:
        if secrets.compare_digest(credential.encode(), token.encode()):
            return ADMIN
        parts = split_token(credential)
        if parts is None:
            return None
        with redis_errors("check an API token"):
            record = await aredis.hget(tokens_key, parts[0])
        return check(record, parts[1], parts[0])

    app.add_middleware(_Gate, authenticate=authenticate, max_body_bytes=max_body_bytes)

    @app.exception_handler(PrefectMigError)
    async def _mig_error(request, exc: PrefectMigError):  # noqa: ANN001
        code = next((c for cls, c in _STATUS.items() if isinstance(exc, cls)), 500)
        if isinstance(exc, RedisUnavailable):  # the client is not told the store's address or its refusal: the operator is
            log.warning("%s %s answered 503: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": type(exc).__name__, "detail": _detail(exc)}, status_code=code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):  # noqa: ANN001
        # FastAPI's own handler, except that inputs such as ``"ttl_s": NaN`` (which Python's JSON
        # parser accepts) are echoed as strings: otherwise writing the 422 itself fails (a 500)
        body = RenewBody if request.url.path.endswith("/renew") else AcquireBody
        errors = _name_allowed(jsonable_encoder(exc.errors()), body, highest={"ttl_s": allocator.max_ttl_s})
        for error in errors:  # the models' bound is a day; this cluster's is what a client can use
            if error["loc"][-1:] == ["ttl_s"] and error["type"] == "less_than_equal":
                error["msg"] = (f"Input should be at most {allocator.max_ttl_s:g} s, this cluster's longest lease "
                                "(PREFECT_MIG_LEASE_MAX_TTL_S)")
                error["ctx"] = {"le": allocator.max_ttl_s}
        return JSONResponse({"error": "InvalidRequest", "detail": _json_safe(errors)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _refused(request, exc: StarletteHTTPException):  # noqa: ANN001
        # one shape for every error body, as `_mig_error` and the gate write it
        return JSONResponse({"error": _HTTP_ERROR.get(exc.status_code, "Refused"), "detail": exc.detail},
                            status_code=exc.status_code, headers=exc.headers)

    def grant_of(request: Request) -> TokenGrant:
        return request.scope["state"]["grant"]

    def holder(grant: TokenGrant, client_holder: str) -> str:
        return f"api:{grant.token_id}" + (f"/{client_holder}" if client_holder else "")

    def owned(grant: TokenGrant, lease_holder: str) -> bool:
        return grant.admin or lease_holder == f"api:{grant.token_id}" or lease_holder.startswith(f"api:{grant.token_id}/")

    def as_client(grant: TokenGrant, request: SliceRequest) -> SliceRequest:
        if not grant.admin:
            if "tenant" in request.model_fields_set and request.tenant != grant.tenant:
                raise HTTPException(
                    403, f"request.tenant={request.tenant!r}: this token leases only as tenant {grant.tenant!r}."
                )
            if request.priority > grant.max_priority:
                raise HTTPException(
                    403, f"request.priority={request.priority}: this token's ceiling is {grant.max_priority}."
                )
        tenant = request.tenant if grant.admin else grant.tenant
        return request.model_copy(update={"tenant": tenant, "holder": holder(grant, request.holder)})

    async def drop(lease: LeaseInfo) -> None:
        """Release a lease whose client has gone (a stale fence: it lapsed and is someone else's now)."""
        with suppress(LeaseLost, LeaseNotOwned):
            try:
                await off_thread(allocator.release, lease.lease_id, lease.fence)
            except RedisUnavailable:  # released once Redis answers, not held for its TTL by nobody
                allocator.abandon(lease.lease_id)

    async def withdraw(request_id: str) -> None:
        with suppress(LeaseLost, LeaseNotOwned):  # a grant in the last instant is released
            await off_thread(allocator.give_up, request_id)

    # Every waiting acquire's request is kept alive by one task, in one round trip every TTL/3, instead
    # of each waiter waking to touch its own: with 1,000 waiters that was 1,000 wake-ups a second that
    # renew and release competed with. A waiter wakes when its grant is pushed, its client leaves, its
    # deadline passes, or the keeper found its request granted or gone (`stirred`).
    touch_every = max(0.05, min(2.0, allocator.wait_ttl_ms / 3000))  # as `Allocator.wait_for_grant` touches
    # a BLPOP must end before the async client's socket timeout gives up on its reply
    socket_timeout = allocator.redis.connection_pool.connection_kwargs.get("socket_timeout") or 30.0
    pop_every = max(0.05, min(25.0, float(socket_timeout) - 2.0))
    stirred: dict[str, asyncio.Event] = {}
    keeper: list[asyncio.Task] = []

    async def keep_waiting() -> None:
        while stirred:
            await asyncio.sleep(touch_every)
            ids = list(stirred)
            try:
                states = await off_thread(allocator.keep_many_waiting, ids)
            except RedisUnavailable:
                continue  # the waiters' own BLPOPs fail and end their waits
            for request_id, state in states.items():
                if state != "waiting" and request_id in stirred:
                    stirred[request_id].set()

    async def wait_for_grant(
        request_id: str, timeout_s: float, deadline: float, receive, wanted: SliceRequest  # noqa: ANN001
    ) -> LeaseInfo:
        waiter = allocator.keys.waiter(request_id)
        began = time.monotonic()
        gone = asyncio.ensure_future(_disconnected(receive))
        stir = stirred[request_id] = asyncio.Event()
        if not keeper or keeper[0].done() or keeper[0].get_loop() is not asyncio.get_running_loop():
            keeper[:] = [asyncio.ensure_future(keep_waiting())]
        try:
            while not gone.done():
                chunk = min(pop_every, deadline - time.monotonic())
                if chunk <= 0:
                    break
                pop = asyncio.ensure_future(aredis.blpop([waiter], timeout=chunk))
                stirring = asyncio.ensure_future(stir.wait())
                await asyncio.wait({pop, gone, stirring}, return_when=asyncio.FIRST_COMPLETED)
                stirring.cancel()
                if not pop.done():  # the client left, or the keeper found the request granted or gone
                    pop.cancel()
                    with suppress(BaseException):
                        await pop
                    if gone.done():
                        break
                    stir.clear()
                    state = await off_thread(allocator.keep_waiting, request_id)
                    if state == "granted":
                        claimed = await off_thread(allocator.claim, request_id, wanted)
                        if claimed is not None and not gone.done():  # else the loop ends and withdraws it
                            return claimed
                    if state == "gone":
                        why = await off_thread(allocator.why_gone, began)
                        raise LeaseLost(f"request {request_id} is no longer queued{why}", reason="gone", lease_id=request_id)
                    continue
                with redis_errors("wait for a slice"):
                    popped = pop.result()
                if popped:
                    if gone.done():
                        break
                    claimed = await off_thread(allocator.claim, request_id, wanted)  # a hand-over lives 1 s unclaimed
                    if claimed is not None and not gone.done():  # the client left during the claim: withdrawn below
                        return claimed
                    continue  # it went back before the claim: queued again
        except asyncio.CancelledError:
            await asyncio.shield(withdraw(request_id))
            raise
        except PrefectMigError:  # Redis failed or refused a write (RedisUnavailable), or the request is gone
            allocator.abandon(request_id)  # it leaves the queue once Redis answers; a grant made meanwhile is released
            raise
        finally:
            gone.cancel()
            stirred.pop(request_id, None)
        left = gone.done() and not gone.cancelled()
        waited = "" if left else await off_thread(why_waited, request_id)  # read while it is still queued
        await withdraw(request_id)
        why = "the client disconnected" if left else f"no slice within {timeout_s:g} s"
        raise WaitTimeout(f"{why}; the request was withdrawn from the queue.{waited}", lease_id=request_id)

    def why_waited(request_id: str) -> str:
        """`` It waited because: ...`` as the CLI says it, less the queue position (its length
        counts other tenants' requests, which a client token does not see)."""
        from prefect_mig.allocator.health import wait_reasons

        try:
            reasons = [r for r in wait_reasons(allocator, request_id) if not r.startswith("position ")]
        except PrefectMigError:
            return ""
        return f" It waited because: {'; '.join(reasons) or 'every matching slice is leased'}."

    async def acquire_body(request: Request) -> AcquireBody:
        """The acquire body; a `gpu_model` this process does not know yet may be one a node agent
        built from NVML and published since the server started: load those, then check again."""
        try:
            raw = await request.json()
        except ValueError:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "the body is not JSON", "input": None}])
        try:
            return AcquireBody.model_validate(raw)
        except ValidationError as exc:
            if not any("gpu_model" in error["loc"] for error in exc.errors()):
                raise RequestValidationError(exc.errors()) from None
        await off_thread(allocator.load_models)
        try:
            return AcquireBody.model_validate(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None

    @app.post(
        "/v1/leases", status_code=201, response_model=LeaseInfo,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": AcquireBody.model_json_schema(ref_template="#/components/schemas/{model}")}}}},
    )
    async def acquire(request: Request, body: AcquireBody = Depends(acquire_body)) -> Response:  # noqa: B008
        """Acquire a slice, waiting up to timeout_s (pushed, not polled; capped by the server)."""
        wanted = as_client(grant_of(request), body.request)
        timeout_s = max_wait_s if body.timeout_s is None else min(body.timeout_s, max_wait_s)
        deadline = time.monotonic() + timeout_s  # Redis drops the request, never grants it, after this
        got = await off_thread(allocator.try_acquire, wanted, wait=timeout_s > 0, wait_s=timeout_s)
        if not isinstance(got, LeaseInfo):
            got = await wait_for_grant(got.request_id, timeout_s, deadline, request.receive, wanted)
        return _Granted(got, partial(drop, got))

    def own_lease(request: Request, lease_id: str) -> LeaseInfo:
        lease = allocator.lease(lease_id)
        if not owned(grant_of(request), lease.holder):
            raise LeaseNotOwned("not yours", lease_id=lease_id)
        return lease

    @app.get("/v1/leases/{lease_id}")
    def one_lease(request: Request, lease_id: str) -> dict[str, Any]:
        """One lease this token took (any, for the admin token), without its fence: ``revoked`` is
        true once it was revoked (stop the job: the slice goes on when you let go, or after the
        grace); 410 once it is gone. A holder polls this to learn of a revocation without renewing."""
        return own_lease(request, lease_id).model_dump(mode="json", exclude={"fence"})

    @app.post("/v1/leases/{lease_id}/renew")
    def renew(request: Request, lease_id: str, body: RenewBody) -> dict[str, int]:
        own_lease(request, lease_id)
        return {"expires_at_ms": allocator.renew(lease_id, body.fence, body.ttl_s)}

    @app.delete("/v1/leases/{lease_id}")
    def release(
        request: Request, lease_id: str, fence: Annotated[int | None, Query(ge=1, description="Admins may omit it.")] = None
    ) -> dict[str, Any]:
        fenceless = fence is None and not grant_of(request).admin
        try:
            lease = own_lease(request, lease_id)
        except LeaseLost:
            if fenceless:  # a mistake whether or not the lease still exists
                raise HTTPException(422, _FENCE_REQUIRED) from None
            return {"released": False}
        if fenceless:
            raise HTTPException(422, _FENCE_REQUIRED)
        if fence is None:  # an admin: revoke
            # not released here: the holder may still use the slice; it is told and stops, as when preempted
            expires_at = allocator.revoke(lease.lease_id)
            return {"released": False, "revoked": expires_at is not None, "expires_at": expires_at}
        return {"released": allocator.release(lease_id, fence)}

    def visible(request: Request, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        grant = grant_of(request)
        shown = [lease_row_numbers({k: v for k, v in row.items() if k != "fence"}) for row in rows]
        return shown if grant.admin else [row for row in shown if row.get("tenant", "default") == grant.tenant]

    @app.get("/v1/leases")
    def leases(request: Request) -> list[dict[str, Any]]:
        """The leases this token may see (its tenant's; all for an admin), without fences."""
        return visible(request, allocator.status()["leases"])

    @app.get("/v1/status")
    def status(request: Request) -> dict[str, Any]:
        snapshot = allocator.status()
        grant = grant_of(request)
        leases = visible(request, snapshot["leases"])
        if grant.admin:
            return {**snapshot, "leases": leases}
        # another tenant's slices show as leased, without the lease id; its waits are not shown
        own = {row["lease_id"] for row in leases}
        slices = [{**row, "lease": row["lease"] if row["lease"] in own else None} for row in snapshot["slices"]]
        queue = [row for row in snapshot["queue"] if row.get("tenant") == grant.tenant]
        return {**snapshot, "slices": slices, "leases": leases, "queue": queue}

    metrics_registry = registry_for(allocator)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        """The cluster's Prometheus metrics (`prefect_mig.metrics`); admin token only: they name every tenant."""
        if not grant_of(request).admin:
            raise HTTPException(403, "/metrics needs the admin token (the metrics name every tenant).")
        return Response(render(allocator, metrics_registry), media_type=CONTENT_TYPE_LATEST)

    return app
