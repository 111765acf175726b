"""A warm task container: one Python process on a slice that runs call after call.

The container runs the runtime's entry script with ``--serve`` (``runtime_entry.py``). Calls go in
over the container's attached stdin and outcomes come back over its stdout, each a frame (8-byte
big-endian length, then cloudpickle); the body's own output is on stderr, line by line, to the
current call's ``on_log``, and a call ends with the runtime's end mark so that all its lines are in
before its value is returned. The attach stream is the Docker API's, so a remote engine works like
the local one.

A container that died, was stopped (timeout, cancellation, lost lease) or was interrupted mid-call
is `broken` and never runs another call. One can also end while it waits for its next call (an
engine restart stops every container; the OOM killer; ``docker kill``): `serving` asks the engine,
so a pool hands out only a process that still runs.

Examples:
    ```python
    from prefect_mig.launchers import ContainerSettings, DockerLauncher
    from prefect_mig.launchers.warm import WarmContainer

    def count():
        global CALLS
        CALLS = globals().get("CALLS", 0) + 1
        return CALLS

    warm = WarmContainer.start(DockerLauncher(ContainerSettings()), mig_uuid="MIG-demo")
    try:
        assert [warm.call(count, (), {}) for _ in range(3)] == [1, 2, 3]
    finally:
        warm.stop()
    ```
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import cloudpickle
import docker.errors
import requests.exceptions
from docker.utils.socket import frames_iter

from prefect_mig.errors import ContainerStopped, DockerUnavailable
from prefect_mig.launchers.docker import (
    HOME,
    DockerLauncher,
    _pickle_call,
    _removed_means_stopped,
    _runtime_archive,
    died_without_outcome,
    remove_container,
    start_confirmed,
)
from prefect_mig.launchers.outcome import load_outcome, value_of
from prefect_mig.launchers.runtime_entry import END_MARK

_EOF = object()


class WarmContainer:
    """A started task container whose Python process serves calls (see the module docstring).

    Attributes:
        container: the Docker container.
        calls: how many calls it ran.
        broken: set once it may not run another call.
    """

    def __init__(self, launcher: DockerLauncher, container, sock) -> None:
        self.launcher, self.container, self._sock = launcher, container, sock
        self.calls = 0
        self.broken = False
        self._results: queue.Queue = queue.Queue()
        self._on_log: Callable[[str], None] | None = None
        self._logs_done = threading.Event()
        self._ended = threading.Event()  # the attach stream closed: the process is gone
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"warm-{container.id[:12]}")
        self._reader.start()

    @classmethod
    def start(
        cls, launcher: DockerLauncher, *, mig_uuid: str, labels: dict[str, str] | None = None,
        env: dict[str, str] | None = None, confirm: Callable[[], object] | None = None,
    ) -> WarmContainer:
        """Create a container bound to `mig_uuid`, attach to its stdio, start its serving process
        (unless `confirm`, run between the create and the start, raises: see `start_confirmed`).

        Raises:
            ImageNotFound, ImagePythonMismatch, DockerUnavailable, and whatever `confirm` raises.
        """
        launcher.check_python()
        # detach=False with stdin_open sets StdinOnce: stdin closes when this client's attach ends,
        # so the serving process of a flow process that died exits by itself
        container = launcher.create(
            mig_uuid=mig_uuid, labels=labels, env=env, command=("--serve",), stdin_open=True, detach=False
        )
        try:
            container.put_archive(HOME, _runtime_archive(None))
            sock = container.attach_socket(params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            start_confirmed(container, None, confirm)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            removed = remove_container(container)
            raise DockerUnavailable(f"could not start the warm task container: {exc}", image=launcher.settings.image,
                                    unconfirmed=not removed) from exc
        except BaseException:
            remove_container(container)
            raise
        return cls(launcher, container, sock)

    def call(
        self,
        fn: Callable,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        env: dict[str, str] | None = None,
        on_log: Callable[[str], None] | None = None,
        stop=None,
        poll_s: float = 0.05,
        side_values: dict[str, Any] | None = None,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` in the warm process with this call's `env` (and
        `side_values`); return its value or raise its exception, as `DockerLauncher.run` does.

        Raises:
            ContainerStopped: `stop` was set (the container is killed), or it was removed.
            ContainerFailed: the process died without an outcome.
            DockerUnavailable: the engine stopped answering mid-call (``unconfirmed``: the
                container may still run, as `DockerLauncher.run` says of a cold one).
        """
        if self.broken:
            raise ContainerStopped("this warm task container may not run another call.", container_id=self.container.id)
        message = cloudpickle.dumps({"env": dict(env or {}), "call": _pickle_call(fn, args, kwargs or {}, side_values)})
        self._on_log, self.calls = on_log, self.calls + 1
        self._logs_done.clear()
        try:
            self._send(struct.pack(">Q", len(message)) + message)
            outcome = self._wait(stop, poll_s)
            self._logs_done.wait(5)  # the body's last lines come before the end mark
        except (docker.errors.APIError, requests.exceptions.RequestException) as exc:
            self.broken = True
            raise self.launcher._engine_gone(exc, removed=False) from exc
        except BaseException:
            self.broken = True  # stopped, died, or interrupted mid-call: its state is unknown
            raise
        finally:
            self._on_log = None
        return value_of(outcome)

    def serving(self) -> bool:
        """Whether it may take a call now: not `broken`, its attach stream still open, and the
        engine says the container runs. False when the engine does not answer (the call could not
        be sent anyway). One round trip to the engine."""
        if self.broken or self._ended.is_set():
            return False
        try:
            self.container.reload()
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return False
        return self.container.status == "running" and not self._ended.is_set()

    def stop(self) -> bool:
        """Kill and remove the container (idempotent); False when the engine did not answer, so
        the container may still run (see `remove_container`)."""
        self.broken = True
        try:
            getattr(self._sock, "_sock", self._sock).shutdown(socket.SHUT_RDWR)  # ends the reader too
            self._sock.close()
        except OSError:
            pass
        return remove_container(self.container)

    def _send(self, data: bytes) -> None:
        raw = getattr(self._sock, "_sock", self._sock)
        with _removed_means_stopped(self.container):
            try:
                raw.sendall(data)
            except OSError as exc:  # the process or its container is gone, or the engine died
                self.container.reload()  # NotFound: removed; a RequestException: the engine is gone
                raise docker.errors.NotFound(f"the warm container's stdin is closed: {exc}") from exc

    def _wait(self, stop, poll_s: float) -> tuple:
        while True:
            if stop is not None and stop.is_set():
                with _removed_means_stopped(self.container):
                    self.container.kill()
                raise ContainerStopped("the task container was stopped before the body finished.", container_id=self.container.id)
            try:
                got = self._results.get(timeout=poll_s)
            except queue.Empty:
                continue
            if got is not _EOF:
                return got
            with _removed_means_stopped(self.container):
                exit_code = int(self.container.wait(timeout=30)["StatusCode"])
            raise died_without_outcome(self.container, exit_code, self.launcher.settings.image)

    def _read(self) -> None:
        """Split the attach stream: stdout frames are outcomes, stderr lines the calls' output."""
        results, pending = b"", ""
        try:
            for stream, data in frames_iter(self._sock, tty=False):
                if stream == 1:
                    results += data
                    while len(results) >= 8 and len(results) >= 8 + struct.unpack(">Q", results[:8])[0]:
                        size = struct.unpack(">Q", results[:8])[0]
                        self._results.put(load_outcome(results[8:8 + size]))
                        results = results[8 + size:]
                    continue
                pending += data.decode(errors="replace")
                *lines, pending = pending.split("\n")
                for line in lines:
                    self._line(line)
        except (OSError, ValueError, docker.errors.DockerException, requests.exceptions.RequestException):
            pass
        if pending:
            self._line(pending)
        self._ended.set()
        self._results.put(_EOF)

    def _line(self, line: str) -> None:
        if line.endswith(END_MARK):  # after output without a newline ("print(x, end='')"), on its line
            if line != END_MARK and self._on_log is not None:
                self._on_log(line[:-len(END_MARK)])
            self._logs_done.set()
        elif self._on_log is not None:
            self._on_log(line)
