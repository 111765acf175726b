"""Integrations with orchestrators (today: Prefect). Each is a thin layer over the allocator and the
launcher; a second orchestrator is one more module here."""
