"""The README documents every setting, so users never need to read config.py."""

from __future__ import annotations

from pathlib import Path

from sidecar.config import SCHEMA, load_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_setting_is_in_the_readme() -> None:
    text = README.read_text()
    missing = [k.dotted for k in SCHEMA.keys if f"`{k.dotted}`" not in text]
    assert not missing, f"settings missing from README.md: {missing}"


EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "sidecar.example.toml"


def test_the_example_config_has_every_setting_and_loads() -> None:
    text = EXAMPLE.read_text()
    missing = [k.name for k in SCHEMA.keys if f"\n{k.name} = " not in text]
    assert not missing, f"settings missing from docs/sidecar.example.toml: {missing}"
    cfg = load_config(EXAMPLE, {})
    assert cfg.node_id == "my-node"
    assert cfg.api.port == 20202
