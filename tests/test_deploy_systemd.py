"""deploy/finopsd.service: what it sets, what systemd makes of it, and that finopsd runs so.

No systemd runs here as the service manager, so the unit is never started. What
is checked instead:

- its settings, read from the file (every assignment kept, as systemd does for
  list settings such as Environment= and LoadCredential=): notify service, watchdog,
  restarts, dynamic user, credentials, sandbox;
- its environment, with systemd's %d and %S expanded, loads with finopsd's own
  loader, and the watchdog timeout it sets gives the ping cadence the daemon uses;
- where systemd-analyze is installed: ``verify`` has nothing to say about it and
  ``security --offline=yes`` rates its exposure at most ``EXPOSURE_MAX``;
- the daemon's libraries work under its seccomp filters (tests/systemd_sandbox.py:
  MemoryDenyWriteExecute, RestrictAddressFamilies, SystemCallFilter); the embedded
  broker starts where /proc holds only processes (ProcSubset=pid).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finopsd.config import load_settings
from finopsd.service.notify import Notifier, Watchdog

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "finopsd.service"
SANDBOX = Path(__file__).with_name("systemd_sandbox.py")
EXPOSURE_MAX = 1.1
"""``systemd-analyze security --offline=yes`` of the unit, measured with systemd 252."""

HARDENING = {
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "PrivateMounts": "yes",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
    "UMask": "0077",
}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections → keys → every value assigned, in order (``#``/``;`` comments,
    backslash continuations). configparser keeps only the last of repeated keys,
    which loses Environment= and LoadCredential= lines."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    lines = iter(text.splitlines())
    for raw in lines:
        line = raw.strip()
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines, "").strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    """A systemd time span such as ``30s``, ``1min 30s`` or ``500ms``."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())["Service"]


def last(service: dict[str, list[str]], key: str) -> str:
    assert key in service, f"{key}= is not set"
    return service[key][-1]


def environment(service: dict[str, list[str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in service.get("Environment", []):
        for assignment in line.split():
            name, _, value = assignment.partition("=")
            env[name] = value
    return env


def test_a_notify_service_with_a_watchdog_restarted_on_failure(
    service: dict[str, list[str]],
) -> None:
    assert last(service, "Type") == "notify"
    assert last(service, "NotifyAccess") == "main"
    assert last(service, "ExecStart").endswith("/bin/finopsd run")  # config: FINOPSD_CONFIG
    assert last(service, "Restart") == "on-failure"
    assert seconds(last(service, "RestartSec")) > 0
    assert "2" in last(service, "RestartPreventExitStatus").split()  # a config error
    assert seconds(last(service, "TimeoutStopSec")) >= 30  # the batch in flight is stored
    watchdog = seconds(last(service, "WatchdogSec"))
    assert watchdog == 30
    # what systemd passes the daemon, and the cadence the daemon pings at
    notifier = Notifier.from_environ(
        {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": str(int(watchdog * 1e6))}
    )
    w = Watchdog(notifier)
    assert w.timeout_s == 30 and w.interval_s == 15


def test_a_dynamic_user_with_the_store_in_its_state_directory(
    service: dict[str, list[str]],
) -> None:
    assert last(service, "DynamicUser") == "yes"
    assert "User" not in service
    assert last(service, "StateDirectory") == "finopsd"
    assert last(service, "UMask") == "0077"
    env = environment(service)
    assert env["FINOPSD_STORE__PATH"].startswith("%S/finopsd/")
    assert env["FINOPSD_CONFIG"] == "/etc/finopsd/config.toml"


def test_secrets_come_as_credentials_not_environment(service: dict[str, list[str]]) -> None:
    credentials = dict(line.split(":", 1) for line in service["LoadCredential"])
    assert set(credentials) >= {"api-token", "slack-webhook-url", "slack-signing-secret"}
    for name, source in credentials.items():
        # a name, not a path: looked up in /etc/credstore/ and skipped when absent
        assert "/" not in source and source == f"finopsd.{name}", (name, source)
    env = environment(service)
    assert env["FINOPSD_API__TOKEN_FILE"] == "%d/api-token"
    secretive = re.compile(r"PASSWORD|SECRET|TOKEN$|WEBHOOK")
    assert [k for k in env if secretive.search(k)] == []
    assert "EnvironmentFile" not in service or all(
        f.startswith("-") for f in service["EnvironmentFile"]
    )


def test_finopsd_loads_the_units_environment(service: dict[str, list[str]], tmp_path: Path) -> None:
    """%d and %S expanded as systemd does for finopsd.service (``/run/credentials/
    finopsd.service``, ``/var/lib``), here under tmp_path; the config file empty."""
    credentials = tmp_path / "run" / "credentials" / "finopsd.service"
    credentials.mkdir(parents=True)
    (credentials / "api-token").write_text("0123456789abcdef0123456789abcdef\n")
    state = tmp_path / "var" / "lib"
    (state / "finopsd").mkdir(parents=True)
    config = tmp_path / "config.toml"
    config.write_text("")
    env = {
        k: v.replace("%d", str(credentials)).replace("%S", str(state))
        for k, v in environment(service).items()
    }
    env["FINOPSD_CONFIG"] = str(config)
    settings = load_settings(env=env)
    assert settings.api.token_file == credentials / "api-token"
    assert settings.store.path.parent == state / "finopsd"
    assert env["POLARS_SKIP_CPU_CHECK"] == "1"  # see test_the_libraries_run_under_the_filters


def test_sandbox_settings_and_exposure(service: dict[str, list[str]], tmp_path: Path) -> None:
    """The settings systemd-analyze rates, from the file; with systemd-analyze, its score
    and a clean verify (ExecStart pointed at an interpreter that exists here)."""
    assert {key: last(service, key) for key in HARDENING} == HARDENING
    filters = service["SystemCallFilter"]
    assert filters == ["@system-service", "~@privileged @resources"]
    if shutil.which("systemd-analyze") is None:
        return  # the settings above are what the score is made of
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    match = re.search(r"Overall exposure level for finopsd\.service: (\d+(?:\.\d+)?)", out.stdout)
    assert match, out.stdout[-2000:]
    assert float(match.group(1)) <= EXPOSURE_MAX, out.stdout
    copy = tmp_path / "finopsd.service"
    copy.write_text(
        re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={sys.executable} -m", UNIT.read_text())
    )
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=120
    )
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr


LIBRARIES = textwrap.dedent(
    """
    import duckdb, io, numpy, polars, pyarrow as pa, pyarrow.json, socket
    import finopsd.daemon, finopsd.analyzers.runner
    numpy.dot(numpy.ones((64, 64)), numpy.ones((64, 64)))
    table = pyarrow.json.read_json(io.BytesIO(b'{"a": 1}\\n{"a": 2}\\n'))
    con = duckdb.connect()
    assert con.from_arrow(table).aggregate("sum(a)").fetchone() == (3,)
    frame = polars.from_arrow(table).sort("a")
    assert frame.join_asof(frame, on="a").height == 2
    socket.socket(socket.AF_INET6).close()
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
    except OSError:
        print("netlink refused")
    print("ok")
    """
)


def sandboxed(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    groups: list[str] = []
    if shutil.which("systemd-analyze") is not None:
        groups = ["--allow", "@system-service", "--deny", "@privileged", "@resources"]
    return subprocess.run(
        [sys.executable, str(SANDBOX), *groups, "--", sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_libraries_run_under_the_filters(service: dict[str, list[str]]) -> None:
    """DuckDB, Arrow, polars and numpy under MemoryDenyWriteExecute and the system call
    filter, with the unit's environment; polars' CPU check is what needs it."""
    base = {k: v for k, v in os.environ.items() if k != "POLARS_SKIP_CPU_CHECK"}
    unit_env = {k: v for k, v in environment(service).items() if "%" not in v}
    ok = sandboxed(LIBRARIES, {**base, **unit_env})
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.split() == ["netlink", "refused", "ok"]
    without = sandboxed("import polars", base)
    assert without.returncode != 0
    assert "mprotect" in without.stderr  # what MemoryDenyWriteExecute refuses


def test_the_embedded_broker_starts_where_proc_holds_only_processes() -> None:
    """ProcSubset=pid hides /proc/net (a link to /proc/self/net): the broker's check that
    the listener is its own must read /proc/self/net. Run in a user, mount and pid
    namespace of its own with /proc mounted ``subset=pid``."""
    code = textwrap.dedent(
        """
        import os
        assert not os.path.exists("/proc/net") and os.path.exists("/proc/self/net/tcp")
        from finopsd.ingest.broker import EmbeddedBroker
        with EmbeddedBroker("127.0.0.1", 0, start_timeout_s=30) as broker:
            print("listening", broker.bootstrap)
        """
    )
    script = f"mount -t proc -o subset=pid proc /proc && exec {sys.executable} -c '{code}'"
    out = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, (
        "needs unshare(1) and user namespaces to mount a /proc of its own: " + out.stderr[-3000:]
    )
    assert out.stdout.startswith("listening 127.0.0.1:")
