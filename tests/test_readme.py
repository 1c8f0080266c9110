"""The README documents every setting, so users never need to read config.py."""

from __future__ import annotations

from pathlib import Path

from sidecar.config import SCHEMA

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_is_in_the_readme() -> None:
    text = README.read_text()
    missing = [k.dotted for k in SCHEMA.keys if f"`{k.dotted}`" not in text]
    assert not missing, f"settings missing from README.md: {missing}"
