"""Stopping a node agent while it waits: a program that embeds `NodeAgent` stops it from another
thread (`stop`), the CLI from its signal handler (`terminate`). Real Redis (stopped and started by
the test), the simulated NVML."""

from __future__ import annotations

import logging
import signal
import threading
import time

import pytest

from prefect_mig.agent import NodeAgent
from prefect_mig.allocator import Allocator
from prefect_mig.errors import AgentStopped
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.gpu.host_lock import GpuLocks


class _Log(logging.Handler):
    """The agent's log lines as they come; `seen(text, act)` is an event set at the first line holding
    `text`, and calls `act()` then, in the thread that logged it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._watches: list[tuple[str, threading.Event, object]] = []

    def seen(self, text: str, act=None) -> threading.Event:
        event = threading.Event()
        self._watches.append((text, event, act))
        return event

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        for text, event, act in self._watches:
            if text in line and not event.is_set():
                event.set()
                if act is not None:
                    act()


@pytest.fixture
def agent_log():
    handler, logger = _Log(), logging.getLogger("prefect_mig.agent")
    logger.addHandler(handler)
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


@pytest.fixture
def agent(fresh_redis_server, namespace, tmp_path):
    """node-a's agent on one simulated A30, with its own GPU lock dir, on a Redis the test may stop."""
    with GpuBackend(SimulatedNvml("node-a=1xA30-24GB", state_dir=tmp_path)) as backend:
        alloc = Allocator(fresh_redis_server.client(socket_connect_timeout=0.5, socket_timeout=0.5), namespace)
        locks = GpuLocks(tmp_path / "gpu-locks", [g.uuid for g in backend.gpus()], what="node agent", mode="private")
        yield NodeAgent(backend, alloc, node="node-a", heartbeat_ttl_s=60, gpu_locks=locks)


def _in_thread(call) -> tuple[threading.Thread, list]:
    raised: list = []

    def target():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - the test looks at what ended it (SystemExit too)
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, raised


def _serve_with_redis_wait(agent: NodeAgent, served: list, *, interval_s: float = 60) -> None:
    with agent.serving(wait_for_redis=True, interval_s=interval_s):
        served.append(True)


@pytest.mark.parametrize("waiting_in", ["serving(wait_for_redis=True)", "start(retry=True)"])
def test_an_embedded_agent_waiting_for_redis_ends_within_seconds_when_stopped_from_another_thread(
    agent, fresh_redis_server, agent_log, waiting_in
):
    """A program runs the agent in a thread; Redis does not answer, so the agent waits 60 s before its
    next try. `stop()` ends that wait at once: the call raises `AgentStopped` and the thread ends,
    the node left alone (no claim taken, nothing served), instead of after the backoff."""
    fresh_redis_server.kill()
    waiting, served = agent_log.seen("retrying in 60.0 s"), []
    if waiting_in.startswith("serving"):
        thread, raised = _in_thread(lambda: _serve_with_redis_wait(agent, served))
    else:
        thread, raised = _in_thread(lambda: agent.start(interval_s=60))
    assert waiting.wait(30), agent_log.lines
    agent.stop()
    stopped = time.monotonic()
    thread.join(30)
    took = time.monotonic() - stopped
    assert not thread.is_alive() and took < 5, f"ended {took:.1f} s after stop(), not at once"
    assert [type(e) for e in raised] == [AgentStopped], raised
    assert served == []
    fresh_redis_server.restart()
    assert agent.allocator.redis.get(agent.allocator.keys.agent("node-a")) is None


def test_stop_ends_a_run_under_way_at_once_whatever_stop_event_the_run_was_given(agent):
    """`run(stop=event)` in a thread, ticking every 60 s: `stop()` ends it within seconds, its claim
    given back; a stopped agent stays stopped (a later `start` raises before it publishes)."""
    alloc = agent.allocator
    thread, raised = _in_thread(lambda: agent.run(interval_s=60, stop=threading.Event()))
    deadline = time.monotonic() + 30
    while not alloc.redis.hexists(alloc.keys.nodes, "node-a"):
        assert time.monotonic() < deadline and thread.is_alive(), raised
        time.sleep(0.05)
    agent.stop()
    thread.join(5)
    assert not thread.is_alive() and raised == []
    assert alloc.redis.get(alloc.keys.agent("node-a")) is None, "the claim was not given back"
    with pytest.raises(AgentStopped):
        agent.start()


@pytest.mark.parametrize("stopped_by", ["SIGTERM", "stop()"])
def test_an_agent_stopped_just_after_it_won_its_claim_gives_the_claim_back_at_once(
    agent, fresh_redis_server, agent_log, stopped_by
):
    """The agent waited for Redis; the stop lands right after its claim went through (the signal
    handler, `terminate`, as the CLI installs it, or `stop()` from another thread). The claim is
    given back as the agent ends, so a restarted agent or one on another host takes the node at
    once instead of waiting out the 60 s TTL."""
    alloc = agent.allocator
    gpu = agent.backend.gpus()[0].uuid
    fresh_redis_server.kill()
    stop = (lambda: agent.terminate(signal.SIGTERM)) if stopped_by == "SIGTERM" else agent.stop
    claimed = agent_log.seen("Redis answers; the agent claimed the node", act=stop)
    waiting, served = agent_log.seen("waits for Redis"), []
    thread, raised = _in_thread(lambda: _serve_with_redis_wait(agent, served, interval_s=0.2))
    assert waiting.wait(30), agent_log.lines
    fresh_redis_server.restart()
    thread.join(30)
    assert claimed.is_set() and not thread.is_alive(), agent_log.lines
    assert served == []
    assert [type(e) for e in raised] == [SystemExit if stopped_by == "SIGTERM" else AgentStopped], raised
    assert alloc.redis.get(alloc.keys.agent("node-a")) is None, "the node's claim was left to lapse"
    assert alloc.redis.get(alloc.keys.gpu_agent(gpu)) is None, "the GPU's claim was left to lapse"
