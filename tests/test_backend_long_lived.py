"""A long-lived backend (the agent's: one nvmlInit for days) sees what another process carved since:
it keeps no GPU-instance, compute-instance or MIG device handles between calls, so a re-carve by
`prefect-mig layout apply`, mig-parted or nvidia-smi elsewhere never leaves it acting on stale ones."""

from __future__ import annotations

import pytest

from prefect_mig.errors import InstanceNotFound
from prefect_mig.gpu import GpuBackend, SimulatedNvml
from prefect_mig.model import Layout


def test_a_long_lived_backend_sees_a_re_carve_made_by_another_process(tmp_path):
    fleet = "node-a=1xH100-80GB"
    with GpuBackend(SimulatedNvml(fleet, state_dir=tmp_path)) as agent:
        agent.apply_layout(0, Layout.parse("H100-80GB", "3g.40gb@0 + 2g.20gb@4 + 1g.10gb@6"))
        before = agent.instances(0)
        with GpuBackend(SimulatedNvml(fleet, state_dir=tmp_path)) as other:  # another process's NVML
            other.apply_layout(0, Layout.parse("H100-80GB", "4g.40gb@0 + 1g.10gb@4 + 1g.10gb@5 + 1g.10gb@6"))
        now = agent.instances(0)
        assert {str(m.placement) for m in now} == {"4g.40gb@0", "1g.10gb@4", "1g.10gb@5", "1g.10gb@6"}
        went = {m.mig_uuid for m in before if str(m.placement) in {"3g.40gb@0", "2g.20gb@4"}}
        assert went and went.isdisjoint({m.mig_uuid for m in now})  # what the other process destroyed is gone here
        gone = next(m for m in before if str(m.placement) == "3g.40gb@0")
        # its GPU instance id may now name another instance: with what it read, nothing else goes
        with pytest.raises(InstanceNotFound, match="re-carved elsewhere|no GPU instance"):
            agent.destroy(0, gone.gpu_instance_id, expected=gone.placement)
        assert {str(m.placement) for m in agent.instances(0)} == {str(m.placement) for m in now}
