"""A randomized fault campaign against the allocator, checked by the holders' own records.

Six worker processes take and use 1g slices of one simulated A30 (four slices) with random
priorities, preemptibility, tenants (one with a quota) and timeouts; each writes down when it used
which slice (`HolderLog` lines). Meanwhile the campaign kills workers (holders and waiters), pauses
the server (SIGSTOP), makes it refuse writes (OOM under maxmemory), keeps it busy with a long script
(BUSY), restarts it, and wipes it (FLUSHALL; the campaign's node agent republishes). It plays the
node agent itself: heartbeats, republishes, reaps. Only 127.0.0.1, its own redis-server; bounded by
``--seconds``.

It prints: grants, kills, faults injected, overlaps (two uses of one slice at once; must be 0), the
worst time a killed holder's slice stayed unusable (and how long of it the slice was leased still,
quarantined, gone or free: sampled every 0.2 s, with the wipes meanwhile), and the worst time an
eligible request waited while a slice was free (sampled every 0.2 s), then a JSON line.

    python -m tests.faults.campaign --seconds 180
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from prefect_mig.allocator import Allocator, LeaseClient, Quota, SliceRequest
from prefect_mig.errors import PrefectMigError
from prefect_mig.testing.holder_log import HolderLog, Use
from prefect_mig.testing.redis_server import RedisServer

NS = "campaign"
FLEET = "node-a=1xA30-24GB"
LAYOUT = {"node-a": ["1g.6gb@0 + 1g.6gb@1 + 1g.6gb@2 + 1g.6gb@3"]}
TTL_S = 3.0
MAX_TTL_S = 6.0  # after a wipe, the agent's slices settle for this long
QUOTA = {"t1": 2}
WORKERS = 6


def worker(url: str, log_path: str, seed: int) -> None:
    """Take, use and give back slices forever; one JSON line when a use starts, one when it ends."""
    rnd = random.Random(seed)
    client = LeaseClient(url, NS, max_ttl_s=MAX_TTL_S)
    out = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    while True:
        request = SliceRequest(
            profile="1g.6gb", priority=rnd.randint(0, 9), preemptible=rnd.random() < 0.5,
            tenant=rnd.choice(["t0", "t1"]), ttl_s=TTL_S,
        )
        lost_at: list[float] = []
        try:
            lease = client.acquire(request, timeout_s=rnd.uniform(0.3, 5.0), on_lost=lambda _l, _e: lost_at.append(time.time()))
        except PrefectMigError:
            time.sleep(rnd.uniform(0.0, 0.3))
            continue
        start = time.time()
        out.write(json.dumps({"slice": lease.slice.id, "fence": lease.fence, "start": start}) + "\n")
        lease.lost.wait(rnd.uniform(0.2, 2.0))
        end = lost_at[0] if lost_at else time.time()
        out.write(json.dumps({"fence": lease.fence, "end": end}) + "\n")
        try:
            lease.release()
        except PrefectMigError:
            pass


class Campaign:
    def __init__(self, seconds: float, seed: int, workdir: Path) -> None:
        self.seconds, self.rnd, self.dir = seconds, random.Random(seed), workdir
        self.server = RedisServer(dir=workdir / "redis")
        self.procs: dict[int, subprocess.Popen] = {}
        self.killed_at: dict[int, float] = {}
        self.faults: dict[str, int] = {}
        self.kills = 0
        self.free_while_waiting: list[float] = []
        # (time, {slice id: state}, anyone waiting) every 0.2 s, and (time, kind) of each fault
        self.timeline: list[tuple[float, dict[str, str], bool]] = []
        self.fault_times: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the server is restarted by one thread while others use it

    # -- the node agent -------------------------------------------------------------------------
    def agent(self) -> None:
        alloc = Allocator(self.server.client(socket_timeout=2), NS, max_ttl_s=MAX_TTL_S)
        published = False
        since = None  # when a free slice and an eligible waiter were first seen together
        while not self._stop.wait(0.2):
            try:
                if not published or alloc.heartbeat("node-a", ttl_s=30) == "unknown":
                    alloc.publish_fleet(FLEET, layouts=LAYOUT, heartbeat_ttl_s=30)
                    for tenant, n in QUOTA.items():
                        alloc.set_quota(tenant, Quota(slices=n))
                    published = True
                alloc.reap()
                status = alloc.status()
                self.timeline.append((time.time(), {r["id"]: r["state"] for r in status["slices"]}, bool(status["queue"])))
                starving = self._eligible_waits_beside_a_free_slice(status)
            except PrefectMigError:
                since = None
                continue
            now = time.monotonic()
            if starving and since is None:
                since = now
            elif not starving and since is not None:
                self.free_while_waiting.append(now - since)
                since = None

    @staticmethod
    def _eligible_waits_beside_a_free_slice(status: dict) -> bool:
        if not any(s["state"] == "free" for s in status["slices"]):
            return False
        held: dict[str, int] = {}
        for lease in status["leases"]:
            held[lease.get("tenant", "")] = held.get(lease.get("tenant", ""), 0) + 1
        return any(held.get(q["tenant"], 0) < QUOTA.get(q["tenant"], 10**9) for q in status["queue"])

    # -- workers ----------------------------------------------------------------------------------
    def start_worker(self) -> None:
        n = len(self.procs) + len(self.killed_at)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.campaign", "--worker", self.server.url,
             str(self.dir / f"worker-{n}.jsonl"), str(self.rnd.randrange(1 << 30))],
            cwd=Path(__file__).resolve().parents[2], stderr=subprocess.DEVNULL,
        )
        self.procs[proc.pid] = proc
        proc.log = self.dir / f"worker-{n}.jsonl"  # type: ignore[attr-defined]

    def kill_worker(self) -> None:
        pid = self.rnd.choice(list(self.procs))
        proc = self.procs.pop(pid)
        proc.kill()
        proc.wait()
        self.killed_at[pid] = time.time()
        self.dead_logs.append((proc.log, self.killed_at[pid]))  # type: ignore[attr-defined]
        self.kills += 1
        self.start_worker()

    # -- faults on the server ---------------------------------------------------------------------
    def fault(self) -> None:
        kind = self.rnd.choice(["kill", "kill", "pause", "oom", "busy", "restart", "flushall"])
        self.faults[kind] = self.faults.get(kind, 0) + 1
        self.fault_times.append((time.time(), kind))
        c = self.server.client(socket_timeout=10)
        if kind == "kill":
            self.kill_worker()
        elif kind == "pause":
            os.kill(self.server._process.pid, signal.SIGSTOP)  # noqa: SLF001
            time.sleep(self.rnd.uniform(0.3, 2.5))
            os.kill(self.server._process.pid, signal.SIGCONT)  # noqa: SLF001
        elif kind == "oom":
            c.set("campaign-filler", b"x" * 2_000_000)
            c.config_set("maxmemory", c.info("memory")["used_memory"] // 2)
            time.sleep(self.rnd.uniform(0.3, 2.5))
            c.config_set("maxmemory", 0)
            c.delete("campaign-filler")
        elif kind == "busy":
            c.config_set("busy-reply-threshold", 100)
            blocker = threading.Thread(target=self._busy, args=(self.rnd.uniform(0.3, 2.0),), daemon=True)
            blocker.start()
            blocker.join(10)
        elif kind == "restart":
            self.server.restart()
        elif kind == "flushall":
            c.flushall()
        c.close()

    def _busy(self, seconds: float) -> None:
        try:
            self.server.client(socket_timeout=10).eval(
                "local t0 = redis.call('TIME') local n = 0 "
                "while true do n = n + 1 if n % 100000 == 0 then local t = redis.call('TIME') "
                "if (t[1] - t0[1]) * 1e6 + (t[2] - t0[2]) > tonumber(ARGV[1]) then return n end end end",
                0, int(seconds * 1e6),
            )
        except redis.RedisError:
            pass

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        self.dead_logs: list[tuple[Path, float]] = []
        self.server.start()
        agent = threading.Thread(target=self.agent, daemon=True)
        agent.start()
        time.sleep(0.5)
        for _ in range(WORKERS):
            self.start_worker()
        end = time.monotonic() + self.seconds
        try:
            while time.monotonic() < end:
                time.sleep(self.rnd.uniform(1.0, 3.0))
                self.fault()
        finally:
            for proc in self.procs.values():
                proc.kill()
                proc.wait()
            stopped = time.time()
            self._stop.set()
            agent.join(5)
            self.server.stop()
        return self.figures(stopped)

    def figures(self, stopped: float) -> dict:
        log = HolderLog()
        unusable = []
        logs = [(p, stopped) for p in self.dir.glob("worker-*.jsonl")]
        killed = {str(p): at for p, at in self.dead_logs}
        uses: list[Use] = []
        for path, at in logs:
            open_uses: dict[int, dict] = {}
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if "start" in row:
                    open_uses[row["fence"]] = row
                elif row["fence"] in open_uses:
                    u = open_uses.pop(row["fence"])
                    uses.append(Use(u["slice"], u["fence"], u["start"], row["end"]))
            for u in open_uses.values():  # killed (or stopped at the end) while using it
                end = killed.get(str(path), at)
                uses.append(Use(u["slice"], u["fence"], u["start"], end))
                if str(path) in killed:
                    unusable.append((u["slice"], end))
        for u in uses:
            log.add(u.slice, u.fence, u.start, u.end)
        worst_dead, worst = 0.0, None
        for sl, at in unusable:
            later = [u.start for u in uses if u.slice == sl and u.start >= at]
            if later and min(later) - at > worst_dead:
                worst_dead, worst = min(later) - at, (sl, at, min(later))
        return {
            "seconds": self.seconds,
            "grants": len(uses),
            "kills": self.kills,
            "faults": sum(self.faults.values()),
            "faults_by_kind": self.faults,
            "overlaps": len(log.overlaps()),
            "worst_dead_holder_slice_unusable_s": round(worst_dead, 2),
            "worst_dead_holder_slice_states_s": self._states_between(*worst) if worst else {},
            "wipes_meanwhile": sum(1 for t, kind in self.fault_times if kind == "flushall" and worst and worst[1] <= t <= worst[2]),
            "worst_eligible_wait_beside_free_slice_s": round(max(self.free_while_waiting, default=0.0), 2),
        }


    def _states_between(self, slice_id: str, start: float, end: float) -> dict[str, float]:
        """How long `slice_id` spent in each state from `start` to `end`, by the agent's samples: a
        free one split by whether a request was queued (eligible or not), one missing from Redis (wiped) as 'gone'."""
        spent: dict[str, float] = {}
        before = start
        for at, states, waiting in self.timeline:
            if at <= start or at > end:
                continue
            state = states.get(slice_id, "gone")
            if state == "free":
                state = "free, a request queued" if waiting else "free, queue empty"
            spent[state] = spent.get(state, 0.0) + at - before
            before = at
        return {state: round(seconds, 1) for state, seconds in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--worker", nargs=3, metavar=("URL", "LOG", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        url, log_path, seed = args.worker
        worker(url, log_path, int(seed))
        return
    with tempfile.TemporaryDirectory(prefix="pmig-faults-") as tmp:
        figures = Campaign(args.seconds, args.seed, Path(tmp)).run()
    print(f"{'grants':<44}{figures['grants']}")
    print(f"{'kills (holders and waiters)':<44}{figures['kills']}")
    print(f"{'faults injected':<44}{figures['faults']} {figures['faults_by_kind']}")
    print(f"{'overlaps (must be 0)':<44}{figures['overlaps']}")
    print(f"{'worst time a dead holder slice was unusable':<44}{figures['worst_dead_holder_slice_unusable_s']} s")
    print(f"{'  of which, by state':<44}{figures['worst_dead_holder_slice_states_s']}, "
          f"{figures['wipes_meanwhile']} FLUSHALL(s) meanwhile")
    print(f"{'worst eligible wait beside a free slice':<44}{figures['worst_eligible_wait_beside_free_slice_s']} s")
    print(json.dumps(figures))
    if figures["overlaps"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
