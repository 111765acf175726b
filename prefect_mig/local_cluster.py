"""The local cluster: this machine's node agent(s) and the repartitioner, supervised in the background.

``prefect-mig up`` (or, on the embedded default, the first `MigTaskRunner` that finds no live agent
for this host) starts one detached *supervisor* process per state dir. It runs ``prefect-mig agent``
for each node of this host (the simulated fleet's nodes, or this host with real GPUs) and, unless
turned off, ``prefect-mig repartition serve``; a child that exits is restarted (backoff up to 30 s).
Its pid file and the children's log are under ``<state dir>/local/``; ``prefect-mig down`` stops it
(and the embedded redis-server). However many threads and processes ask at once, one supervisor
starts (a lock file in the state dir decides), as for the embedded redis-server.

Timeline of a start::

    starter                          intermediate                 supervisor (detached)
    lock local.lock
    spawn ------------------------>  fork, exit  ---------------> write supervisor.pid
    wait for the intermediate                                     start agent(s), repartitioner
    wait for supervisor.pid                                       restart what exits; on SIGTERM
    unlock                                                        stop children, remove the pid file

The intermediate process exits at once, so the supervisor is nobody's child (no zombie) and
outlives the starter. The supervisor leads its own process group, which its children stay in, and
they get SIGTERM when it dies, even by SIGKILL (Linux's parent-death signal): no agent or
repartitioner is left running beside the next supervisor's, and ``down`` also stops what a killed
supervisor's group still holds. The pid file counts only if that process is the supervisor of this
state dir (its argv names it), so a stale file never makes ``down`` stop another cluster.

Examples:
    ```python
    import tempfile
    from prefect_mig.local_cluster import LocalCluster
    from prefect_mig.settings import Settings

    local = LocalCluster(Settings(state_dir=tempfile.mkdtemp(), backend="simulated"))
    assert local.pid() is None and local.log_file.name == "cluster.log"
    ```
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from prefect_mig.allocator import health
from prefect_mig.allocator.embedded import state_lock
from prefect_mig.errors import ConfigError
from prefect_mig.settings import Settings
from prefect_mig.state_dir import open_private, private_dir, write_private

_MODULE = "prefect_mig.local_cluster"


def local_nodes(settings: Settings) -> list[str]:
    """The node names this host's agents publish: the simulated fleet's nodes, or this host."""
    from prefect_mig.gpu import nvml_available

    kind = settings.backend
    if kind == "auto":
        kind = "nvml" if nvml_available() else "simulated"
    return settings.fleet().node_names if kind == "simulated" else [settings.node]


class LocalCluster:
    """The background supervisor of one state dir.

    Args:
        settings: whose state dir, nodes and Redis the supervisor uses (its children read the same
            environment).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.home = Path(settings.state_dir).absolute() / "local"  # the supervisor's argv names it
        self.pid_file = self.home / "supervisor.pid"
        self.log_file = self.home / "cluster.log"
        self.config_file = self.home / "supervisor.json"

    def pid(self) -> int | None:
        """The running supervisor's pid, or None: a pid file naming a process that is not the
        supervisor of this state dir (a reused pid, another state dir's supervisor) counts as none."""
        pid = self._recorded_pid()
        if pid is None:
            return None
        try:  # its argv: python -m prefect_mig.local_cluster <this state dir>/local
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            served = args[args.index(_MODULE) + 1]
            return pid if os.path.samefile(served, self.home) else None
        except (OSError, ValueError, IndexError):
            return None

    def _recorded_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def _leftovers(self, group: int) -> list[int]:
        """The live processes of the supervisor's process group `group` (its children, which stay in
        it) that serve this state dir: what a supervisor that died without stopping them left."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
                if int(pgrp) != group or state == "Z":
                    continue
                env = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in v)
                if "PREFECT_MIG_STATE_DIR" in env and os.path.samefile(env["PREFECT_MIG_STATE_DIR"], self.home.parent):
                    found.append(int(entry.name))
            except (OSError, ValueError):
                continue
        return found

    def _stop_leftovers(self, group: int, timeout_s: float) -> bool:
        """SIGTERM (then SIGKILL) what `_leftovers` finds; whether there was any."""
        found = self._leftovers(group)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in found:
                try:
                    os.kill(pid, sig)
                    os.kill(pid, signal.SIGCONT)  # a stopped process acts on the SIGTERM too
                except OSError:
                    pass
            deadline = time.monotonic() + timeout_s
            while self._leftovers(group) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self._leftovers(group):
                break
        return bool(found)

    def ensure(self, *, repartition: bool = True, layout: str | None = None, interval_s: float = 5.0) -> tuple[int, bool]:
        """Start the supervisor unless one runs: (its pid, whether this call started it)."""
        pid = self.pid()
        if pid is not None:
            return pid, False
        with state_lock(self.home, "start"):
            pid = self.pid()
            if pid is not None:
                return pid, False
            if (dead := self._recorded_pid()) is not None:
                self._stop_leftovers(dead, timeout_s=10)  # a killed supervisor's children: no second set beside them
            private_dir(self.home)
            write_private(self.config_file, json.dumps({"repartition": repartition, "layout": layout, "interval_s": interval_s}))
            self.pid_file.unlink(missing_ok=True)
            with open_private(self.log_file) as log:
                subprocess.run(
                    [sys.executable, "-m", _MODULE, str(self.home)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, check=True, start_new_session=True,
                    env=os.environ | {"PREFECT_MIG_STATE_DIR": str(self.home.parent)},
                )
            deadline = time.monotonic() + 30
            while (pid := self.pid()) is None:
                if time.monotonic() > deadline:
                    raise ConfigError(f"the prefect-mig supervisor did not start; see {self.log_file}.")
                time.sleep(0.05)
            return pid, True

    def runs_repartitioner(self) -> bool:
        """Whether the supervisor was started with the repartition service."""
        try:
            return bool(json.loads(self.config_file.read_text()).get("repartition", True))
        except (OSError, ValueError):
            return False

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the supervisor and its children, and the children a killed supervisor left (its
        process group); False if none of them ran."""
        with state_lock(self.home, "start"):
            recorded, pid = self._recorded_pid(), self.pid()
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout_s
                while self.pid() == pid and time.monotonic() < deadline:
                    time.sleep(0.1)
                if self.pid() == pid:
                    os.kill(pid, signal.SIGKILL)
            left = recorded is not None and self._stop_leftovers(recorded, timeout_s=10)
            self.pid_file.unlink(missing_ok=True)
            return pid is not None or left

    def wait_for_agents(self, allocator, nodes: list[str], timeout_s: float = 120.0) -> None:
        """Block until each of `nodes` has a live agent heartbeat, and the repartitioner (if this
        supervisor runs one) has announced itself, so kinds no GPU is carved into queue at once.

        Raises:
            ConfigError: not within `timeout_s` (points at the log).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if health.serving(allocator, nodes) and (
                not self.runs_repartitioner() or allocator.repartitioner_running()
            ):
                return
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"the node agent for {', '.join(nodes)} did not heartbeat (or the repartitioner did not "
                    f"announce itself) within {timeout_s:g} s; see {self.log_file}."
                )
            time.sleep(0.2)


# ---------------------------------------------------------------------------- the supervisor process


def _children(settings: Settings, config: dict) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "prefect_mig.cli.main"]
    interval = str(config.get("interval_s", 5.0))
    layout = ["--layout", config["layout"]] if config.get("layout") else []
    found = {f"agent {node}": [*cli, "agent", "--node", node, "--interval", interval, *layout] for node in local_nodes(settings)}
    if config.get("repartition", True):
        found["repartitioner"] = [*cli, "repartition", "serve", "--interval", "10"]
    return found


def _dies_with_parent():
    """A `preexec_fn` giving the child SIGTERM when the supervisor dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so no agent or repartitioner outlives it as an orphan."""
    parent = os.getpid()
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # looked up before the fork

    def preexec() -> None:
        if prctl is not None:
            prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the supervisor died before the prctl: no signal will come
            os._exit(1)

    return preexec


def _supervise(home: Path) -> None:
    from prefect_mig.settings import load_settings

    settings = load_settings()
    config = json.loads((home / "supervisor.json").read_text())
    commands = _children(settings, config)
    die_with_me = _dies_with_parent()
    stopping = False

    def on_term(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    os.umask(0o077)  # what the agent and the repartitioner write under the state dir is private too
    write_private(home / "supervisor.pid", str(os.getpid()))
    running: dict[str, subprocess.Popen] = {}
    failures: dict[str, int] = {}
    next_start: dict[str, float] = {}
    say = lambda msg: print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: {msg}", flush=True)  # noqa: E731
    say(f"pid {os.getpid()}, state dir {settings.state_dir}: {', '.join(commands)}")
    try:
        while not stopping:
            for name, cmd in commands.items():
                proc = running.get(name)
                if proc is not None and proc.poll() is not None:
                    failures[name] = failures.get(name, 0) + 1
                    delay = min(30.0, 2.0 ** failures[name])
                    say(f"{name} exited with {proc.returncode}; restarting in {delay:g} s")
                    next_start[name] = time.monotonic() + delay
                    running.pop(name)
                    proc = None
                if proc is None and time.monotonic() >= next_start.get(name, 0):
                    running[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=die_with_me)
                    say(f"started {name} (pid {running[name].pid})")
            time.sleep(0.5)
    finally:
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        say("stopped")
        (home / "supervisor.pid").unlink(missing_ok=True)


def main(argv: list[str]) -> None:
    home = Path(argv[0])
    if os.fork() > 0:  # the intermediate exits at once: the supervisor is nobody's child
        os._exit(0)
    os.setsid()
    _supervise(home)


if __name__ == "__main__":
    main(sys.argv[1:])
