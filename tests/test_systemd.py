"""The systemd unit and its example EnvironmentFile.

The unit is linted with `systemd-analyze verify`, which needs no running systemd:
it parses the unit as systemd would, and reports unknown keys, values it cannot
parse, missing executables and dependencies it cannot find. Any line it prints
fails the test, warnings included ("ignoring" means the line has no effect).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from daemon import config

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD_DIR / "registryd.service"
ENV_FILE = SYSTEMD_DIR / "registryd.env"

# `KEY=value`, or `#KEY=value` for a setting shown but left at its default.
_ENV_LINE = re.compile(r"^(?P<commented>#?)(?P<name>REGISTRY_[A-Z0-9_]+)=(?P<value>.*)$")

# Settings whose value in the example file is deliberately not the default.
_NOT_DEFAULT_IN_FILE = {
    # The unit's StateDirectory=, instead of ./.registryd relative to "/".
    "state_dir",
}


def unit_directives() -> dict[str, list[str]]:
    """`Key` → every value it is given in the unit (comments dropped)."""
    directives: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def env_entries() -> list[tuple[bool, str, str]]:
    """(commented out, variable, value) for every REGISTRY_ line of the env file."""
    entries = []
    for line in ENV_FILE.read_text().splitlines():
        match = _ENV_LINE.match(line.strip())
        if match:
            entries.append((bool(match["commented"]), match["name"], match["value"]))
    return entries


# ---------------------------------------------------------------- the unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # /opt/registryd and /etc/registryd do not exist here; point the copy at this
    # venv's console script and at a copy of the example env file, so verify can
    # check that ExecStart= really is an executable.
    registryd = Path(sys.executable).parent / "registryd"
    assert registryd.is_file(), f"console script missing: {registryd} (pip install -e .)"
    env_copy = tmp_path / "registryd.env"
    shutil.copy(ENV_FILE, env_copy)
    text = UNIT.read_text()
    for key, value in (("ExecStart", registryd), ("EnvironmentFile", env_copy)):
        text, count = re.subn(rf"(?m)^{key}=.*$", f"{key}={value}", text)
        assert count == 1, f"expected exactly one {key}= in the unit"
    unit = tmp_path / "registryd.service"
    unit.write_text(text)

    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # On the machine this was written on (systemd 252, a container where systemd
    # is not PID 1 and /run/systemd/system is absent) verify prints nothing at
    # all for a clean unit, so nothing is filtered: any line is about the unit
    # (or a unit it names, such as network-online.target) and fails the test.
    # --man=no: whether man pages named by a Documentation= line are installed
    # here says nothing about the unit.
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert lines == [], "systemd-analyze verify complained:\n" + "\n".join(lines)
    assert result.returncode == 0


def test_unit_settings_the_daemon_relies_on() -> None:
    d = unit_directives()
    assert d["Type"] == ["notify"]
    assert d["NotifyAccess"] == ["main"]
    assert d["ExecStart"] == ["/opt/registryd/bin/registryd"]
    assert d["EnvironmentFile"] == ["/etc/registryd/registryd.env"]
    assert d["Restart"] == ["on-failure"]
    assert d["StateDirectory"] == ["registryd"]
    assert d["DynamicUser"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["WantedBy"] == ["multi-user.target"]


def test_unit_stop_timeout_exceeds_the_daemons_grace() -> None:
    from daemon.app import STOP_GRACE

    d = unit_directives()
    (stop,) = d["TimeoutStopSec"]
    assert float(stop) > STOP_GRACE, "systemd would SIGKILL while requests still finish"
    # The daemon pings at half WATCHDOG_USEC; the timeout must leave room for that.
    (watchdog,) = d["WatchdogSec"]
    assert float(watchdog) >= 10


def test_state_dir_in_env_file_is_the_units_state_directory() -> None:
    (state,) = unit_directives()["StateDirectory"]
    active = {name: value for commented, name, value in env_entries() if not commented}
    assert active["REGISTRY_STATE_DIR"] == f"/var/lib/{state}"


# ---------------------------------------------------------------- the env file


def test_env_file_lists_every_setting() -> None:
    listed = [name for _, name, _ in env_entries()]
    expected = {config.ENV_PREFIX + field.upper() for field in config.FIELDS}
    missing = expected - set(listed)
    unknown = set(listed) - expected
    duplicated = {name for name in listed if listed.count(name) > 1}
    assert not missing, f"settings missing from registryd.env: {sorted(missing)}"
    assert not unknown, f"registryd.env names no such setting: {sorted(unknown)}"
    assert not duplicated, f"listed more than once: {sorted(duplicated)}"


def test_env_file_shows_the_defaults() -> None:
    """Unset settings are commented out; the values shown are the real defaults."""
    defaults = config.Settings()
    for commented, name, value in env_entries():
        field = name.removeprefix(config.ENV_PREFIX).lower()
        default = getattr(defaults, field)
        if default is None:
            assert commented, f"{name} is unset by default: comment it out"
            continue
        if field in _NOT_DEFAULT_IN_FILE:
            continue
        shown = getattr(config.load({name: value}), field)
        if hasattr(default, "get_secret_value"):
            shown, default = shown.get_secret_value(), default.get_secret_value()
        assert shown == default, f"{name}={value} is not the default {default!r}"


def test_env_file_active_lines_are_valid_settings() -> None:
    active = {name: value for commented, name, value in env_entries() if not commented}
    settings = config.load(active)
    assert not settings.embedded


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_unit_exposure_rates_ok() -> None:
    """`systemd-analyze security` rates the unit's sandbox "OK" or better (<= 2.0)."""
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(
        r"Overall exposure level for registryd\.service: ([0-9.]+) (\w+)", done.stdout
    )
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0, done.stdout
