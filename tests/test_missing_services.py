"""A missing PostgreSQL, Redis or Chromium fails the run unless a laptop opted out."""

from __future__ import annotations

import pytest

from tests import conftest


def test_a_missing_service_fails_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "ALLOW_SKIP", False)
    with pytest.raises(pytest.fail.Exception, match="GPUPORTAL_TEST_ALLOW_SKIP=1"):
        conftest.service_missing("Redis not reachable at redis://127.0.0.1:1/0")


def test_a_laptop_may_opt_into_skipping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "ALLOW_SKIP", True)
    with pytest.raises(pytest.skip.Exception, match="Redis not reachable"):
        conftest.service_missing("Redis not reachable at redis://127.0.0.1:1/0")
