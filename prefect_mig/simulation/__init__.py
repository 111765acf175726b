"""Trace-driven simulation of the allocator and the repartitioner on a virtual clock."""
