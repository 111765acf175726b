"""The ``prefect-mig`` command line (typer + rich)."""
