"""Launchers: run a task body bound to a leased MIG slice (today: Docker containers)."""

from prefect_mig.launchers.docker import ContainerSettings, DockerLauncher

__all__ = ["ContainerSettings", "DockerLauncher"]
