from __future__ import annotations

import pytest

from prefect_mig.errors import ConfigError
from prefect_mig.settings import load_settings


def test_settings_come_from_prefect_mig_environment_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", "redis://127.0.0.1:6390/0")
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", "prod")
    monkeypatch.setenv("PREFECT_MIG_BACKEND", "simulated")
    monkeypatch.setenv("PREFECT_MIG_SIMULATED_FLEET", "n1=1xA30-24GB")
    monkeypatch.setenv("PREFECT_MIG_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("PREFECT_MIG_DOCKER_HOST", "tcp://127.0.0.1:2375")
    monkeypatch.setenv("PREFECT_MIG_NODE", "n1")
    s = load_settings()
    assert (s.redis_url, s.namespace, s.backend, s.state_dir, s.docker_host, s.node) == (
        "redis://127.0.0.1:6390/0",
        "prod",
        "simulated",
        tmp_path,
        "tcp://127.0.0.1:2375",
        "n1",
    )
    assert s.fleet().gpu_models("n1") == ["A30-24GB"]


def test_defaults_use_an_embedded_redis_and_pick_the_backend_automatically(monkeypatch):
    for name in ("REDIS_URL", "BACKEND", "SIMULATED_FLEET"):
        monkeypatch.delenv(f"PREFECT_MIG_{name}", raising=False)
    s = load_settings()
    assert s.redis_url is None and s.backend == "auto"
    assert s.fleet().gpu_models("node-a") == ["H100-80GB", "H100-80GB"]


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("BACKEND", "cuda", "'auto', 'nvml' or 'simulated'"),
        ("REDIS_URL", "http://localhost", "redis://"),
        ("NAMESPACE", "a b", "pattern"),
        ("SIMULATED_FLEET", "node-a=1xH999", "unknown GPU model 'H999'"),
        ("WAIT_TTL_S", "0", "greater than 0"),
        ("WAIT_TIMEOUT_S", "1e9", "less than or equal to 2592000"),  # was accepted, then refused at each try
        ("STATE_DIR", "", "a directory"),
        ("STATE_DIR", "/etc/passwd", "not a directory"),
        ("STATE_DIR", "/etc/passwd/state", "/etc/passwd exists and is not a directory"),
    ],
)
def test_a_bad_variable_is_named_with_its_value_and_what_is_allowed(monkeypatch, variable, value, complaint):
    monkeypatch.setenv(f"PREFECT_MIG_{variable}", value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert f"PREFECT_MIG_{variable}={value!r}" in message and complaint in message
    assert refused.value.field == variable.lower()


def test_a_too_short_api_token_is_refused_in_characters_without_echoing_the_secret(monkeypatch):
    # a new-user trial: "PREFECT_MIG_API_TOKEN='<the secret>': Value should have at least 16 items"
    monkeypatch.setenv("PREFECT_MIG_API_TOKEN", "admin-secret-13")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert "admin-secret-13" not in message and "admin-secret-13" not in repr(refused.value.value), message
    assert "PREFECT_MIG_API_TOKEN" in message and "at least 16 characters" in message and "items" not in message
    assert refused.value.field == "api_token"


@pytest.mark.parametrize("url", ["rediss//:hunter2-secret@127.0.0.1:6379/0", "redis://:hunter2-secret@127.0.0.1:notaport/0"])
def test_a_malformed_redis_url_is_refused_naming_it_without_its_password(monkeypatch, url):
    """Found by a new-user trial: a mistyped scheme echoed the URL's password, and a port that is no
    number ended `prefect-mig status` in a raw ValueError traceback."""
    from prefect_mig.allocator.connection import connect

    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", url)
    with pytest.raises(ConfigError) as bad:
        connect(load_settings())
    assert bad.value.field == "redis_url" and "hunter2-secret" not in str(bad.value)
    assert ":***@127.0.0.1" in str(bad.value) and "redis://" in str(bad.value)  # the value as given, and what is allowed


def test_settings_are_read_once_and_again_when_a_variable_or_the_env_file_changes(monkeypatch, tmp_path):
    from prefect_mig.settings import clear_settings_cache

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", "first")
    first = load_settings()
    assert load_settings() is first  # not read again while nothing changed
    monkeypatch.setenv("PREFECT_MIG_NAMESPACE", "second")
    assert load_settings().namespace == "second"
    monkeypatch.delenv("PREFECT_MIG_NAMESPACE")
    (tmp_path / ".env").write_text("PREFECT_MIG_NAMESPACE=from-file\n")
    assert load_settings().namespace == "from-file"
    (tmp_path / ".env").write_text("PREFECT_MIG_NAMESPACE=from-file-too\n")  # a new size, a new mtime
    assert load_settings().namespace == "from-file-too"
    cached = load_settings()
    clear_settings_cache()
    assert load_settings() is not cached
    monkeypatch.setenv("PREFECT_MIG_WAIT_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError):  # a bad value still fails each time, naming the variable
        load_settings()


def test_the_wait_ttl_setting_reaches_the_clients_built_from_settings(monkeypatch):
    """``PREFECT_MIG_WAIT_TTL_S`` is how long a queued request outlives its waiter's silence, for
    the lease client (and the task runner and CLI, built the same way); the default is 15 s."""
    from prefect_mig.allocator import LeaseClient

    monkeypatch.setenv("PREFECT_MIG_REDIS_URL", "redis://127.0.0.1:6390/0")  # not dialled here
    monkeypatch.delenv("PREFECT_MIG_WAIT_TTL_S", raising=False)
    assert LeaseClient.from_settings().allocator.wait_ttl_ms == 15_000
    monkeypatch.setenv("PREFECT_MIG_WAIT_TTL_S", "40")
    assert LeaseClient.from_settings().allocator.wait_ttl_ms == 40_000


def test_a_relative_state_dir_is_made_absolute_against_the_working_directory(monkeypatch, tmp_path):
    # the embedded redis-server runs elsewhere: a relative path in its config would point nowhere
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_MIG_STATE_DIR", "relstate")
    s = load_settings()
    assert s.state_dir == tmp_path / "relstate" and s.state_dir.is_absolute()
    assert not (tmp_path / "relstate").exists()  # reading the settings creates nothing
