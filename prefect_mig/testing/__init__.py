"""Test support: private redis-server processes, the Docker engine and the test image."""
