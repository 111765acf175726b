"""Reaching a node's Docker engine: the local socket, an SSH tunnel's socket, or TCP with TLS.

A GPU host's agent publishes the URL runners reach its engine at (``PREFECT_MIG_DOCKER_HOST`` on that
host): ``unix:///var/run/docker.sock`` on one machine, or ``tcp://gpu-3.internal:2376`` for an engine
started with ``--tlsverify``. Runners and workers then present a client certificate signed by the
engines' CA (``PREFECT_MIG_DOCKER_TLS_CA_FILE``, ``..._CERT_FILE``, ``..._KEY_FILE``), the same
files ``docker --tlsverify`` uses; the engine refuses clients without one.

Examples:
    ```python
    from prefect_mig.launchers.engines import DockerTls, engine_client

    try:
        engine_client("tcp://127.0.0.1:1", tls=DockerTls(ca_file="ca.pem", cert_file="c.pem", key_file="k.pem"))
    except Exception as exc:  # ConfigError: docker_tls.ca_file: 'ca.pem' does not exist
        print(exc)
    ```
"""

from __future__ import annotations

from pathlib import Path

import docker
import docker.constants
import docker.tls
from pydantic import BaseModel, ConfigDict, Field

from prefect_mig.errors import ConfigError


class DockerTls(BaseModel):
    """Client certificate files for Docker engines that listen on TCP with ``--tlsverify``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: Path = Field(description="CA certificate (PEM) that signed the engines' server certificates.")
    cert_file: Path = Field(description="This client's certificate (PEM), signed by the CA the engines trust.")
    key_file: Path = Field(description="The key (PEM) of the client certificate.")

    def config(self) -> docker.tls.TLSConfig:
        """docker's `TLSConfig`: verify the engine against `ca_file`, present the client certificate.

        Raises:
            ConfigError: a file is missing (naming the field and path).
        """
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if not Path(path).is_file():
                raise ConfigError(
                    f"docker_tls.{name}: {str(path)!r} does not exist or is not a file; set "
                    f"PREFECT_MIG_DOCKER_TLS_{name.upper()} to the PEM file the engine's CA issued.",
                    field=f"docker_tls.{name}",
                    value=str(path),
                )
        return docker.tls.TLSConfig(client_cert=(str(self.cert_file), str(self.key_file)), ca_cert=str(self.ca_file), verify=True)


def docker_tls_from(settings) -> DockerTls | None:
    """The client certificates the settings name (all three, or none).

    Raises:
        ConfigError: only some of the three are set.
    """
    files = {
        "ca_file": settings.docker_tls_ca_file,
        "cert_file": settings.docker_tls_cert_file,
        "key_file": settings.docker_tls_key_file,
    }
    given = {k: v for k, v in files.items() if v is not None}
    if not given:
        return None
    if len(given) < 3:
        missing = ", ".join(f"PREFECT_MIG_DOCKER_TLS_{k.upper()}" for k in files if k not in given)
        raise ConfigError(
            f"docker TLS: {missing} not set; a TLS client needs the CA, its certificate and its key.",
            field="docker_tls_" + next(k for k in files if k not in given),
            value=None,
        )
    return DockerTls(**given)


def engine_client(url: str, *, tls: DockerTls | None = None, timeout: int = 30) -> docker.DockerClient:
    """A client of the engine at `url`; ``tcp://`` URLs use `tls` when given (unix sockets never do)."""
    if tls is None or not url.startswith(("tcp://", "https://")):
        return docker.DockerClient(base_url=url, timeout=timeout, tls=False)
    # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's own CA (psf/requests#3829),
    # so the client must not read the environment, also not while docker asks the engine's API
    # version in its constructor: ask it first with a client pinned to the oldest version
    config = tls.config()
    probe = docker.DockerClient(base_url=url, timeout=timeout, tls=config, version=docker.constants.MINIMUM_DOCKER_API_VERSION)
    probe.api.trust_env = False
    try:
        version = probe.version(api_version=False)["ApiVersion"]
    finally:
        probe.close()
    client = docker.DockerClient(base_url=url, timeout=timeout, tls=config, version=version)
    client.api.trust_env = False
    return client
