"""Every setting, config key and CLI command is documented (STYLE: docs are part of done)."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from quotagate.cli import app
from quotagate.config import _ConfigFile, _GatewayEntry, _ModelEntry, _SimulatorEntry
from quotagate.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DOC = (ROOT / "docs" / "configuration.md").read_text()


def test_every_setting_has_its_env_var_documented() -> None:
    missing = [ENV_PREFIX + name.upper() for name in Settings.model_fields
               if ENV_PREFIX + name.upper() not in CONFIG_DOC]
    assert not missing, f"docs/configuration.md does not name {missing}"


def test_every_config_file_key_is_documented() -> None:
    for section in (_ConfigFile, _ModelEntry, _SimulatorEntry, _GatewayEntry):
        for name in section.model_fields:
            assert re.search(rf"\b{name}\b", CONFIG_DOC), f"config key {name!r} is not in docs/configuration.md"


def _commands(group: typer.Typer, prefix: str = "") -> list[str]:
    click_group = typer.main.get_group(group)
    names: list[str] = []
    for name, cmd in click_group.commands.items():  # type: ignore[attr-defined]
        if hasattr(cmd, "commands"):
            names += [f"{prefix}{name} {sub}" for sub in cmd.commands]
        else:
            names.append(f"{prefix}{name}")
    return names


def test_every_cli_command_is_documented() -> None:
    commands = _commands(app)
    assert {"serve", "migrate", "users create", "tokens create"} <= set(commands)
    for command in commands:
        assert f"quotagate {command}" in CONFIG_DOC, f"`quotagate {command}` is not in docs/configuration.md"


def test_every_cli_option_is_documented() -> None:
    group = typer.main.get_group(app)
    for cmd in [*group.commands.values()]:  # type: ignore[attr-defined]
        subs = list(cmd.commands.values()) if hasattr(cmd, "commands") else [cmd]
        for sub in subs:
            for param in sub.params:
                for opt in param.opts:
                    if opt.startswith("--") and opt != "--help":
                        assert opt in CONFIG_DOC, f"option {opt} of {sub.name} is not in docs/configuration.md"


def test_readme_gives_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "quotagate serve" in readme
    assert "./scripts/test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./scripts/test" in ci, ".ci/run must run the README's test command"
