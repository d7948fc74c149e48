"""The README documents every setting, so an operator can find each knob."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuportal.hub.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
SETTINGS = sorted(
    f"GPUPORTAL_{name.upper()}"
    for name, field in Settings.model_fields.items()
    if field.validation_alias is None
)


@pytest.mark.parametrize("variable", SETTINGS)
def test_every_setting_is_in_the_readme(variable: str) -> None:
    assert f"`{variable}`" in README


def test_readme_has_the_two_commands() -> None:
    assert "make run" in README
    assert "make test" in README
