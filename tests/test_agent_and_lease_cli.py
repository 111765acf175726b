"""The node agent on the simulated NVML, and the lease commands as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from prefect_mig.agent import NodeAgent
from prefect_mig.allocator import SliceRequest
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.model import Layout


def test_agent_publishes_the_backend_layout_and_republishes_when_it_changes(alloc, tmp_path):
    nvml = SimulatedNvml("node-a=1xH100-80GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        backend.apply_layout(0, Layout.parse("H100-80GB", "3g.40gb@0 + 3g.40gb@4"))
        agent = NodeAgent(backend, alloc, node="node-a", docker_url="tcp://127.0.0.1:2375")
        assert agent.publish() == (2, 0, 0)
        lease = alloc.try_acquire(SliceRequest(profile="3g.40gb"))
        assert lease.slice.mig_uuid in {m.mig_uuid for m in backend.instances(0)}
        assert agent.tick() == "ok"
        free = next(m for m in backend.instances(0) if m.mig_uuid != lease.slice.mig_uuid)
        backend.destroy(0, free.gpu_instance_id)
        backend.create(0, "1g.10gb", 4)
        assert agent.tick() == "published"
        kinds = {s["profile"]: s["generation"] for s in alloc.status()["slices"]}
        assert kinds == {"3g.40gb": 2, "1g.10gb": 2}  # the GPU's second layout
        assert alloc.status()["nodes"]["node-a"]["docker_url"] == "tcp://127.0.0.1:2375"


def _cli(*args, env):
    return subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture
def cli_env(redis_server, namespace, tmp_path):
    return {
        **os.environ,
        "PREFECT_MIG_REDIS_URL": redis_server.url,
        "PREFECT_MIG_NAMESPACE": namespace,
        "PREFECT_MIG_BACKEND": "simulated",
        "PREFECT_MIG_SIMULATED_FLEET": "node-a=1xA30-24GB",
        "PREFECT_MIG_STATE_DIR": str(tmp_path),
        "COLUMNS": "150",
    }


def test_lease_commands_acquire_list_renew_and_release(cli_env, tmp_path):
    nvml = SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", "2g.12gb@0 + 1g.6gb@2 + 1g.6gb@3"))
    assert _cli("agent", "--once", env=cli_env).returncode == 0
    got = _cli("lease", "acquire", "--min-memory-gb", "10", "--priority", "3", "--json", env=cli_env)
    assert got.returncode == 0, got.stderr
    lease = json.loads(got.stdout)
    assert lease["slice"]["profile"] == "2g.12gb"
    listed = json.loads(_cli("lease", "list", "--json", env=cli_env).stdout)
    assert [row["lease_id"] for row in listed] == [lease["lease_id"]]
    # numbers as the acquire reply and the HTTP API give them (a new-user trial: they were strings)
    assert listed[0]["fence"] == lease["fence"] and listed[0]["priority"] == 3 and isinstance(listed[0]["expires_at"], int)
    shown = json.loads(_cli("status", "--json", env=cli_env).stdout)["leases"]
    assert shown == listed
    piped = {k: v for k, v in cli_env.items() if k != "COLUMNS"}  # `lease list | grep`: no terminal width
    assert lease["lease_id"] in _cli("lease", "list", env=piped).stdout  # the whole id, not cut at 80 columns
    assert _cli("lease", "renew", lease["lease_id"], "--fence", str(lease["fence"]), env=cli_env).returncode == 0
    stale = _cli("lease", "release", lease["lease_id"], "--fence", "999", env=cli_env)
    assert stale.returncode == 1 and "stale" in stale.stderr
    done = json.loads(_cli("lease", "release", lease["lease_id"], "--fence", str(lease["fence"]), "--json", env=cli_env).stdout)
    assert done == {"lease_id": lease["lease_id"], "released": True}
    status = json.loads(_cli("status", "--json", env=cli_env).stdout)
    assert {s["state"] for s in status["slices"]} == {"free"} and status["queue"] == []


def test_lease_revoke_tells_the_holder_to_stop_and_keeps_the_slice_until_it_releases(cli_env, tmp_path):
    nvml = SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", "4g.24gb@0"))
    assert _cli("agent", "--once", env=cli_env).returncode == 0
    lease = json.loads(_cli("lease", "acquire", "--profile", "4g.24gb", "--json", env=cli_env).stdout)
    revoked = json.loads(_cli("lease", "revoke", lease["lease_id"], "--json", env=cli_env).stdout)
    assert revoked["revoked"] is True
    renew = _cli("lease", "renew", lease["lease_id"], "--fence", str(lease["fence"]), env=cli_env)
    assert renew.returncode == 1 and "revoked by an admin" in renew.stderr
    taken = _cli("lease", "acquire", "--profile", "4g.24gb", "--timeout", "0", env=cli_env)
    assert taken.returncode == 1  # still the holder's until it releases
    assert _cli("lease", "release", lease["lease_id"], "--fence", str(lease["fence"]), env=cli_env).returncode == 0
    assert _cli("lease", "acquire", "--profile", "4g.24gb", "--timeout", "0", env=cli_env).returncode == 0


def _as_typed_at_a_terminal() -> None:
    # a test run started in the background (`cmd &` in a script) ignores SIGINT, and its children
    # inherit that, so Python would not turn the signal into KeyboardInterrupt (the command then
    # waited on, correctly ignoring it); a command typed at a terminal has SIGINT at its default
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_on_a_waiting_lease_acquire_takes_its_request_out_of_the_queue_before_it_exits(cli_env, tmp_path, signum):
    """The withdrawal ran on a daemon thread that died with the process: the request stayed queued
    for the wait TTL (15 s), and could be granted, or preempt a holder, for nobody."""
    nvml = SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", "4g.24gb@0"))
    assert _cli("agent", "--once", env=cli_env).returncode == 0
    assert _cli("lease", "acquire", "--profile", "4g.24gb", "--timeout", "0", env=cli_env).returncode == 0
    waiting = subprocess.Popen(
        [sys.executable, "-m", "prefect_mig.cli.main", "lease", "acquire", "--profile", "4g.24gb", "--priority", "9",
         "--timeout", "60"], env={**cli_env, "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=_as_typed_at_a_terminal,
    )
    deadline = time.monotonic() + 20
    while not json.loads(_cli("status", "--json", env=cli_env).stdout)["queue"]:
        assert time.monotonic() < deadline and waiting.poll() is None
        time.sleep(0.2)
    waiting.send_signal(signum)
    try:
        waiting.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # once in a loaded full run (10 s then): say where it was
        waiting.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        _, stderr = waiting.communicate(timeout=30)
        pytest.fail(f"the command did not exit within 30 s of signal {signum}; its threads:\n{stderr[-6000:]}")
    assert waiting.returncode == 130
    assert json.loads(_cli("status", "--json", env=cli_env).stdout)["queue"] == []


@pytest.mark.parametrize("timeout", ["1e10", "-1", "nan", "inf"])
def test_lease_acquire_with_a_bad_timeout_exits_2_naming_it_and_holds_nothing(cli_env, timeout):
    """A wait past 30 days overflowed a socket timeout after the grant (a traceback and a lease
    held that nobody could release); a negative one was taken for no wait."""
    publish = _cli("agent", "--once", env=cli_env)
    assert publish.returncode == 0, publish.stderr
    done = _cli("lease", "acquire", "--profile", "4g.24gb", "--timeout", timeout, env=cli_env)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "--timeout" in done.stderr and "30 days" in done.stderr
    assert json.loads(_cli("status", "--json", env=cli_env).stdout)["leases"] == []


@pytest.mark.parametrize("command", [["agent"], ["up"]])
def test_a_zero_or_negative_interval_is_refused(cli_env, command):
    done = _cli(*command, "--interval", "0", env=cli_env)
    assert done.returncode == 2 and "--interval" in done.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--profile", "1g.10gb", "--priority", "101"], "--priority"),
        (["--profile", "ten"], "--profile"),
        (["--profile", "1g.6gb", "--tenant", "a b"], "--tenant"),
        (["--profile", "1g.6gb", "--ttl", "0"], "--ttl"),
        (["--min-compute", "9"], "--min-compute"),
        (["--profile", "1g.6gb", "--ttl", "5000"], "--ttl"),  # past the cluster's maximum: was "ttl_s="
    ],
)
def test_lease_acquire_with_a_bad_field_exits_2_naming_it(cli_env, args, named):
    done = _cli("lease", "acquire", *args, env=cli_env)
    assert done.returncode == 2
    assert f"{named}=" in done.stderr.replace("\n", ""), done.stderr  # the option the user typed


def test_agent_stops_task_containers_whose_lease_is_gone_and_keeps_live_ones(alloc, tmp_path, docker_client, python_image):
    from tests.agent_fixtures import start_task_container

    nvml = SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)
    with GpuBackend(nvml) as backend:
        backend.apply_layout(0, Layout.parse("A30-24GB", "2g.12gb@0 + 2g.12gb@2"))
        agent = NodeAgent(backend, alloc, node="node-a", docker_client=docker_client)
        agent.publish()
        live = alloc.try_acquire(SliceRequest(profile="2g.12gb"))
        containers = []

        def start(lease_id, fence):
            containers.append(start_task_container(docker_client, python_image, alloc, lease_id=lease_id, fence=fence))
            return containers[-1]

        try:
            kept = start(live.lease_id, live.fence)
            orphan = start("lease-that-ended", 1)  # e.g. its flow process was killed
            stale = start(live.lease_id, live.fence - 1)  # an older holder of the same lease id
            assert set(agent.fence_containers()) == {orphan.id, stale.id}
            assert {c.id for c in agent.own_containers()} == {kept.id}
        finally:
            for c in containers:
                try:
                    c.remove(force=True)
                except Exception:  # noqa: BLE001 - the agent removed it
                    pass


def test_repartition_commands_plan_a_dry_run_then_desire_the_change(cli_env, namespace, redis_client):
    from prefect_mig.allocator import Allocator

    cluster = Allocator(redis_client, namespace, queue_uncarved=True)
    cluster.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["1g.6gb@0 + 1g.6gb@1 + 1g.6gb@2 + 1g.6gb@3"]})
    cluster.try_acquire(SliceRequest(profile="2g.12gb"), wait=True)
    planned = _cli("repartition", "plan", "--json", env=cli_env)
    assert planned.returncode == 0, planned.stderr
    (row,) = json.loads(planned.stdout)
    assert row["kind"] == "incremental" and "2g.12gb" in row["target"]
    assert cluster.desired(row["gpu_uuid"]) is None  # a dry run desires nothing
    applied = json.loads(_cli("repartition", "apply", "--json", env=cli_env).stdout)
    assert [r["target"] for r in applied] == [row["target"]]
    assert cluster.desired(row["gpu_uuid"])["layout"] == row["target"]
    bad = _cli("repartition", "plan", "--profiles", "tiny", env=cli_env)
    assert bad.returncode == 2 and "--profiles: 'tiny'" in bad.stderr and "classic, extended, all" in bad.stderr
    unit = _cli("repartition", "plan", "--value-by", "size", env=cli_env)
    assert unit.returncode == 2 and "--value-by: 'size' is not allowed; choose request, dominant" in unit.stderr
    dominant = _cli("repartition", "plan", "--json", "--value-by", "dominant", env=cli_env)
    assert dominant.returncode == 0 and json.loads(dominant.stdout)[0]["target"] == row["target"]


def test_status_shows_each_agents_heartbeat_age_and_flags_stale_ones(cli_env, namespace, redis_client):
    import time

    from prefect_mig.allocator import Allocator
    from prefect_mig.node_claim import NodeClaim

    cluster = Allocator(redis_client, namespace)
    cluster.publish_fleet("node-a=1xA30-24GB", layouts={"node-a": ["4g.24gb@0"]}, heartbeat_ttl_s=0.5)
    cluster.publish_fleet("node-b=1xA30-24GB", layouts={"node-b": ["4g.24gb@0"]}, heartbeat_ttl_s=300)
    claim = NodeClaim(cluster, "node-b", ttl_s=300)
    claim.take()
    cluster.heartbeat("node-b", ttl_s=300, agent=claim.held_as())  # as node-b's agent beats
    time.sleep(1.5)
    shown = _cli("status", env=cli_env)
    assert shown.returncode == 0, shown.stderr
    lines = {line.split(":")[0]: line for line in shown.stdout.splitlines() if line.startswith("agent ")}
    assert "STALE" in lines["agent node-a"] and "STALE" not in lines["agent node-b"]
    assert f"(by pid {os.getpid()} on {claim.identity['host']})" in lines["agent node-b"] and "by pid" not in lines["agent node-a"]
    agents = json.loads(_cli("status", "--json", env=cli_env).stdout)["agents"]
    assert agents["node-a"]["stale"] and agents["node-a"]["age_s"] >= 1 and not agents["node-b"]["stale"]
    assert agents["node-b"]["agent"]["pid"] == os.getpid() and agents["node-a"]["agent"] is None
    claim.release()


def test_the_agent_carves_an_empty_gpu_to_the_default_config_and_layout_apply_keeps_busy_slices(cli_env, namespace, redis_client):
    from prefect_mig.allocator import Allocator

    carved = _cli("agent", "--once", env=cli_env)  # a fresh simulated A30: MIG on, no instances
    assert carved.returncode == 0, carved.stderr
    cluster = Allocator(redis_client, namespace)
    assert sorted(s["profile"] for s in cluster.status()["slices"]) == ["1g.6gb", "1g.6gb", "2g.12gb"]  # balanced
    first, second = (cluster.try_acquire(SliceRequest(profile="1g.6gb")) for _ in range(2))
    busy, idle = (first, second) if first.slice.start == 3 else (second, first)
    cluster.release(idle.lease_id, idle.fence)  # the 1g.6gb at memory slice 3 stays leased
    dry = _cli("layout", "apply", "-c", "half", "--dry-run", "--json", env=cli_env)
    assert dry.returncode == 0, dry.stderr
    (row,) = json.loads(dry.stdout)["gpus"]
    assert row["kept"] == ["1g.6gb@3"] and row["left_out"] == ["2g.12gb@2"]
    assert row["carve"] == "2g.12gb@0 + 1g.6gb@3"
    assert cluster.desired(row["gpu_uuid"]) is None  # a dry run desires nothing
    applied = _cli("layout", "apply", "-c", "half", env=cli_env)
    assert applied.returncode == 0 and "kept (busy, not in half): 1g.6gb@3" in applied.stdout
    assert _cli("agent", "--once", env=cli_env).returncode == 0  # the agent carves it
    assert sorted((s["profile"], s["start"]) for s in cluster.status()["slices"]) == [("1g.6gb", 3), ("2g.12gb", 0)]
    assert cluster.lease(busy.lease_id).fence == busy.fence  # the busy slice's lease lives on
    unknown = _cli("layout", "apply", "-c", "nope", env=cli_env)
    assert unknown.returncode == 2 and "'nope'" in unknown.stderr and "balanced" in unknown.stderr
    # found by a new-user trial: a wrong --node did not say which nodes there are
    elsewhere = _cli("layout", "apply", "-c", "half", "--node", "node-q", env=cli_env)
    err = elsewhere.stderr.replace("\n", " ")
    assert elsewhere.returncode == 2 and "node-q" in err and "published: node-a GPU 0" in err, err
    # found by a new-user trial: a config its busy slices keep from being carved is not "already carved"
    again = _cli("layout", "apply", "-c", "half", "--dry-run", "--json", env=cli_env)
    (row,) = json.loads(again.stdout)["gpus"]
    assert row["kept"] == ["1g.6gb@3"] and row["action"] == "left as is: busy slices hold it (1g.6gb@3)", row


def test_api_token_commands_create_list_without_secret_and_revoke(cli_env, redis_server, namespace):
    from prefect_mig.allocator import Keys
    from prefect_mig.allocator.tokens import TokenStore

    made = _cli("api", "token", "create", "--tenant", "team-a", "--max-priority", "50", "--json", env=cli_env)
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)
    store = TokenStore(redis_server.client(), namespace)
    assert store.verify(token["token"]).tenant == "team-a"
    listed = _cli("api", "token", "list", "--json", env=cli_env)
    assert [row["token_id"] for row in json.loads(listed.stdout)] == [token["token_id"]]
    assert token["token"].split(".", 1)[1] not in listed.stdout
    assert token["token"].split(".", 1)[1] not in str(redis_server.client().hgetall(Keys(namespace).api_tokens))
    assert _cli("api", "token", "revoke", token["token_id"], env=cli_env).returncode == 0
    assert store.verify(token["token"]) is None
    again = _cli("api", "token", "revoke", token["token_id"], env=cli_env)
    assert again.returncode == 2 and token["token_id"] in again.stderr
    bad = _cli("api", "token", "create", "--tenant", "team-a", "--max-priority", "101", env=cli_env)
    assert bad.returncode == 2 and "--max-priority" in bad.stderr and "101" in bad.stderr


def test_lease_acquire_without_a_profile_or_minimum_names_the_options_to_give(cli_env):
    """Found by a new-user trial: it said "--request={'profile': None, ...}", an option that does not exist."""
    done = _cli("lease", "acquire", env=cli_env)
    err = done.stderr.replace("\n", "")
    assert done.returncode == 2 and "--request" not in err, err
    assert "--profile 1g.10gb" in err and "--min-memory-gb" in err and "--min-compute" in err, err


def test_lease_renew_with_a_wrong_fence_says_so_without_blaming_another_holder(cli_env):
    """Found by a new-user trial: a typo in --fence of one's own live lease said "another holder owns it"."""
    assert _cli("agent", "--once", env=cli_env).returncode == 0
    lease = json.loads(_cli("lease", "acquire", "--profile", "2g.12gb", "--json", env=cli_env).stdout)
    done = _cli("lease", "renew", lease["lease_id"], "--fence", "1", env=cli_env)
    err = done.stderr.replace("\n", " ")
    assert done.returncode == 1 and "stale or wrong" in err and "another holder" not in err, err
    assert _cli("lease", "release", lease["lease_id"], "--fence", str(lease["fence"]), env=cli_env).returncode == 0


def test_lease_renew_of_a_lease_never_granted_says_it_is_not_held_not_that_the_renew_came_too_late(cli_env):
    """Found by a new-user trial: `lease renew deadbeef` said "renew came too late"."""
    done = _cli("lease", "renew", "deadbeef", "--fence", "1", env=cli_env)
    err = done.stderr.replace("\n", " ")
    assert done.returncode == 1 and "deadbeef is not held here" in err and "too late" not in err, err


def test_an_agent_whose_host_name_the_simulated_fleet_lacks_says_which_node_it_serves_and_how_to_pick(
    cli_env, namespace, redis_client
):
    """Without PREFECT_MIG_NODE it served the fleet's first node without a word."""
    import socket

    from prefect_mig.allocator import Allocator

    fleet = "sim-a=1xA30-24GB,sim-b=1xA30-24GB"
    assert socket.gethostname() not in ("sim-a", "sim-b")
    env = {k: v for k, v in cli_env.items() if k != "PREFECT_MIG_NODE"} | {"PREFECT_MIG_SIMULATED_FLEET": fleet}
    done = _cli("agent", "--once", env=env)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stderr.splitlines() if "serving 'sim-a'" in line]
    assert len(said) == 1 and "WARNING" in said[0], done.stderr
    assert f"this host's name, {socket.gethostname()!r}," in said[0] and "sim-a, sim-b" in said[0]
    assert "PREFECT_MIG_NODE" in said[0] and "--node" in said[0]
    assert sorted(Allocator(redis_client, namespace).status()["nodes"]) == ["sim-a"]
    picked = _cli("agent", "--once", env=env | {"PREFECT_MIG_NODE": "sim-b"})
    assert picked.returncode == 0 and "serving" not in picked.stderr, picked.stderr
    assert sorted(Allocator(redis_client, namespace).status()["nodes"]) == ["sim-a", "sim-b"]


def test_an_agent_given_a_prefect_mig_node_the_simulated_fleet_lacks_exits_2_naming_it(cli_env, namespace, redis_client):
    """It served the fleet's first node instead, as if PREFECT_MIG_NODE were not set (--node was refused)."""
    from prefect_mig.allocator import Allocator

    done = _cli("agent", "--once", env=cli_env | {"PREFECT_MIG_NODE": "node-z"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "PREFECT_MIG_NODE='node-z'" in done.stderr and "nodes: node-a." in done.stderr
    assert Allocator(redis_client, namespace).status()["nodes"] == {}
