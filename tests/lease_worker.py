"""A separate process that holds leases, for the multi-process tests (run with ``python -m``).

Modes:
  hold URL NS PROFILE TTL        acquire, print "granted <lease> <fence> <slice>", renew until stdin
                                 closes or the lease is lost ("lost <reason>"), then release
                                 and print "released <True|False>"
  churn URL NS PROFILE TTL N     acquire + hold ~5 ms + release, N times (killed at random by the test);
                                 a waiting request is dropped 1 s after its waiter dies
"""

from __future__ import annotations

import sys
import threading
import time

from prefect_mig.allocator import LeaseClient, SliceRequest


def main() -> None:
    mode, url, ns, profile, ttl = sys.argv[1:6]
    client = LeaseClient(url, ns, wait_ttl_s=1.0)
    if mode == "hold":
        lost = threading.Event()

        def on_lost(lease, exc):
            print(f"lost {getattr(exc, 'reason', type(exc).__name__)}", flush=True)
            lost.set()

        lease = client.acquire(SliceRequest(profile=profile, ttl_s=float(ttl)), on_lost=on_lost)
        print(f"granted {lease.lease_id} {lease.fence} {lease.slice.id}", flush=True)
        sys.stdin.readline()
        print(f"released {lease.release()}", flush=True)
    elif mode == "churn":
        for _ in range(int(sys.argv[6])):
            with client.lease(SliceRequest(profile=profile, ttl_s=float(ttl)), timeout_s=30):
                time.sleep(0.005)


if __name__ == "__main__":
    main()
