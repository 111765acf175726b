"""The Redis lease allocator: priorities, MIG-aware placement, fenced leases, push wake-ups."""

from prefect_mig.allocator.allocator import Allocator, Queued
from prefect_mig.allocator.keys import Keys
from prefect_mig.allocator.leases import AsyncLeaseClient, Lease, LeaseClient
from prefect_mig.allocator.models import LeaseInfo, ManualClock, Quota, SliceRecord, SliceRequest

__all__ = [
    "Allocator",
    "AsyncLeaseClient",
    "Keys",
    "Lease",
    "LeaseClient",
    "LeaseInfo",
    "ManualClock",
    "Queued",
    "Quota",
    "SliceRecord",
    "SliceRequest",
]
