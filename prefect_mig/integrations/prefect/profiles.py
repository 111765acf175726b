"""Decoration-time checks of what a task asks for: a profile (or minimums) some known GPU model
offers, and well-formed ``mig:`` / ``mig-priority:`` tags. Whether the *fleet* has such a GPU is
known only at run time (the allocator answers then).

Examples:
    ```python
    import pytest

    from prefect_mig.errors import ConfigError
    from prefect_mig.integrations.prefect.profiles import check_known

    check_known("1g.10gb")
    with pytest.raises(ConfigError, match="no GPU model"):
        check_known("5g.1gb")
    ```
"""

from __future__ import annotations

from collections.abc import Iterable

from prefect_mig.errors import ConfigError


def check_known(requirement: str, *, field: str = "profile") -> None:
    """Raise `ConfigError` unless some GPU model in the catalog can satisfy `requirement`."""
    from prefect_mig.model import SliceRequirement, catalog
    from prefect_mig.model.profiles import parse_profile_name

    need = SliceRequirement.parse(requirement, field=field)
    models = catalog().models.values()
    if any(need.candidates(model) for model in models):
        return
    known = sorted({p.name for model in models for p in model.profiles},
                   key=lambda n: (*parse_profile_name(n)[:2], n))  # by compute, then memory
    raise ConfigError(
        f"{field}={requirement!r}: no GPU model prefect-mig knows has a MIG profile that satisfies it. "
        f"Profiles of the known models: {', '.join(known)}.",
        field=field,
        value=requirement,
    )


#: The tag that keeps a task off slices under a flow-level `MigTaskRunner` (even one with a profile).
NO_SLICE_TAG = "mig:none"


def check_tags(tags: Iterable[str]) -> None:
    """Check the ``mig:<profile>`` (or ``mig:none``), ``mig-priority:<n>`` and ``mig-tenant:<name>``
    tags of a task (at decoration time) or of a try (a task's call-time tags, its flow run's)."""
    from pydantic import TypeAdapter, ValidationError

    from prefect_mig.allocator.models import Name

    for tag in tags:
        if tag == NO_SLICE_TAG:
            continue
        if tag.startswith("mig:"):
            check_known(tag[len("mig:"):], field="tags")
        elif tag.startswith("mig-priority:"):
            value = tag[len("mig-priority:"):]
            if not value.lstrip("-").isdigit() or not 0 <= int(value) <= 100:
                raise ConfigError(
                    f"tags: {tag!r} needs a priority from 0 to 100 (e.g. 'mig-priority:5').",
                    field="tags", value=tag,
                )
        elif tag.startswith("mig-tenant:"):
            try:
                TypeAdapter(Name).validate_python(tag[len("mig-tenant:"):])
            except ValidationError:
                raise ConfigError(
                    f"tags: {tag!r} needs a tenant name of 1 to 64 letters, digits and '_.:@-' (e.g. 'mig-tenant:team-a').",
                    field="tags", value=tag,
                ) from None
