"""Settings: every GPUPORTAL_* value validated, with errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuportal.hub.errors import ConfigError
from gpuportal.hub.settings import load_settings, parse_db_url
from gpuportal.hub.stack.localray import GpuPlan, parse_demo_gpus, ray_resources


@pytest.mark.parametrize(
    ("raw", "driver", "database"),
    [
        ("", "sqlite+pysqlite", "/data/portal.sqlite"),
        ("sqlite:////var/portal.db", "sqlite+pysqlite", "/var/portal.db"),
        ("postgresql://u@127.0.0.1:5432/portal", "postgresql+psycopg", "portal"),
        ("postgres://u@127.0.0.1/portal", "postgresql+psycopg", "portal"),
        ("postgresql+psycopg://u:pw@127.0.0.1/portal", "postgresql+psycopg", "portal"),
    ],
)
def test_db_urls(raw: str, driver: str, database: str) -> None:
    url = parse_db_url(raw, Path("/data"))
    assert (url.drivername, url.database) == (driver, database)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("not a url", "GPUPORTAL_DB_URL is not a database URL"),
        ("mysql://u@h/db", "uses the driver 'mysql'"),
        ("postgresql://u@127.0.0.1:5432", "names no database"),
    ],
)
def test_bad_db_urls_name_the_variable(raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_db_url(raw, Path("/data"))
    assert "GPUPORTAL_DB_URL" in str(info.value)


def test_password_never_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        parse_db_url("oracle://scott:tiger@db/x", Path("/data"))
    assert "tiger" not in str(info.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GPUPORTAL_PORT": "abc"}, "GPUPORTAL_PORT"),
        ({"GPUPORTAL_PORT": "70000"}, "GPUPORTAL_PORT: Value error, must be a TCP port"),
        ({"GPUPORTAL_RAY_NUM_CPUS": "0"}, "GPUPORTAL_RAY_NUM_CPUS"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict, message: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.port == 8000
    assert settings.data_dir == tmp_path / ".gpuportal"
    assert settings.database_url.database == str(tmp_path / ".gpuportal" / "portal.sqlite")
    assert settings.service_prefix == "/services/portal/"
    assert settings.redis_url == ""


@pytest.mark.parametrize(
    ("spec", "models"),
    [
        ("2xA100-80GB", {"A100-80GB": 2}),
        ("1xA100-80GB,2xL4", {"A100-80GB": 1, "L4": 2}),
        (" 4 x H100 ", {"H100": 4}),
        ("1xL4,1xL4", {"L4": 2}),
    ],
)
def test_demo_gpu_specs(spec: str, models: dict[str, int]) -> None:
    assert parse_demo_gpus(spec) == models


@pytest.mark.parametrize("spec", ["", "A100", "0xA100", "2x", "x2", "100xA100", "2xA100;rm"])
def test_bad_demo_gpu_specs(spec: str) -> None:
    with pytest.raises(ConfigError, match="GPUPORTAL_DEMO_GPUS"):
        parse_demo_gpus(spec)


def test_demo_gpus_are_labelled_in_ray_resources() -> None:
    assert ray_resources(GpuPlan({"A100-80GB": 2}, demo=True, reason="")) == {
        "accelerator_type:A100-80GB": 2.0,
        "gpuportal/demo": 2.0,
    }
    assert ray_resources(GpuPlan({"H100": 8}, demo=False, reason="")) == {
        "accelerator_type:H100": 8.0,
    }
