"""A Docker engine of a test's own: a second ``dockerd`` beside the machine's, for multi-node tests.

It gets its own socket, data root, exec root and pidfile under one temporary directory, no bridge
and no iptables rules (``--bridge none --iptables=false``: task containers run with networking off),
so it touches nothing of the machine's engine. Images move to it with `load_image` (``docker save``
streamed into ``docker load``: no registry here). `stop` removes its containers, stops the daemon
(which stops the containerd it started) and deletes the directory.

With `tls` it also listens on ``tcp://127.0.0.1:<port>`` and accepts only clients with a
certificate signed by the given CA (``--tlsverify``), like a remote GPU host's engine.

Starting a ``dockerd`` needs root; `DockerdUnavailable` says why one cannot start.

Examples:
    ```python
    from prefect_mig.testing.docker_engine import DockerdUnavailable, PrivateDockerEngine

    try:
        with PrivateDockerEngine() as engine:
            assert engine.client().ping()
    except DockerdUnavailable as exc:
        print("no second engine here:", exc)
    ```
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import requests


class DockerdUnavailable(RuntimeError):
    """No private ``dockerd`` can start here (not installed, not root, or it failed to start)."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS setup: the CA, and one certificate with its key (server's or client's)."""

    ca: Path
    cert: Path
    key: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dockerd() -> str:
    found = shutil.which("dockerd") or ("/usr/sbin/dockerd" if os.path.exists("/usr/sbin/dockerd") else None)
    if found is None:
        raise DockerdUnavailable("dockerd is not installed (Debian: apt-get install docker.io; `make system` does it).")
    return found


class PrivateDockerEngine:
    """A private ``dockerd`` under a temporary directory; a context manager.

    Args:
        tls: server certificate, key and the CA its clients' certificates must be signed by; the
            engine then also listens on ``tcp://127.0.0.1:<tcp_port>`` with ``--tlsverify``.
        start_timeout_s: how long the daemon may take to answer.
    """

    def __init__(self, *, tls: TlsFiles | None = None, start_timeout_s: float = 90.0) -> None:
        self.tls = tls
        self.start_timeout_s = start_timeout_s
        self.root: Path | None = None
        self.tcp_port: int | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The engine's unix socket URL (``unix:///tmp/pmig-dockerd-.../docker.sock``)."""
        assert self.root is not None, "start() first"
        return f"unix://{self.root}/docker.sock"

    @property
    def tcp_url(self) -> str:
        assert self.tcp_port is not None, "started without tls"
        return f"tcp://127.0.0.1:{self.tcp_port}"

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "dockerd.log"

    def client(self, **kwargs) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=60, **kwargs)

    def start(self) -> PrivateDockerEngine:
        _dockerd()
        if os.geteuid() != 0:
            raise DockerdUnavailable("a private dockerd needs root (run the tests as root, as CI does).")
        # short: containerd's sockets live under the exec root and unix socket paths are short
        self.root = Path(tempfile.mkdtemp(prefix="pmig-dockerd-", dir="/tmp"))
        self.tcp_port = free_port() if self.tls is not None else None
        self._launch()
        return self

    def _launch(self) -> None:
        cmd = [
            _dockerd(),
            "--data-root", str(self.root / "data"),
            "--exec-root", str(self.root / "exec"),
            "--pidfile", str(self.root / "dockerd.pid"),
            "--host", self.url,
            "--bridge", "none",
            "--iptables=false",
            "--ip-masq=false",
            "--shutdown-timeout", "5",
        ]
        if self.tls is not None:
            cmd += [
                "--host", self.tcp_url,
                "--tlsverify",
                "--tlscacert", str(self.tls.ca),
                "--tlscert", str(self.tls.cert),
                "--tlskey", str(self.tls.key),
            ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._proc.poll() is not None:
                code, tail = self._proc.returncode, self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise DockerdUnavailable(f"the private dockerd exited with code {code}:\n{tail}")
            if self.answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise DockerdUnavailable(f"the private dockerd did not answer within {self.start_timeout_s:g} s")
            time.sleep(0.3)

    def answers(self) -> bool:
        """Whether the engine answers a ping on its socket now."""
        try:
            client = self.client()
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return False

    def load_image(self, source: docker.DockerClient, tag: str) -> None:
        """Copy image `tag` from the `source` engine (``docker save | docker load``, streamed)."""
        chunks = source.images.get(tag).save(chunk_size=1024 * 1024, named=True)
        client = self.client()
        try:
            client.images.load(chunks)
            client.images.get(tag)  # raises if the load did not give the tag
        finally:
            client.close()

    def kill(self) -> None:
        """Crash the daemon (SIGKILL): its containerd dies with it, running containers' shims live on,
        as when an engine crashes. `restart` brings it back; `stop` still cleans up after it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=30)
        # its containerd dies with it, not at once: a new daemon started meanwhile finds the old
        # one's pidfile, waits for it to answer and gives up
        pidfile = self.root / "exec" / "containerd" / "containerd.pid" if self.root else None
        try:
            pid = int(pidfile.read_text().strip()) if pidfile else 0
        except (OSError, ValueError):
            pid = 0
        deadline = time.monotonic() + 30
        while pid and os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.1)

    def restart(self) -> None:
        """Start the daemon again on the same directories and port (images and containers kept;
        containers that ran when it crashed come back stopped)."""
        self.kill()
        self._launch()

    def stop(self) -> None:
        """Remove the engine's containers, stop it (SIGTERM, then SIGKILL) and delete its directory."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                client = self.client()
                try:
                    for container in client.containers.list(all=True):  # all ours: the engine is private
                        container.remove(force=True, v=True)
                finally:
                    client.close()
            except (docker.errors.DockerException, requests.exceptions.RequestException):
                pass
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=30)
        self._proc = None
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        if self.root is None:
            return
        root = str(self.root)
        # processes of containers that ran when the daemon was killed (in a cgroup named for one of
        # its containers), and their shims (whose command lines name our root)
        try:
            ids = [c.encode() for c in os.listdir(self.root / "data" / "containers")]
        except OSError:
            ids = []
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                with open(f"/proc/{pid}/cgroup", "rb") as f:
                    cgroups = f.read()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
                if root.encode() in cmdline or any(i in cgroups for i in ids):
                    os.kill(int(pid), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue
        # a daemon that died hard leaves mounts (its data root, bound onto itself, maybe twice)
        for _ in range(10):
            with open("/proc/mounts") as f:
                mounts = [line.split()[1] for line in f if line.split()[1].startswith(root)]
            if not mounts:
                break
            for point in sorted(mounts, key=len, reverse=True):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> PrivateDockerEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
