"""The systemd unit and its example EnvironmentFile.

The unit is linted with `systemd-analyze verify`, which needs no running systemd:
it parses the unit as systemd would, and reports unknown keys, values it cannot
parse, missing executables and dependencies it cannot find. Any line it prints
fails the test, warnings included ("ignoring" means the line has no effect).

As root, the unit is also run, unchanged, by a real systemd booted in namespaces
of its own: it must come up (READY=1), serve over NATS, write its state
directory despite the hardening, and be killed and restarted by the watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from infra import config
from tests.conftest import through
from tests.support import Client, Proxy, connect

# A slow test: real processes, faults or load (pytest -m "not slow" skips it).
pytestmark = pytest.mark.slow

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


# ---------------------------------------------------------------- under a real systemd
#
# The unit file, byte for byte, run by a real systemd (PID 1 of its own PID,
# mount, cgroup and UTS namespaces, so it works where the machine's PID 1 is
# not systemd and leaves the machine's own services alone). Only a drop-in is
# added: a 3 s watchdog instead of 30 s, and the output in a file, there being
# no journald. Everything the unit names is put in place in the namespace's
# own view of the file system, nothing outside it is changed:
#   /opt/registryd          a venv of a Python outside /root, /home and /tmp
#                           (ProtectHome=, PrivateTmp=), whose .pth finds this
#                           checkout and the test venv's site-packages,
#   /etc/registryd/registryd.env   in an overlay over /etc,
#   /run, /tmp, /var/tmp, /var/lib  fresh tmpfs (PrivateTmp= and
#                           StateDirectory= write there),
#   /sys/fs/cgroup          a cgroup2 rooted at a cgroup made for the test,
#   /dev/console            a pty whose output the test keeps.
# systemd loads units only from SYSTEMD_UNIT_PATH (this unit, and stubs for the
# targets its default dependencies require) and runs no generators, so it starts
# nothing but registryd.

SYSTEMD = Path("/lib/systemd/systemd")
TEST_WATCHDOG_SEC = 3
PROJECT = SYSTEMD_DIR.parent

_DROP_IN = f"""\
[Service]
# Test only: a short watchdog, and stdout/stderr in a file (there is no journal).
WatchdogSec={TEST_WATCHDOG_SEC}
StandardOutput=append:/run/stage/registryd.log
StandardError=inherit
"""

# sh, as PID 1 of the new namespaces before it execs systemd.
# $1 the stage directory, $2 the pty for /dev/console, $3 this checkout,
# $4... site-packages directories, bound as /run/stage/site-<n>.
_BOOT = r"""
set -eu
stage=$1 console=$2 project=$3
shift 3
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/stage
mount --bind "$stage" /run/stage
mount --bind "$project" /run/stage/project
n=0
for site in "$@"; do
    mount --bind "$site" "/run/stage/site-$n"
    n=$((n + 1))
done
mkdir /run/overlay
mount -t tmpfs -o mode=0700 tmpfs /run/overlay
for dir in etc opt; do
    mkdir -p "/run/overlay/$dir/upper" "/run/overlay/$dir/work"
    mount -t overlay overlay \
        -o "lowerdir=/$dir,upperdir=/run/overlay/$dir/upper,workdir=/run/overlay/$dir/work" "/$dir"
done
mkdir -p /etc/registryd /opt/registryd
cp /run/stage/registryd.env /etc/registryd/registryd.env
chmod 0600 /etc/registryd/registryd.env
mount --bind /run/stage/venv /opt/registryd
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mount -t tmpfs -o mode=0755 tmpfs /var/lib
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount --bind "$console" /dev/console
exec env -i container=registryd-test \
    SYSTEMD_UNIT_PATH=/run/stage/units \
    SYSTEMD_GENERATOR_PATH=/run/stage/empty \
    SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/run/stage/empty \
    /lib/systemd/systemd --system --unit=registryd.service \
    --log-target=console --log-level=info --log-color=no
"""


def _service_python() -> Path:
    """A Python of this version that the sandboxed service can execute."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    hidden = ("/root/", "/home/", "/run/user/", "/tmp/", "/var/tmp/")
    candidates = [
        Path(os.path.realpath(sys.executable)),
        Path("/usr/bin", version),
        Path("/usr/local/bin", version),
    ]
    for candidate in candidates:
        if candidate.is_file() and not str(candidate).startswith(hidden):
            return candidate
    pytest.fail(
        f"no {version} outside {', '.join(hidden)} (hidden by ProtectHome=/PrivateTmp=), "
        f"tried {[str(c) for c in candidates]}"
    )


def _cgroup2_mount() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[fields.index("-") + 1] == "cgroup2":
            return Path(fields[4])
    pytest.fail("no cgroup2 file system is mounted (systemd needs one)")


def _stage(stage: Path, env: dict[str, str]) -> list[Path]:
    """The files of the namespace under `stage`; the site-packages to bind."""
    sites = sorted({Path(sysconfig.get_path("purelib")), Path(sysconfig.get_path("platlib"))})
    for sub in ["units/registryd.service.d", "empty", "project"] + [
        f"site-{n}" for n in range(len(sites))
    ]:
        (stage / sub).mkdir(parents=True)
    shutil.copyfile(UNIT, stage / "units" / "registryd.service")
    # Stubs for what DefaultDependencies= requires (Requires=sysinit.target);
    # network-online.target is only wanted, and stays "not found".
    for target in ("sysinit", "basic"):
        (stage / "units" / f"{target}.target").write_text(f"[Unit]\nDescription={target} stub\n")
    (stage / "units" / "registryd.service.d" / "test.conf").write_text(_DROP_IN)
    (stage / "registryd.log").touch()

    lines = []
    for name, value in env.items():
        assert "'" not in value and "\n" not in value, f"{name} cannot be quoted: {value!r}"
        lines.append(f"{name}='{value}'\n")
    (stage / "registryd.env").write_text("".join(lines))

    venv = stage / "venv"
    subprocess.run(
        [str(_service_python()), "-m", "venv", "--without-pip", str(venv)],
        check=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        timeout=60,
    )
    (site,) = (venv / "lib").glob("python3*/site-packages")
    paths = ["/run/stage/project"] + [f"/run/stage/site-{n}" for n in range(len(sites))]
    (site / "registryd-test.pth").write_text("".join(f"{p}\n" for p in paths))
    script = venv / "bin" / "registryd"
    script.write_text(
        "#!/opt/registryd/bin/python3\nimport sys\n\nfrom daemon.cli import main\n\n"
        "sys.exit(main())\n"
    )
    script.chmod(0o755)
    # DynamicUser= runs the service as nobody in particular: it must be able to
    # read (and execute) the venv whatever the umask was.
    for root, dirs, files in os.walk(stage):
        for name in dirs + files:
            path = Path(root, name)
            if not path.is_symlink():
                mode = path.stat().st_mode
                path.chmod(mode | 0o444 | (0o111 if path.is_dir() or mode & 0o100 else 0))
    stage.chmod(0o755)
    (stage / "registryd.env").chmod(0o600)
    return sites


def _die_with_parent() -> None:
    """If pytest dies, so does unshare, and with it (--kill-child) the machine."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child_of(pid: int) -> int:
    """The first child of `pid`, or 0."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    return 0


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict((key, value.strip()) for key, _, value in (line.partition(":") for line in lines))


class Machine:
    """A systemd booted in its own namespaces; see the comment above."""

    def __init__(self, stage: Path, name: str) -> None:
        self.stage = stage
        self.cgroup = _cgroup2_mount() / name
        self.console_log = stage.parent / "console.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0  # systemd, as this machine's PID namespace sees it from outside
        self._master, self._slave = os.openpty()
        self._reader = threading.Thread(target=self._drain, daemon=True)

    def _drain(self) -> None:
        # systemd blocks on a full console: read it all along.
        with self.console_log.open("wb") as out:
            while True:
                try:
                    data = os.read(self._master, 65536)
                except OSError:  # EIO: the last writer is gone
                    return
                if not data:
                    return
                out.write(data)
                out.flush()

    async def boot(self, sites: list[Path]) -> None:
        self._reader.start()
        self.cgroup.mkdir()
        (self.stage / "boot.sh").write_text(_BOOT)
        with (self.stage.parent / "machine.log").open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                "sh",
                "-c",
                'echo $$ > "$0/cgroup.procs" && exec "$@"',
                str(self.cgroup),
                *("unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"),
                "--cgroup",
                *("--uts", "--propagation", "private"),
                *("sh", str(self.stage / "boot.sh"), str(self.stage)),
                *(os.ttyname(self._slave), str(PROJECT), *map(str, sites)),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 10
        while not self.pid:
            assert self.proc.returncode is None, f"the namespace failed:\n{self.logs()}"
            self.pid = _child_of(self.proc.pid)
            assert time.monotonic() < deadline, "unshare started no PID 1"
            await asyncio.sleep(0.05)
        # PID 1 is sh setting up the mounts first, then systemd, which answers
        # on its private socket once it is up.
        while True:
            rc, out = await self.run("systemctl", "show", "--property=Version")
            if rc == 0:
                return
            assert self.proc.returncode is None, f"the namespace failed:\n{self.logs()}"
            assert time.monotonic() < deadline, f"systemd did not come up: {out}\n{self.logs()}"
            await asyncio.sleep(0.1)

    async def run(self, *args: str) -> tuple[int, str]:
        """A command inside the machine (its mounts, its PIDs)."""
        proc = await asyncio.create_subprocess_exec(
            *("nsenter", "-t", str(self.pid), "-m", "-p", "--", *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(errors="replace")

    async def show(self, *properties: str) -> dict[str, str]:
        flags = [f"--property={p}" for p in properties]
        rc, out = await self.run("systemctl", "show", *flags, "registryd.service")
        assert rc == 0, out
        return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)

    def host_pid(self, pid: str) -> int:
        """The machine's PID `pid` of the service, as seen from here."""
        procs = self.cgroup / "system.slice" / "registryd.service" / "cgroup.procs"
        for host in procs.read_text().split():
            if _proc_status(int(host))["NSpid"].split()[-1] == pid:
                return int(host)
        raise AssertionError(f"PID {pid} is not in {procs}")

    def logs(self) -> str:
        parts = []
        for name in ("machine.log", "console.log"):
            path = self.stage.parent / name
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {name}\n{text.replace(chr(13), '')}")
        log = (self.stage / "registryd.log").read_text(errors="replace")
        parts.append(f"--- registryd.log\n{log}")
        return "\n".join(parts)

    async def shutdown(self) -> None:
        """Kill everything in the namespaces; the mounts go with the last process."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # init of a PID namespace: all of it dies
        if self.cgroup.is_dir() and (self.cgroup / "cgroup.kill").exists():
            (self.cgroup / "cgroup.kill").write_text("1")
        if self.proc is not None and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        os.close(self._slave)
        if self._reader.is_alive():
            await asyncio.to_thread(self._reader.join, 5)
        os.close(self._master)
        # The kernel frees a cgroup a moment after its last process exits.
        deadline = time.monotonic() + 10
        while self.cgroup.exists():
            for cgroup in sorted(self.cgroup.rglob("*/"), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    cgroup.rmdir()
            with contextlib.suppress(OSError):
                self.cgroup.rmdir()
            if time.monotonic() > deadline:
                raise AssertionError(f"cannot remove {self.cgroup}")
            await asyncio.sleep(0.1)


async def _until_running(machine: Machine, restarts: int, timeout: float = 20) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        state = await machine.show(
            "ActiveState", "SubState", "MainPID", "NRestarts", "Result", "StatusText"
        )
        if state["ActiveState"] == "active" and state["NRestarts"] == str(restarts):
            return state
        failed = state["ActiveState"] == "failed" or int(state["NRestarts"]) > restarts
        assert not failed, f"{state}\n{machine.logs()}"
        assert time.monotonic() < deadline, f"not active in {timeout}s: {state}\n{machine.logs()}"
        await asyncio.sleep(0.1)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: boots systemd in new namespaces")
@pytest.mark.skipif(not SYSTEMD.is_file(), reason=f"no {SYSTEMD} here")
async def test_unit_runs_under_systemd_and_its_watchdog_restarts_it(
    tmp_path: Path,
    nats_url: str,
    database_url: str,
    daemon_env: dict[str, str],
    proxy: Proxy,
) -> None:
    # The service's /tmp is private, and the test database may be a Unix
    # socket under /tmp: reach it over TCP through the proxy.
    env = {k: v for k, v in daemon_env.items() if k.startswith(config.ENV_PREFIX)}
    env.update(
        REGISTRY_DATABASE_URL=through(database_url, proxy.port),
        REGISTRY_STATE_DIR="/var/lib/registryd",
    )
    prefix = env["REGISTRY_SUBJECT_PREFIX"]
    stage = tmp_path / "machine"
    sites = await asyncio.to_thread(_stage, stage, env)
    assert (stage / "units" / "registryd.service").read_bytes() == UNIT.read_bytes()

    machine = Machine(stage, f"registryd-test-{prefix}")
    nc = None
    try:
        await machine.boot(sites)
        nc = await connect(nats_url)
        client = Client(nc, prefix)

        # (a) Type=notify: "active" only once the daemon has sent READY=1.
        first = await _until_running(machine, restarts=0)
        assert first["SubState"] == "running"
        assert first["StatusText"].startswith("serving"), first
        unit = await machine.show("FragmentPath", "DropInPaths", "WatchdogUSec")
        assert unit["FragmentPath"] == "/run/stage/units/registryd.service"
        assert unit["DropInPaths"] == "/run/stage/units/registryd.service.d/test.conf"
        assert unit["WatchdogUSec"] == f"{TEST_WATCHDOG_SEC}s"

        # The sandbox really applies to the process...
        main = machine.host_pid(first["MainPID"])
        status = _proc_status(main)
        uid, gid = status["Uid"].split()[0], status["Gid"].split()[0]
        assert uid != "0", "DynamicUser= should run it unprivileged"
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"  # SystemCallFilter=
        assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0

        # (b) ...and it serves over NATS, with PostgreSQL behind it.
        assert await client.call("list") == []
        node = await client.register("gpu-1")

        # It may write its StateDirectory= (as its user, in its mount namespace)
        # and nothing else.
        probe = (
            "set -e; touch /var/lib/registryd/probe; stat -c '%u %a' /var/lib/registryd/; "
            "for p in /opt/registryd/probe /etc/registryd/probe /var/lib/probe /probe; do "
            'if touch "$p" 2>/dev/null; then echo "wrote $p"; fi; done'
        )
        done = await asyncio.create_subprocess_exec(
            *("nsenter", "-t", str(main), "-m", "--", "setpriv", f"--reuid={uid}"),
            *(f"--regid={gid}", "--clear-groups", "sh", "-c", probe),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await done.communicate()
        assert done.returncode == 0, out.decode()
        assert out.decode().split() == [uid, "700"], out.decode()

        # (c) The daemon pings: alive well past WatchdogSec=...
        await asyncio.sleep(TEST_WATCHDOG_SEC * 1.5)
        still = await machine.show("ActiveState", "MainPID", "NRestarts")
        assert still == {"ActiveState": "active", "MainPID": first["MainPID"], "NRestarts": "0"}

        # ...and a wedged one is killed for it and restarted (Restart=on-failure).
        rc, out = await machine.run(
            "systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", "registryd.service"
        )
        assert rc == 0, out
        stopped = time.monotonic()
        seen: list[dict[str, str]] = []
        while not any(s["Result"] == "watchdog" for s in seen):
            seen.append(await machine.show("ActiveState", "SubState", "Result", "MainPID"))
            assert time.monotonic() - stopped < TEST_WATCHDOG_SEC + 3, f"{seen}\n{machine.logs()}"
            await asyncio.sleep(0.1)
        second = await _until_running(machine, restarts=1)
        assert second["MainPID"] not in ("0", first["MainPID"])
        assert [n["name"] for n in await client.call("list")] == [node["name"]]
        console = machine.console_log.read_text(errors="replace")
        assert f"Watchdog timeout (limit {TEST_WATCHDOG_SEC}s)!" in console, console
    finally:
        if nc is not None:
            await nc.close()
        await machine.shutdown()
