"""The deploy files parse, agree with each other, and name only settings that exist.

Docker and flyctl are not needed: the Dockerfile is read with a small parser of its
line syntax, fly.toml and deploy/ltx-sidecar.toml with tomllib, and the sidecar's
configuration is loaded with the real loader and a Fly-like environment.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest

from sidecar.config import ENV_NOT_SETTINGS, SCHEMA, Config, load_config
from sidecar.supervise import parse_command

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
FLY_TOML = DEPLOY / "fly.toml"
SIDECAR_TOML = DEPLOY / "ltx-sidecar.toml"
FLY_DOC = ROOT / "docs" / "fly.md"

DOCKER_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK",
    "LABEL", "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip
ENV_NAME = re.compile(r"\bLTX_SIDECAR_[A-Z0-9_]+")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        keyword, _, args = logical.partition(" ")
        out.append((keyword, args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def fly_env(region: str = "ams") -> dict[str, str]:
    """What Fly.io and `fly secrets set` give a machine of the app in `region`."""
    fly = tomllib.loads(FLY_TOML.read_text())
    return {
        "FLY_APP_NAME": fly["app"],
        "FLY_MACHINE_ID": "148ed193b95389",
        "FLY_REGION": region,
        **fly.get("env", {}),
        "LTX_SIDECAR_TOKEN": "a-shared-secret",
        "LTX_SIDECAR_LEASE_REDIS_URL": "redis://default:secret@redis.example.internal:6379/0",
    }


def image_config() -> Config:
    return load_config(SIDECAR_TOML, env=fly_env())


def load_example_app() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_app", ROOT / "examples" / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# -- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_uses_only_valid_instructions() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    assert instructions, "empty Dockerfile"
    first = instructions[0][0]
    assert first in ("ARG", "FROM"), f"a Dockerfile starts with FROM (or ARG), not {first}"
    for keyword, args in instructions:
        assert keyword in DOCKER_INSTRUCTIONS, f"unknown instruction {keyword!r}"
        assert keyword.isupper(), f"{keyword}: write instructions in upper case"
        assert args, f"{keyword} without arguments"


def resolved_base_images() -> list[str]:
    args: dict[str, str] = {}
    images = []
    for keyword, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], rest.split()[0])
            images.append(image)
    return images


def test_dockerfile_base_image_is_pinned() -> None:
    images = resolved_base_images()
    assert images
    for image in images:
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":")
        assert name == "python", f"base image {image}: expected the official python image"
        # A patch release, not a moving tag such as "3.11-slim" or "latest".
        assert re.fullmatch(r"3\.11\.\d+-slim-bookworm", tag), f"base image {image} is not pinned"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [a for k, a in dockerfile_instructions(DOCKERFILE.read_text()) if k == "USER"]
    assert users, "no USER instruction: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"the image runs as {users[-1]}"


def test_dockerfile_entrypoint_runs_the_sidecar_with_the_baked_in_config() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    entrypoint = [json.loads(a) for k, a in instructions if k == "ENTRYPOINT"]
    assert entrypoint == [["ltx-sidecar", "--config", "/etc/ltx-sidecar.toml"]]
    copies = [a.split() for k, a in instructions if k == "COPY"]
    assert ["deploy/ltx-sidecar.toml", "/etc/ltx-sidecar.toml"] in copies


def test_dockerfile_copies_only_files_that_exist_and_are_in_the_context() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()):
        words = args.split()
        if keyword != "COPY" or any(w.startswith("--from") for w in words):
            continue
        for source in [w for w in words[:-1] if not w.startswith("--")]:
            source = source.rstrip("/")
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert any(source == a or source.startswith(a + "/") for a in allowed), (
                f"COPY {source}: excluded by deploy/Dockerfile.dockerignore"
            )


# -- fly.toml ---------------------------------------------------------------------------------


def fly() -> dict[str, Any]:
    return tomllib.loads(FLY_TOML.read_text())


def test_fly_toml_parses_and_has_the_multi_region_parts() -> None:
    config = fly()
    assert config["app"]
    assert config["env"]["PRIMARY_REGION"] == config["primary_region"]
    assert config["mounts"]["source"] and config["mounts"]["destination"]
    assert config["http_service"]["internal_port"]
    assert config["kill_signal"] == "SIGTERM"


def test_fly_toml_routes_the_public_port_to_the_proxy() -> None:
    cfg = image_config()
    assert cfg.proxy.enabled
    assert fly()["http_service"]["internal_port"] == cfg.proxy.port


def test_fly_health_check_is_the_sidecar_health_endpoint() -> None:
    cfg = image_config()
    checks = fly()["checks"]
    assert any(c["port"] == cfg.api.port and c["path"] == "/health" for c in checks.values())


def test_fly_volume_holds_the_data_dir_and_the_databases() -> None:
    cfg = image_config()
    volume = Path(fly()["mounts"]["destination"])
    for path in [cfg.data_dir, *cfg.databases.dirs, *cfg.databases.paths]:
        assert path == volume or volume in path.parents, f"{path} is not on the volume {volume}"


def test_fly_secrets_are_documented_and_not_set_in_the_file() -> None:
    text = FLY_TOML.read_text()
    for secret in ("LTX_SIDECAR_TOKEN", "LTX_SIDECAR_LEASE_REDIS_URL"):
        assert secret in text, f"{secret} is not documented in fly.toml"
        assert secret not in fly().get("env", {}), f"{secret} is a secret, not an [env] value"


# -- the sidecar's configuration ------------------------------------------------------------


def test_image_config_loads_with_every_key_known() -> None:
    cfg = image_config()  # an unknown key or a bad value raises ConfigError
    assert cfg.lease.type == "redis"
    assert cfg.lease.redis_url.startswith("redis://")
    assert cfg.token == "a-shared-secret"
    assert cfg.node_id == "148ed193b95389"
    assert cfg.api.host == "::"
    assert cfg.fly_app == "ltx-sidecar-example"


@pytest.mark.parametrize(("region", "candidate"), [("ams", True), ("syd", False)])
def test_only_machines_in_the_primary_region_are_candidates(region: str, candidate: bool) -> None:
    assert load_config(SIDECAR_TOML, env=fly_env(region)).candidate is candidate


@pytest.mark.parametrize(
    "path", [FLY_TOML, DOCKERFILE, SIDECAR_TOML, FLY_DOC], ids=lambda p: p.name
)
def test_every_ltx_sidecar_variable_named_is_a_setting(path: Path) -> None:
    known = {key.env for key in SCHEMA.keys} | ENV_NOT_SETTINGS
    named = set(ENV_NAME.findall(path.read_text()))
    assert named <= known, f"{path.name} names unknown settings: {sorted(named - known)}"


def test_exec_commands_run_the_example_app_where_the_image_puts_it() -> None:
    cfg = image_config()
    command, migrate = parse_command(cfg.exec.command), parse_command(cfg.exec.migrate)
    copies = [a.split() for k, a in dockerfile_instructions(DOCKERFILE.read_text()) if k == "COPY"]
    assert ["examples/app.py", command[1]] in copies
    assert migrate[1] == command[1]
    parser = load_example_app().build_parser()
    serve = parser.parse_args(command[2:])
    assert serve.command == "serve"
    assert serve.port == urlsplit(cfg.proxy.target).port
    assert serve.db.name == cfg.proxy.db
    assert any(d in serve.db.parents for d in cfg.databases.dirs)
    assert urlsplit(serve.status_url).port == cfg.api.port
    assert parser.parse_args(migrate[2:]).db == serve.db
