"""Every Redis key the allocator uses, in one place.

All keys of one cluster share the prefix ``pmig:{<namespace>}:``; the braces are a Redis Cluster
hash tag, so every script's keys live in one slot.

Fixed keys reach the scripts in ``KEYS``. Keys named after an entity the script itself picks (the
waiter a release hands a slice to, the wait queue of the freed profile, the slices of one GPU) cannot
be known by the caller beforehand, so scripts receive the prefix in ``ARGV[1]`` and append the same
suffixes this module documents (``lease:<id>``, ``waiter:<id>``, ``waitq:<pkey>``, ``free:<pkey>``,
``gpu_slices:<gpu_uuid>``, ``node_slices:<node>``, ``tenant_waiting:<tenant>``,
``preemptible:<pkey>``, ``notice:<lease_id>``, ``warm:<pkey>``). A key the caller knows (the
node's claim, ``agent:<node>``; for ``forget_node`` also the node's slice set, its tombstone
``forgotten:<node>`` and its GPUs' claims, ``gpu_agent:<gpu_uuid>``; for ``publish`` the tombstone)
comes in ``KEYS`` after the fixed ones. The
functions below are the only other place these names appear; a test checks that every suffix the
Lua builds has one.
"""

from __future__ import annotations

import re

_NAMESPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def prefix(namespace: str) -> str:
    """``pmig:{ns}:``; the namespace must be letters, digits, ``_ . -`` (validated by Settings too)."""
    if not _NAMESPACE.match(namespace):
        raise ValueError(f"namespace: {namespace!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return f"pmig:{{{namespace}}}:"


class Keys:
    """The keys of one namespace.

    Examples:
        ```python
        from prefect_mig.allocator.keys import Keys

        k = Keys("prod")
        assert k.lease("abc") == "pmig:{prod}:lease:abc"
        assert k.free("H100-80GB/1g.10gb") == "pmig:{prod}:free:H100-80GB/1g.10gb"
        ```
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = prefix(namespace)
        p = self.prefix
        # fixed keys
        self.slices = p + "slices"  # HASH slice_id -> SliceRecord JSON
        # HASH slice_id -> free | draining | unavailable | withdrawn | quarantined | leased|<lease_id>
        self.slice_state = p + "slice_state"
        self.gpus = p + "gpus"  # HASH gpu_uuid -> GPU JSON (node, model, index, draining)
        self.draining = p + "draining"  # SET of GPU UUIDs that get no new grants
        self.nodes = p + "nodes"  # HASH node -> NodeRecord JSON
        self.node_deadline = p + "node_deadline"  # ZSET node -> heartbeat deadline (ms)
        self.pkeys = p + "pkeys"  # SET of "<gpu model>/<profile>" carved now (a slice of it is published)
        self.leases = p + "leases"  # ZSET lease_id -> expiry (ms)
        self.fence = p + "fence"  # STRING counter: fencing tokens
        self.seq = p + "seq"  # STRING counter: request order
        self.requests = p + "requests"  # HASH request_id -> waiting request JSON
        self.waiting = p + "waiting"  # ZSET request_id -> order score (all waiting requests)
        self.wait_deadline = p + "wait_deadline"  # ZSET request_id -> give up at (ms)
        self.tenant_slices = p + "tenant_slices"  # HASH tenant -> slices held (tenants with a quota)
        self.tenant_compute = p + "tenant_compute"  # HASH tenant -> compute slices held (same)
        self.quotas = p + "quotas"  # HASH tenant -> {"slices": n, "compute": n} JSON
        self.events = p + "events"  # STREAM of transitions
        # HASH model name -> GpuModel JSON: models node agents built from NVML (GPUs outside the catalog)
        self.models = p + "models"
        # HASH event:<type> -> count (every transition, never trimmed), and the metrics' histograms:
        # wait_ms:<bucket> / held_ms:<bucket> -> count, wait_ms:sum / held_ms:sum -> ms
        self.counters = p + "counters"
        self.usage_cursor = p + "usage_cursor"  # STRING: the last events-stream id folded into usage hours
        self.usage_hours = p + "usage_hours"  # ZSET hour start (ms) -> same: the hours with a usage hash
        # HASH slice_id -> JSON [carved since (ms), "node/gpu index", profile]: slices whose carved time
        # the usage roll-up has credited up to `since` (prefect_mig.usage: idle slice-hours)
        self.usage_carved = p + "usage_carved"
        self.desired = p + "desired"  # HASH gpu_uuid -> desired layout JSON (the repartitioner's)
        self.repartitioner = p + "repartitioner"  # STRING with a TTL: a repartitioner is running
        self.withholding = p + "withholding"  # SET of slice ids withdrawn for a re-carve (see withdraw.lua)
        # STRING: this cluster's id, made with SET NX on first use; task containers carry it in a label
        self.cluster_id = p + "cluster_id"
        self.heartbeats = p + "heartbeats"  # HASH node -> {"at": ms, "ttl_ms": ms} of its agent's last heartbeat
        self.config = p + "config"  # HASH cluster settings kept in Redis: grace_ms (preemption grace)
        # STRING: when this Redis state began (ms). Missing = Redis lost everything (FLUSHALL, a new
        # server without AOF); the next script writes a new one and a cluster.epoch event.
        self.epoch = p + "epoch"
        # ZSET slice_id -> settles at (ms): published after a new epoch, or its holder's lease expired
        self.quarantine = p + "quarantine"
        # HASH slice_id -> the expired lease whose task container the node's agent has not yet
        # confirmed gone (see settle.lua); such a slice is 'quarantined'
        self.awaiting_fence = p + "awaiting_fence"
        # STRING: the run_id of the Redis server the scripts last ran on; another one means Redis
        # restarted (or failed over) and may have lost its last writes (see the end of _lib.lua)
        self.run_id = p + "run_id"
        # HASH token_id -> {"tenant", "max_priority", "admin", "sha256", "created_at"} JSON (HTTP API clients)
        self.api_tokens = p + "api_tokens"
        self.drained_nodes = p + "drained_nodes"  # SET of nodes drained for maintenance: no new grants
        # LIST of JSON: lease expiries and agents gone silent, kept (capped) until a process that emits
        # Prefect events takes them (Allocator.reap_announced), so each is emitted once
        self.announce = p + "announce"

    # per-entity keys (scripts build the same names from the prefix)
    def lease(self, lease_id: str) -> str:
        return f"{self.prefix}lease:{lease_id}"

    def waiter(self, request_id: str) -> str:
        return f"{self.prefix}waiter:{request_id}"

    def waitq(self, pkey: str) -> str:
        return f"{self.prefix}waitq:{pkey}"

    def free(self, pkey: str) -> str:
        return f"{self.prefix}free:{pkey}"

    def gpu_slices(self, gpu_uuid: str) -> str:  # HASH slice_id -> "<start>|<pkey>"
        return f"{self.prefix}gpu_slices:{gpu_uuid}"

    # STRING with a TTL: the node agent serving the node (NodeAgent.claim); the scripts an agent runs for
    # its node get it in KEYS, after the fixed ones, and refuse a write once it names another agent
    def agent(self, node: str) -> str:
        return f"{self.prefix}agent:{node}"

    def gpu_agent(self, gpu_uuid: str) -> str:  # STRING with a TTL: the node agent serving the GPU (same)
        return f"{self.prefix}gpu_agent:{gpu_uuid}"

    def node_slices(self, node: str) -> str:  # SET of the node's slice ids
        return f"{self.prefix}node_slices:{node}"

    # STRING, no TTL: `node forget --host-is-gone` left the node; its next publish quarantines every
    # slice until its agent fenced the node's task containers (see publish.lua), and takes it away
    def forgotten(self, node: str) -> str:
        return f"{self.prefix}forgotten:{node}"

    def tenant_waiting(self, tenant: str) -> str:  # ZSET request_id -> order (the tenant's waiters)
        return f"{self.prefix}tenant_waiting:{tenant}"

    def notice(self, lease_id: str) -> str:  # LIST pushed to the holder: revoked|<priority of the request>
        return f"{self.prefix}notice:{lease_id}"

    def usage(self, hour_ms: int) -> str:  # HASH "<by>=<value>|<metric>" -> sum (prefect_mig.usage)
        return f"{self.prefix}usage:{hour_ms}"

    def preemptible(self, pkey: str) -> str:  # ZSET lease_id -> priority (revocable leases of a kind)
        return f"{self.prefix}preemptible:{pkey}"

    def warm(self, pkey: str) -> str:  # ZSET lease_id -> warm since (ms): idle warm leases of a kind
        return f"{self.prefix}warm:{pkey}"
