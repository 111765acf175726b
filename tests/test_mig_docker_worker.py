"""The ``mig-docker`` work pool end to end, as a UI user drives it: a real ``prefect server start``
process (SQLite, its own PREFECT_HOME), the pool created by type through the CLI, a deployment made
with ``prefect deploy``, ``prefect worker start`` as a subprocess, the session's redis-server with a
simulated H100 published, and flow runs in containers of a flow-run image built offline
(``prefect-mig image build``). One server, pool, deployment and worker for the module."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import docker.errors
import httpx
import pytest
import redis

from prefect_mig.allocator import Allocator, LeaseInfo, SliceRequest
from prefect_mig.launchers.docker import task_containers

from .allocator_fixtures import H100_MIXED
from .prefect_fixtures import PREFECT_IMAGE

pytestmark = [pytest.mark.docker, pytest.mark.redis]

BIN = Path(sys.executable).parent
FLOW_SOURCE = '''
import os
import time
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run


@flow
def gpu_flow(sleep_s: float = 0.0) -> None:
    """Say which MIG device it saw (in a file of the mounted project), then maybe sleep."""
    Path(__file__).parent.joinpath("out", f"{flow_run.id}.txt").write_text(os.environ["CUDA_VISIBLE_DEVICES"])
    time.sleep(sleep_s)
'''

SLICED_FLOW_SOURCE = '''
import time

from prefect import flow

from prefect_mig import MigTaskRunner, task


def _sleep_long():
    import time
    time.sleep(600)


holding = task(task_runner=MigTaskRunner(profile="1g.10gb"), name="holding")(_sleep_long)
waiting = task(task_runner=MigTaskRunner(profile="3g.40gb"), name="waiting")(_sleep_long)


@flow
def sliced_flow() -> None:
    """Tasks on slices with task-level runners: one runs, one waits (the test holds the 3g.40gb)."""
    futures = [holding.submit(), waiting.submit()]
    for future in futures:
        future.wait()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until(what: str, check, timeout_s: float = 180.0, every_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Api:
    """The few REST calls the tests make, as the UI does them."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One call; a 503 (SQLite busy on a loaded machine) is tried again, as Prefect's client does."""
        for _ in range(10):
            got = self.http.request(method, path, **kwargs)
            if got.status_code != 503:
                return got.raise_for_status()
            time.sleep(2)
        return got.raise_for_status()

    def run(self, deployment_id: str, parameters: dict | None = None, **job_variables) -> str:
        got = self._call("POST", f"/deployments/{deployment_id}/create_flow_run",
                         json={"job_variables": job_variables, "parameters": parameters or {}})
        return got.json()["id"]

    def flow_run(self, run_id: str) -> dict:
        return self._call("GET", f"/flow_runs/{run_id}").json()

    def states(self, run_id: str) -> list[dict]:
        return self._call("GET", "/flow_run_states/", params={"flow_run_id": run_id}).json()

    def state_of(self, run_id: str) -> dict:
        return self.flow_run(run_id)["state"]

    def cancel(self, run_id: str) -> None:
        self._call("POST", f"/flow_runs/{run_id}/set_state", json={"state": {"type": "CANCELLING"}, "force": True})


@pytest.fixture(scope="module")
def flow_image(prefect_image) -> str:
    """Built by the command users run (see tests/prefect_fixtures.py)."""
    return prefect_image


@pytest.fixture(scope="module")
def pool(tmp_path_factory, redis_server, flow_image, docker_client):
    """A server, a mig-docker pool, a deployment of gpu_flow and a worker; yields what tests use."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    namespace = "w" + uuid.uuid4().hex[:10]
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_MIG_REDIS_URL": redis_server.url,
        "PREFECT_MIG_NAMESPACE": namespace,
        "PREFECT_MIG_BACKEND": "simulated",
    }
    env.pop("PREFECT_PROFILE", None)
    alloc = Allocator(redis.Redis.from_url(redis_server.url), namespace)
    alloc.publish_fleet("node-a=1xH100-80GB", layouts={"node-a": [H100_MIXED]}, heartbeat_ttl_s=3600)
    logs = home / "logs"
    logs.mkdir()
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT)
    workers: list[subprocess.Popen] = []
    try:
        def healthy():
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_until("the Prefect server to answer", healthy, timeout_s=400)
        cli = lambda *args: subprocess.run([str(BIN / "prefect"), *args], env=env, check=True, timeout=300,  # noqa: E731
                                           capture_output=True, text=True)
        cli("work-pool", "create", "gpu", "--type", "mig-docker")
        cli("work-pool", "create", "procs", "--type", "process")
        project = tmp_path_factory.mktemp("project")
        (project / "out").mkdir()
        (project / "gpu_flow.py").write_text(textwrap.dedent(FLOW_SOURCE))
        (project / "sliced_flow.py").write_text(textwrap.dedent(SLICED_FLOW_SOURCE))
        (project / "prefect.yaml").write_text(json.dumps({  # YAML is a superset of JSON
            "name": "gpu-project",
            "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}],
            "deployments": [{
                "name": "gpu", "entrypoint": "gpu_flow.py:gpu_flow",
                "work_pool": {"name": "gpu", "job_variables": {"image": flow_image, "volumes": [f"{project}:{project}"]}},
            }, {
                "name": "procs", "entrypoint": "sliced_flow.py:sliced_flow", "work_pool": {"name": "procs"},
            }],
        }))
        deployed = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
                                  env=env, timeout=300, cwd=project, capture_output=True, text=True)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        api = Api(url)
        deployment = api.http.get("/deployments/name/gpu-flow/gpu").raise_for_status().json()

        def start_worker() -> subprocess.Popen:
            """A `prefect worker start` of the pool (one more, as a user restarts a dead one)."""
            proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--type", "mig-docker"],
                                    env=env, stdout=open(logs / "worker.log", "a"), stderr=subprocess.STDOUT)
            workers.append(proc)
            return proc

        start_worker()
        sliced = api.http.get("/deployments/name/sliced-flow/procs").raise_for_status().json()
        yield {"api": api, "deployment": deployment["id"], "alloc": alloc, "project": project, "logs": logs,
               "workers": workers, "start_worker": start_worker, "env": env, "sliced_deployment": sliced["id"]}
    finally:
        for proc in (*workers, server):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture
def clean(pool, docker_client):
    """Checks after each test that no lease and no flow-run container of this cluster is left."""
    yield pool
    alloc = pool["alloc"]
    assert _wait_until("the leases to be released", lambda: alloc.status()["leases"] == [] or None, 60)
    assert task_containers(docker_client, cluster_id=alloc.cluster_id(), namespace=alloc.keys.namespace) == []


FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _final(api: Api, run_id: str, timeout_s: float = 300) -> dict:
    return _wait_until(f"flow run {run_id} to end", lambda: (s := api.state_of(run_id)) and s["type"] in FINAL and s, timeout_s)


def _names(api: Api, run_id: str) -> list[tuple[str, str]]:
    return [(s["name"], s.get("message") or "") for s in sorted(api.states(run_id), key=lambda s: s["timestamp"])]


def test_a_flow_run_waits_for_its_slice_then_runs_bound_to_it_and_leaves_nothing(clean):
    api, alloc = clean["api"], clean["alloc"]
    held = alloc.try_acquire(SliceRequest(profile="3g.40gb", holder="someone else"))  # the only 3g.40gb
    run_id = api.run(clean["deployment"], {"sleep_s": 8}, profile="3g.40gb", priority=7, tenant="team-a")
    _wait_until("AwaitingMIG", lambda: api.state_of(run_id)["name"] == "AwaitingMIG", 300)
    assert "position 1 of 1 in the queue" in api.state_of(run_id)["message"]
    assert alloc.release(held.lease_id, held.fence)
    final = _final(api, run_id)
    history = _names(api, run_id)
    assert final["type"] == "COMPLETED", (history, (clean["logs"] / "worker.log").read_text()[-3000:])
    names = [n for n, _ in history]
    assert names.index("AwaitingMIG") < names.index("Running") < names.index("Completed")
    leased = [m for n, m in history if m.startswith("leased 3g.40gb@0 on node-a GPU 0")]
    assert leased, history
    mig_uuid = leased[0].split("(")[1].split(")")[0]
    assert (clean["project"] / "out" / f"{run_id}.txt").read_text() == mig_uuid
    assert api.flow_run(run_id)["infrastructure_pid"]
    running = [m for n, m in history if n == "Running" and m]
    assert running and running[0].startswith(f"running on 3g.40gb@0 on node-a GPU 0 ({mig_uuid}), fence "), history


def test_cancelling_a_running_flow_run_stops_its_container_and_releases_its_lease(clean, docker_client):
    api, alloc = clean["api"], clean["alloc"]
    run_id = api.run(clean["deployment"], profile="1g.10gb", parameters={"sleep_s": 600})
    _wait_until("Running", lambda: api.state_of(run_id)["type"] == "RUNNING", 300)
    assert len(alloc.status()["leases"]) == 1
    api.cancel(run_id)
    final = _final(api, run_id, 240)
    assert final["type"] == "CANCELLED", _names(api, run_id)


def test_cancelling_a_waiting_flow_run_withdraws_its_wait(clean):
    api, alloc = clean["api"], clean["alloc"]
    held = alloc.try_acquire(SliceRequest(profile="3g.40gb", holder="someone else"))
    try:
        run_id = api.run(clean["deployment"], profile="3g.40gb")
        _wait_until("AwaitingMIG", lambda: api.state_of(run_id)["name"] == "AwaitingMIG", 300)
        api.cancel(run_id)
        assert _final(api, run_id, 240)["type"] == "CANCELLED"
        _wait_until("the wait to be withdrawn", lambda: alloc.status()["queue"] == [] or None, 60)
    finally:
        alloc.release(held.lease_id, held.fence)


PYTHON_ONLY_IMAGE = "the python-only test image"  # stands for the python_image fixture's tag


@pytest.mark.parametrize(
    ("variables", "named"),
    [({"profile": "9g.999gb"}, "profile"), ({"profile": ">=9tb"}, "profile"), ({"image": ""}, "image"),
     ({"container_options": {"privileged": True}}, "container_options"),
     # within the pool's bounds but past the cluster's PREFECT_MIG_LEASE_MAX_TTL_S (900): the run
     # crashed with "unhandled errors in a TaskGroup" and named ttl_s (found by a new-user trial)
     ({"lease_ttl_s": 1000}, "lease_ttl_s"),
     # an image the engine lacks, or one without Prefect: the run crashed with "unhandled errors in
     # a TaskGroup" and the reason only in a traceback (found by a new-user trial)
     ({"image": "prefect-mig-no-such-image:latest"}, "image"), ({"image": PYTHON_ONLY_IMAGE}, "image"),
     # a profile of the catalog that this fleet's GPUs (an H100) lack, and minimums none of them
     # meets: the run crashed with "unhandled errors in a TaskGroup" (found by a new-user trial)
     ({"profile": "1g.6gb"}, "profile"), ({"profile": ">=100gb"}, "profile")],
)
def test_a_bad_job_variable_fails_the_run_naming_it(clean, variables, named, python_image):
    api = clean["api"]
    variables = {k: python_image if v == PYTHON_ONLY_IMAGE else v for k, v in variables.items()}
    run_id = api.run(clean["deployment"], **variables)
    final = _final(api, run_id, 240)
    assert final["type"] == "FAILED", _names(api, run_id)
    assert f"job variable {named}" in final["message"]


def test_the_server_refuses_a_run_whose_priority_is_out_of_range_naming_it(clean):
    """The pool's variables carry their bounds, so the API (and the UI's form) refuses priority 500
    before a run exists; the worker's own check covers a base job template edited to a bad value."""
    got = clean["api"].http.post(f"/deployments/{clean['deployment']}/create_flow_run", json={"job_variables": {"priority": 500}})
    assert got.status_code == 422
    assert "priority" in got.text and "500" in got.text, got.text


def test_the_server_refuses_a_run_or_deployment_with_a_job_variable_the_pool_lacks_naming_it(clean):
    """A new-user trial: `prefect deployment run ... --job-variable ttl=5` (for lease_ttl_s) made a
    run that ignored it and ran with the defaults; a typo (`prority`) would too."""
    api = clean["api"]
    got = api.http.post(f"/deployments/{clean['deployment']}/create_flow_run", json={"job_variables": {"prority": 9}})
    assert got.status_code == 422 and "prority" in got.text, got.text
    deployment = api.http.get(f"/deployments/{clean['deployment']}").raise_for_status().json()
    made = api.http.post("/deployments/", json={
        "name": "typo", "flow_id": deployment["flow_id"], "work_pool_name": "gpu", "entrypoint": deployment["entrypoint"],
        "job_variables": {"image": "any:latest", "lease_ttl": 30},
    })
    assert made.status_code == 422 and "lease_ttl" in made.text, made.text


def _flow_run_container(docker_client, alloc, run_id: str):
    ours = task_containers(docker_client, cluster_id=alloc.cluster_id(), namespace=alloc.keys.namespace)
    return next((c for c in ours if c.labels.get("prefect-mig.flow-run-id") == run_id), None)


def test_a_flow_runs_container_is_confined_like_a_task_container_unless_its_job_variables_loosen_it(clean, docker_client):
    api, alloc = clean["api"], clean["alloc"]
    strict = api.run(clean["deployment"], {"sleep_s": 600}, profile="1g.10gb")
    loose = api.run(clean["deployment"], {"sleep_s": 600}, profile="1g.10gb",
                    container_options={"read_only_root": False, "cap_add": ["ALL"], "no_new_privileges": False, "pids_limit": None})
    try:
        for run_id in (strict, loose):  # Running: Prefect's engine starts under the confinement
            _wait_until("Running", lambda: api.state_of(run_id)["type"] == "RUNNING", 300)
        confined = _flow_run_container(docker_client, alloc, strict).attrs["HostConfig"]
        assert confined["ReadonlyRootfs"] is True and "/tmp" in confined["Tmpfs"]
        assert confined["CapDrop"] == ["ALL"] and "no-new-privileges:true" in confined["SecurityOpt"]
        assert confined["PidsLimit"] == 4096
        loosened = _flow_run_container(docker_client, alloc, loose).attrs["HostConfig"]
        assert loosened["ReadonlyRootfs"] is False and not loosened["CapDrop"] and not loosened["SecurityOpt"]
        assert not loosened["PidsLimit"]
    finally:
        for run_id in (strict, loose):
            api.cancel(run_id)
        for run_id in (strict, loose):
            assert _final(api, run_id, 240)["type"] == "CANCELLED"


def test_a_worker_killed_mid_run_lets_the_lease_end_within_its_ttl_and_the_next_worker_marks_the_run_crashed(
    clean, docker_client
):
    """The flow run's container outlives a SIGKILLed worker, but nobody renews its lease: the lease
    ends within its TTL (before that the slice goes to nobody else), the node agent removes the
    container, and the worker started next marks the run Crashed."""
    import threading

    from prefect_mig.agent import NodeAgent

    api, alloc = clean["api"], clean["alloc"]
    ttl_s = 15
    run_id = api.run(clean["deployment"], {"sleep_s": 600}, profile="3g.40gb", lease_ttl_s=ttl_s)  # the only 3g.40gb
    _wait_until("Running", lambda: api.state_of(run_id)["type"] == "RUNNING", 300)
    (lease,) = alloc.status()["leases"]
    container = _flow_run_container(docker_client, alloc, run_id)
    assert container is not None and container.labels["prefect-mig.lease-id"] == lease["lease_id"]
    clean["workers"][-1].kill()
    killed_at = time.monotonic()
    clean["workers"][-1].wait(30)
    queued = alloc.try_acquire(SliceRequest(profile="3g.40gb", holder="the next holder"), wait=True)
    assert not isinstance(queued, LeaseInfo), "the slice was granted while the dead worker's lease still held it"

    stop, gone_at = threading.Event(), {}
    agent = NodeAgent(None, alloc, node="node-a", docker_client=docker_client)

    def node_agent() -> None:  # the node agent's reap and fencing rounds, as `prefect-mig agent` runs them
        while not stop.wait(0.5):
            alloc.reap()
            if lease["lease_id"] not in {x["lease_id"] for x in alloc.status()["leases"]}:
                gone_at.setdefault("lease", time.monotonic())
            if agent.fence_containers():
                gone_at.setdefault("container", time.monotonic())

    watcher = threading.Thread(target=node_agent, daemon=True)
    watcher.start()
    try:
        granted = alloc.wait_for_grant(queued.request_id, 120, request=SliceRequest(profile="3g.40gb", holder="the next holder"))
        granted_at = time.monotonic()
        _wait_until("the node agent to remove the orphan container", lambda: "container" in gone_at, 60)
    finally:
        stop.set()
        watcher.join(10)
    try:
        # renewed every third of the TTL: the lease ends between 2/3 TTL and a TTL (plus a reap round) after the kill
        assert ttl_s * 2 / 3 - 1 <= gone_at["lease"] - killed_at <= ttl_s + 5, gone_at["lease"] - killed_at
        assert granted_at >= gone_at["lease"] - 0.5
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(container.id)
        assert api.state_of(run_id)["type"] == "RUNNING"  # nobody said otherwise yet
        clean["start_worker"]()
        final = _final(api, run_id, 240)
        assert final["type"] == "CRASHED", _names(api, run_id)
        assert "no worker runs it" in final["message"] and "lease" in final["message"]
    finally:
        alloc.release(granted.lease_id, granted.fence)


MIG_CALLER = '''
import sys

from prefect import flow

from prefect_mig import mig
from prefect_mig.integrations.prefect.bundle_dir import use_directory_storage

SHARED, IMAGE = sys.argv[1], sys.argv[2]


@mig(work_pool="gpu", profile="1g.10gb", priority=3, image=IMAGE, volumes=[f"{SHARED}:{SHARED}"])
@flow
def where_am_i(x: int) -> str:
    import os
    return f"{x * 6} on {os.environ['CUDA_VISIBLE_DEVICES']}"


if __name__ == "__main__":
    use_directory_storage("gpu", SHARED)
    print("RESULT", where_am_i(7))
'''


def test_calling_a_mig_bound_flow_runs_it_on_a_leased_slice_of_the_pool_and_returns_its_result(clean, tmp_path):
    shared = tmp_path / "shared"
    (tmp_path / "caller.py").write_text(MIG_CALLER)
    # The caller's Prefect settings travel in the bundle; SSL_CERT_FILE (set on this machine) names
    # a CA file the image lacks, and the API here is plain http.
    env = {k: v for k, v in clean["env"].items() if k != "SSL_CERT_FILE"}
    called = subprocess.run([str(BIN / "python"), str(tmp_path / "caller.py"), str(shared), PREFECT_IMAGE],
                            env=env, cwd=tmp_path, timeout=400, capture_output=True, text=True)
    if called.returncode != 0:  # what the flow run logged (from its container) says why
        logs = clean["api"]._call("POST", "/logs/filter", json={"sort": "TIMESTAMP_DESC", "limit": 30}).json()
        raise AssertionError("\n".join(x["message"][-1500:] for x in reversed(logs)) + called.stderr[-2000:])
    (line,) = [x for x in called.stdout.splitlines() if x.startswith("RESULT ")]
    assert line.startswith("RESULT 42 on MIG-"), called.stdout


def test_cancelling_a_flow_run_through_the_api_ends_its_tasks_on_slices_cancelled(clean, docker_client):
    """A `process` pool's flow run whose tasks lease their own slices (MigTaskRunner per task),
    cancelled through the API: Prefect's process worker terminates the flow's process, whose tasks
    stop their containers, withdraw their waits, release their leases and end Cancelled."""
    api, alloc = clean["api"], clean["alloc"]
    held = alloc.try_acquire(SliceRequest(profile="3g.40gb", holder="someone else"))
    logs = clean["logs"]
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "procs", "--type", "process"],
                              env=clean["env"], stdout=open(logs / "process-worker.log", "a"), stderr=subprocess.STDOUT)
    try:
        run_id = api.run(clean["sliced_deployment"])
        ours = {"cluster_id": alloc.cluster_id(), "namespace": alloc.keys.namespace}
        _wait_until("a task container running and a task waiting",
                    lambda: task_containers(docker_client, **ours, running_only=True) and alloc.status()["queue"], 300)
        api.cancel(run_id)
        final = _final(api, run_id, 240)
        assert final["type"] == "CANCELLED", _names(api, run_id)
        deadline = time.monotonic() + 60  # Prefect 3 records task-run states from events, after the flow run's
        while True:
            task_runs = api._call("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
            ended = {t["name"].split("-")[0]: (t["state"]["type"], t["state"]["message"] or "") for t in task_runs}
            if (len(ended) == 2 and all(kind in FINAL for kind, _ in ended.values())) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {name: kind for name, (kind, _) in ended.items()} == {"holding": "CANCELLED", "waiting": "CANCELLED"}, (
            ended, (logs / "process-worker.log").read_text()[-3000:])
        assert "was stopped and the lease released" in ended["holding"][1]
        assert "the wait was withdrawn" in ended["waiting"][1]
        _wait_until("the wait to be withdrawn", lambda: alloc.status()["queue"] == [] or None, 60)
    finally:
        alloc.release(held.lease_id, held.fence)
        worker.terminate()
        try:  # how long Prefect's process worker takes to stop is not what this test is about
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
            warnings.warn("the process worker took over 60 s to stop after SIGTERM (killed): "
                          + (logs / "process-worker.log").read_text()[-2000:])
