"""Runs inside the task container: load the cloudpickled call, run it, write the outcome back.

This file is copied into the container (with the host's cloudpickle) through the Docker API; it
needs nothing but the Python standard library and that cloudpickle. Exit codes: 0 when an outcome
(a value or an exception) was written, 3 when not even that was possible.
"""

import os
import sys
import traceback

HOME = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HOME, "site"))

import cloudpickle  # noqa: E402


def main() -> int:
    with open(os.path.join(HOME, "payload.pkl"), "rb") as f:
        fn, args, kwargs = cloudpickle.load(f)
    try:
        outcome = ("ok", fn(*args, **kwargs), None)
    except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the flow
        tb = traceback.format_exc()
        try:
            cloudpickle.dumps(exc)
            outcome = ("error", exc, tb)
        except Exception:  # noqa: BLE001 - an exception that does not pickle travels as text
            outcome = ("error", None, tb)
    try:
        data = cloudpickle.dumps(outcome)
    except Exception:  # noqa: BLE001 - an unpicklable return value
        data = cloudpickle.dumps(("error", None, "the task's return value cannot be pickled:\n" + traceback.format_exc()))
    tmp = os.path.join(HOME, "result.pkl.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(HOME, "result.pkl"))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
