"""Reaching a node's Docker engine: the local socket, an SSH tunnel's socket, or TCP with TLS.

A GPU host's agent publishes the URL runners reach its engine at (``PREFECT_MIG_DOCKER_HOST`` on that
host): ``unix:///var/run/docker.sock`` on one machine, or ``tcp://gpu-3.internal:2376`` for an engine
started with ``--tlsverify``. Runners and workers then present a client certificate signed by the
engines' CA (``PREFECT_MIG_DOCKER_TLS_CA_FILE``, ``..._CERT_FILE``, ``..._KEY_FILE``), the same
files ``docker --tlsverify`` uses; the engine refuses clients without one. A ``MigCluster`` block can
carry the same three as secrets instead (``docker_tls_ca``, ``docker_tls_cert``, ``docker_tls_key``).

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

import atexit
import hashlib
import shutil
import tempfile
from pathlib import Path

import docker
import docker.constants
import docker.tls
from pydantic import BaseModel, ConfigDict, Field

from prefect_mig.errors import ConfigError
from prefect_mig.state_dir import write_private


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


def _all_or_none(values: dict[str, object], named: dict[str, str]) -> bool:
    """Whether all of `values` are given (False: none is). `named` maps each key to the name a user
    sets it by.

    Raises:
        ConfigError: only some are given, naming the missing ones.
    """
    missing = [k for k, v in values.items() if v is None]
    if len(missing) == len(values):
        return False
    if missing:
        raise ConfigError(
            f"docker TLS: {', '.join(named[k] for k in missing)} not set; a TLS client needs the CA, its "
            "certificate and its key.",
            field=named[missing[0]],
            value=None,
        )
    return True


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
    if not _all_or_none(files, {k: f"PREFECT_MIG_DOCKER_TLS_{k.upper()}" for k in files}):
        return None
    return DockerTls(**files)


_PEM_FILES: dict[str, DockerTls] = {}


def docker_tls_from_pem(*, ca: str | None, cert: str | None, key: str | None) -> DockerTls | None:
    """Client certificates kept as secrets (the ``MigCluster`` block's ``docker_tls_*`` fields), written
    once per process to a private directory (mode 0700, files 0600) that is removed at exit, since
    docker's `TLSConfig` reads files. None when none is given.

    Raises:
        ConfigError: only some of the three are given.
    """
    pems = {"ca_file": ca, "cert_file": cert, "key_file": key}
    if not _all_or_none(pems, {"ca_file": "docker_tls_ca", "cert_file": "docker_tls_cert", "key_file": "docker_tls_key"}):
        return None
    digest = hashlib.sha256("\0".join((ca, cert, key)).encode()).hexdigest()  # type: ignore[arg-type]
    if digest not in _PEM_FILES:
        folder = Path(tempfile.mkdtemp(prefix="prefect-mig-docker-tls-"))
        atexit.register(shutil.rmtree, folder, True)
        paths = {}
        for name, pem in pems.items():
            path = folder / f"{name.removesuffix('_file')}.pem"
            write_private(path, str(pem))
            paths[name] = path
        _PEM_FILES[digest] = DockerTls(**paths)
    return _PEM_FILES[digest]


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
