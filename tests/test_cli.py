"""The prefect-mig command, run as a user runs it (a subprocess on the installed entry point)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import pytest


def prefect_mig(*args: str, state_dir=None, fleet: str = "node-a=2xH100-80GB") -> subprocess.CompletedProcess:
    env = {**os.environ, "PREFECT_MIG_BACKEND": "simulated", "PREFECT_MIG_SIMULATED_FLEET": fleet, "COLUMNS": "120"}
    if state_dir is not None:
        env["PREFECT_MIG_STATE_DIR"] = str(state_dir)
    return subprocess.run(
        [sys.executable, "-m", "prefect_mig.cli.main", *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.parametrize(("model", "count"), [("H100-80GB", 19), ("A30-24GB", 5), ("A100-40GB", 19)])
def test_layouts_json_lists_every_maximal_layout(model, count):
    done = prefect_mig("layouts", model, "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["count"] == count == len(data["layouts"])
    assert data["gpu_model"] == model


def test_layouts_with_every_profile_add_the_2_slice_1g_and_media_engines():
    data = json.loads(prefect_mig("layouts", "H100-80GB", "--profiles", "all", "--json").stdout)
    assert "1g.20gb" in data["profiles"] and "1g.10gb+me" in data["profiles"]
    data = json.loads(
        prefect_mig("layouts", "H100-80GB", "-p", "1g.10gb,1g.20gb,2g.20gb,3g.40gb,4g.40gb,7g.80gb", "--json").stdout
    )
    assert data["count"] == 78


def test_layouts_are_drawn_as_slice_bars_for_people():
    done = prefect_mig("layouts", "A30-24GB")
    assert done.returncode == 0
    assert "5 maximal layouts of A30-24GB" in done.stdout
    assert "|            4g.24gb            |" in done.stdout


def test_unknown_model_exits_2_and_lists_the_valid_names():
    done = prefect_mig("layouts", "H100")
    assert done.returncode == 2
    assert "unknown GPU model 'H100'" in done.stderr and "H100-80GB" in done.stderr and "A30-24GB" in done.stderr
    assert done.stdout == ""


def test_unknown_profile_exits_2_and_lists_the_models_profiles():
    done = prefect_mig("layouts", "A30-24GB", "--profiles", "1g.10gb")
    assert done.returncode == 2
    assert "1g.6gb" in done.stderr and "4g.24gb" in done.stderr


def test_gpus_json_shows_the_simulated_fleet_with_layouts(tmp_path):
    done = prefect_mig("gpus", "--json", state_dir=tmp_path, fleet="node-a=1xH100-80GB,node-b=1xA30-24GB")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["backend"] == "simulated"
    assert [(g["node"], g["gpu_model"], g["mig_enabled"]) for g in data["gpus"]] == [
        ("node-a", "H100-80GB", True),
        ("node-b", "A30-24GB", True),
    ]
    assert set(data["gpus"][1]["creatable"]) == {"1g.6gb", "1g.6gb+me", "2g.12gb", "2g.12gb+me", "4g.24gb"}


def test_gpus_for_one_node_that_is_not_in_the_fleet_exits_2(tmp_path):
    done = prefect_mig("gpus", "--node", "node-z", state_dir=tmp_path)
    assert done.returncode == 2 and "node-a" in done.stderr


def test_a_bad_setting_exits_2_and_names_the_variable(tmp_path):
    done = prefect_mig("gpus", state_dir=tmp_path, fleet="node-a=1xH999")
    assert done.returncode == 2
    assert "PREFECT_MIG_SIMULATED_FLEET" in done.stderr


def test_an_error_quoting_brackets_is_printed_as_it_is_not_read_as_markup(tmp_path):
    """Error messages quote settings' formats (``redis+sentinel://host[,host...]/service[/db]``) and
    users' values; printed as rich markup they crashed the CLI (MarkupError) or lost a part."""
    env = {**os.environ, "PREFECT_MIG_REDIS_URL": "localhost:6379", "PREFECT_MIG_STATE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "status"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "PREFECT_MIG_REDIS_URL" in done.stderr and "[/db]" in done.stderr
    done = prefect_mig("layouts", "H100[/x]")
    assert done.returncode == 2 and "Traceback" not in done.stderr and "'H100[/x]'" in done.stderr


@pytest.mark.parametrize("state_dir", ["", "/etc/passwd"])
def test_a_state_dir_that_cannot_be_a_directory_exits_2_without_a_traceback(tmp_path, state_dir):
    env = {**os.environ, "PREFECT_MIG_BACKEND": "simulated", "PREFECT_MIG_STATE_DIR": state_dir}
    env.pop("PREFECT_MIG_REDIS_URL", None)
    done = subprocess.run([sys.executable, "-m", "prefect_mig.cli.main", "gpus"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "PREFECT_MIG_STATE_DIR" in done.stderr and repr(state_dir) in done.stderr
    assert list(tmp_path.iterdir()) == []  # nothing left behind in the working directory


def test_version_json_names_prefect_mig_and_its_libraries():
    data = json.loads(prefect_mig("version", "--json").stdout)
    assert {"prefect-mig", "prefect", "nvidia-ml-py"} <= set(data)


def test_demo_carves_the_fleet_and_refuses_to_destroy_a_busy_slice(tmp_path):
    done = prefect_mig("demo", "--no-pipeline", state_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "simulated fleet" in done.stdout
    assert "GPU 0: 3g.40gb@0 + 1g.10gb@4 + 1g.10gb@5 + 1g.10gb@6" in done.stdout
    assert "A busy slice is never destroyed" in done.stdout
    again = prefect_mig("demo", "--no-pipeline", state_dir=tmp_path)  # the layout is already in place
    assert "(0 created, 0 destroyed, the rest kept)" in again.stdout


def _start_demo(state_dir, *, batches: int, stderr) -> subprocess.Popen:
    env_free = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return subprocess.Popen(
        [sys.executable, "-m", "prefect_mig.cli.main", "demo", "--batches", str(batches)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**env_free, "PREFECT_MIG_BACKEND": "simulated", "PREFECT_MIG_STATE_DIR": str(state_dir), "COLUMNS": "120"},
        # its own process group: a timeout kills the demo with its Prefect API server (no orphan)
        start_new_session=True,
    )


def test_demo_runs_the_pipeline_and_reports_where_each_task_ran(tmp_path, python_image):
    proc = _start_demo(tmp_path, batches=4, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the demo took more than 300 s:\n{stdout[-3000:]}{stderr[-3000:]}")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "fine_tune" in out and "3g.40gb@" in out
    assert all(f"infer[{i}]" in out for i in range(4))
    assert "slice utilization" in out and "leases left: 0, waiting: 0" in out
    assert "the flow run's table artifact: prefect-mig-slices-" in out
    # as everything under a state dir: its redis-server's data and log and Prefect's database were 0644
    paths = list(tmp_path.rglob("*"))
    assert any(p.name == "demo-redis" for p in paths) and any(p.name == "prefect.db" for p in paths)
    for path in paths:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"


def test_sigterm_stops_the_demo_with_its_redis_server_and_its_prefect_api(tmp_path, python_image):
    """`kill <pid>` (a supervisor, a container stop) unwinds the demo as Ctrl-C does: before, Python's
    default ended it on the spot and its redis-server and ephemeral Prefect API ran on."""
    import socket
    import threading
    import time

    proc = _start_demo(tmp_path, batches=6, stderr=subprocess.STDOUT)
    lines: list[str] = []
    running = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("running the pipeline"):
                running.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert running.wait(240), "".join(lines)[-3000:]
        port = int(next(line for line in lines if "private redis-server on" in line).split(":")[2].split("/")[0])
        time.sleep(3)  # inside the flow run, where Prefect's own SIGTERM handler is in place
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
        reader.join(timeout=10)
        with pytest.raises(ProcessLookupError):  # nothing of its process group runs on (the Prefect API)
            os.killpg(proc.pid, 0)
        with pytest.raises(OSError):  # its redis-server is stopped
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert "leases left" not in "".join(lines)  # it stopped, it did not run to its end
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
