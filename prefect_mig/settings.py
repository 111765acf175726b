"""Settings, read from the environment (prefix ``PREFECT_MIG_``) and a ``.env`` file.

This is the one place that reads the environment; everything else receives a `Settings`.

| variable | meaning |
|---|---|
| ``PREFECT_MIG_REDIS_URL`` | Redis holding leases; unset = a private embedded redis-server |
| ``PREFECT_MIG_REDIS_TLS_CA_FILE`` | with ``rediss://`` / ``rediss+sentinel://``: CA bundle that signed the servers' certificates |
| ``PREFECT_MIG_REDIS_TLS_CERT_FILE`` / ``..._KEY_FILE`` | with ``rediss://`` / ``rediss+sentinel://``: client certificate and key (mutual TLS) |
| ``PREFECT_MIG_REDIS_SENTINEL_USERNAME`` / ``..._PASSWORD`` | the Sentinels' own user and password (``requirepass``) |
| ``PREFECT_MIG_REDIS_REPLICAS`` | grants and renewals wait until this many replicas have them (``WAIT``; default 0) |
| ``PREFECT_MIG_REDIS_REPLICA_TIMEOUT_S`` | how long they wait for those replicas (default 1) |
| ``PREFECT_MIG_NAMESPACE`` | key namespace (hash tag) of one cluster inside that Redis |
| ``PREFECT_MIG_BACKEND`` | ``nvml`` (real GPUs), ``simulated`` or ``auto`` (nvml when a driver answers) |
| ``PREFECT_MIG_SIMULATED_FLEET`` | the simulated hardware, e.g. ``node-a=2xH100-80GB,node-b=1xA30-24GB`` |
| ``PREFECT_MIG_NODE`` | this host's node name (with the simulated backend: which fleet node it is) |
| ``PREFECT_MIG_STATE_DIR`` | directory where state lives (embedded Redis data, the simulated NVML's state file); relative = from the working directory |
| ``PREFECT_MIG_GPU_LOCK_DIR`` | where the agent and the demo lock each real GPU they serve (unset: ``/run/prefect-mig/gpu-locks`` when writable, and ``/tmp/prefect-mig-gpu-locks``) |
| ``PREFECT_MIG_DOCKER_HOST`` | Docker engine URL for task containers; unset = ``DOCKER_HOST`` or the local socket |
| ``PREFECT_MIG_DOCKER_TLS_CA_FILE`` / ``..._CERT_FILE`` / ``..._KEY_FILE`` | client certificates for ``tcp://`` engines started with ``--tlsverify`` |
| ``PREFECT_MIG_API_TOKEN`` | admin bearer token of the HTTP lease API (``prefect-mig api serve``) |
| ``PREFECT_MIG_API_MAX_WAIT_S`` | longest an HTTP acquire waits for a slice (default 300) |
| ``PREFECT_MIG_API_MAX_BODY_BYTES`` | larger HTTP request bodies get 413 (default 65536) |
| ``PREFECT_MIG_API_DOCS`` | serve ``/docs``, ``/redoc``, ``/openapi.json`` (behind the token; default off) |
| ``PREFECT_MIG_LAYOUTS_FILE`` | YAML file of named layout configs; unset = the shipped defaults |
| ``PREFECT_MIG_LAYOUT`` | config the agent carves GPUs without instances to (unset: the file's default; ``none``) |
| ``PREFECT_MIG_WAIT_TIMEOUT_S`` | how long a task waits for a slice unless its runner says (default 3600) |
| ``PREFECT_MIG_LEASE_MAX_TTL_S`` | the cluster's longest lease TTL (default 900 s); also how long a node keeps its idle slices quarantined after Redis lost its state |

Examples:
    ```python
    from prefect_mig.settings import Settings

    s = Settings(backend="simulated", simulated_fleet="node-a=1xA30-24GB")
    assert s.fleet().gpu_models("node-a") == ["A30-24GB"]
    ```
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from prefect_mig.errors import ConfigError
from prefect_mig.model import FleetSpec

DEFAULT_FLEET = "node-a=2xH100-80GB"


class Settings(BaseSettings):
    """prefect-mig's settings; every field can be set as ``PREFECT_MIG_<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="PREFECT_MIG_", env_file=".env", extra="ignore", validate_default=True
    )

    redis_url: str | None = Field(
        default=None,
        description="Redis URL (redis://, rediss://, or redis[s]+sentinel://host:port[,host:port...]/service[/db] "
        "for a replicated Redis watched by Sentinel, rediss+ with TLS) of the lease store; unset starts a "
        "private redis-server under the state dir.",
    )
    redis_tls_ca_file: Path | None = Field(default=None, description="rediss://: CA file of the server's certificate.")
    redis_tls_cert_file: Path | None = Field(default=None, description="rediss://: client certificate (mutual TLS).")
    redis_tls_key_file: Path | None = Field(default=None, description="rediss://: key of the client certificate.")
    redis_sentinel_username: str | None = Field(
        default=None, description="redis[s]+sentinel://: the Sentinels' own user (ACL), if they have one."
    )
    redis_sentinel_password: SecretStr | None = Field(
        default=None,
        description="redis[s]+sentinel://: the Sentinels' own password (their requirepass); the URL's "
        "?sentinel_password= wins over it.",
    )
    redis_replicas: int = Field(
        default=0, ge=0, le=16,
        description="With a replicated Redis (Sentinel): a grant or renewal counts only once this many "
        "replicas acknowledged it (WAIT), so a failover cannot lose a lease a holder was told about. 0: no wait.",
    )
    redis_replica_timeout_s: float = Field(
        default=1.0, gt=0, le=60, description="How long a grant or renewal waits for its replicas before it fails."
    )
    namespace: str = Field(
        default="default",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Namespace of this cluster's keys inside Redis (letters, digits, _ . -).",
    )
    backend: Literal["auto", "nvml", "simulated"] = Field(
        default="auto",
        description="GPU backend: nvml (real GPUs), simulated, or auto (nvml when a driver answers).",
    )
    simulated_fleet: str = Field(
        default=DEFAULT_FLEET,
        description="Simulated hardware for the simulated backend, e.g. "
        "'node-a=2xH100-80GB,node-b=1xA30-24GB'.",
    )
    node: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=63,
        description="This host's node name in the inventory.",
    )
    state_dir: Path = Field(
        default=Path.home() / ".prefect-mig",
        description="Directory for local state (embedded Redis data, simulated NVML state).",
    )
    gpu_lock_dir: Path | None = Field(
        default=None,
        description="Directory of the per-GPU lock files that keep a second agent (or the demo) off this host's "
        "real GPUs; unset: /run/prefect-mig/gpu-locks for root; other users lock in /tmp/prefect-mig-gpu-locks and "
        "refuse while root holds the GPU in /run.",
    )
    docker_host: str | None = Field(
        default=None,
        description="Docker engine URL for task containers; unset uses DOCKER_HOST or the local socket.",
    )
    docker_tls_ca_file: Path | None = Field(
        default=None, description="CA certificate (PEM) of Docker engines reached over tcp:// with --tlsverify."
    )
    docker_tls_cert_file: Path | None = Field(
        default=None, description="Client certificate (PEM) presented to tcp:// Docker engines (signed by their CA)."
    )
    docker_tls_key_file: Path | None = Field(default=None, description="Key (PEM) of the Docker client certificate.")
    wait_timeout_s: float = Field(
        default=3600.0,
        gt=0,
        le=30 * 86_400.0,  # the allocator's longest wait (allocator.MAX_WAIT_S)
        description="Seconds a task may wait for a slice when MigTaskRunner(wait_timeout_s=...) is not given.",
    )
    wait_ttl_s: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="Seconds a queued request may go without its waiter's touch (every third of this, at "
        "most every 2 s) before it is dropped as abandoned; generous, so a loaded machine does not drop live waiters.",
    )
    layouts_file: Path | None = Field(
        default=None,
        description="YAML file of named MIG layout configs (mig-parted style); unset uses the shipped defaults.",
    )
    layout: str | None = Field(
        default=None,
        min_length=1,
        description="Layout config the agent carves GPUs with MIG on and no instances to; unset = the "
        "file's default; 'none' carves nothing.",
    )
    api_token: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="Admin bearer token of the HTTP lease API (at least 16 characters); clients get "
        "their own with `prefect-mig api token create`.",
    )
    lease_max_ttl_s: float = Field(
        default=900.0,
        ge=1,
        le=86_400,
        description="The cluster's longest lease TTL in seconds: longer acquires and renewals are refused, "
        "and after Redis lost its state a node keeps its idle slices out of service this long.",
    )
    api_max_wait_s: float = Field(
        default=300.0, gt=0, le=86_400, description="Longest an HTTP acquire waits for a slice (seconds)."
    )
    api_max_body_bytes: int = Field(
        default=65_536, ge=1024, le=16 * 1024 * 1024, description="Larger HTTP request bodies are refused (413)."
    )
    api_docs: bool = Field(default=False, description="Serve /docs, /redoc and /openapi.json (behind the token).")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(redis|rediss|unix|rediss?\+sentinel)://", value):
            raise ValueError("must start with redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel://")
        return value

    @field_validator("state_dir", mode="before")
    @classmethod
    def _state_dir_is_a_directory(cls, value):
        # absolute, because the embedded redis-server reads the paths in its config from elsewhere
        if isinstance(value, str | os.PathLike) and not str(value).strip():
            raise ValueError("must be a directory (absolute, or relative to the working directory), not empty")
        path = Path(value).expanduser().absolute() if isinstance(value, str | os.PathLike) else value
        if isinstance(path, Path):
            existing = next(p for p in (path, *path.parents) if p.exists())
            if not existing.is_dir():
                raise ValueError(f"{existing} exists and is not a directory: name a directory (it is created if missing)")
        return path

    @field_validator("simulated_fleet")
    @classmethod
    def _fleet_parses(cls, value: str) -> str:
        FleetSpec.parse(value)
        return value

    def fleet(self) -> FleetSpec:
        return FleetSpec.parse(self.simulated_fleet)

    def layout_configs(self):
        """The layout configs: `layouts_file`, or the shipped defaults."""
        from prefect_mig.model.layout_configs import LayoutConfigs

        return LayoutConfigs.load(self.layouts_file)


def load_settings(**overrides) -> Settings:
    """Read the settings, turning a validation failure into a `ConfigError` that names the variable.

    Without `overrides` they are read once per process and read again when their sources change
    (a ``PREFECT_MIG_*`` variable, the working directory, its ``.env`` file): reading them costs
    milliseconds (tens under load), and a task try needs them more than once.
    `clear_settings_cache` forces the next call to read them.

    Raises:
        ConfigError: a variable holds a value that cannot be used.
    """
    global _cached
    if overrides:
        return _read_settings(overrides)
    sources, cached = _sources(), _cached
    if cached is not None and cached[0] == sources:
        return cached[1]
    settings = _read_settings({})
    _cached = (sources, settings)
    return settings


def clear_settings_cache() -> None:
    """The next `load_settings()` reads the settings again (e.g. after changing a file they name)."""
    global _cached
    _cached = None


_cached: tuple[tuple, Settings] | None = None  # (their sources, the settings read from them)


def _sources() -> tuple:
    env = tuple(sorted((k.upper(), v) for k, v in os.environ.items() if k.upper().startswith("PREFECT_MIG_")))
    cwd = os.getcwd()
    try:
        stat = os.stat(os.path.join(cwd, ".env"))
        dotenv: tuple | None = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    except OSError:
        dotenv = None
    return env, cwd, dotenv


def _read_settings(overrides: dict) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        reason = first["msg"].removeprefix("Value error, ").rstrip(".")
        field = Settings.model_fields.get(name)
        about = field.description if field is not None else ""
        value = first.get("input")
        if field is not None and "SecretStr" in str(field.annotation):  # never echo a secret
            if first["type"] == "too_short" and isinstance(value, str):
                reason = f"a token of at least {first['ctx']['min_length']} characters is required, not {len(value)}"
            value = "**********"
        elif name == "redis_url" and isinstance(value, str):  # its password
            from prefect_mig.allocator.connection import redacted

            value = redacted(value)
        raise ConfigError(
            f"PREFECT_MIG_{name.upper()}={value!r}: {reason}. ({about})",
            field=name,
            value=value,
        ) from exc
