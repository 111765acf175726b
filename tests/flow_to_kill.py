"""A flow whose task holds a slice for a long time; the test kills this process mid-task."""

import os

from prefect import flow

from prefect_mig import MigTaskRunner, task


def hold_slice():
    import time

    time.sleep(300)


slow = task(task_runner=MigTaskRunner(profile="4g.24gb", lease_ttl_s=2))(hold_slice)


@flow
def doomed():
    slow()


if __name__ == "__main__":
    print("pid", os.getpid(), flush=True)
    doomed()
