"""Settings: config.toml plus FINOPSD_* environment overrides, errors that name the key."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import finopsd
from finopsd.config import ConfigError, Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config.toml"
PACKAGE_ROOT = Path(finopsd.__path__[0]).resolve().parent
SECRET = "hunter2-s3cret-Pa55"


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(path: Path | None, env: dict[str, str] | None = None) -> str:
    """The message of the ConfigError that loading ``path`` with ``env`` raises."""
    with pytest.raises(ConfigError) as info:
        load_settings(path, env or {})
    return str(info.value)


def _sections() -> dict[str, type[BaseModel]]:
    out = {}
    for name, field in Settings.model_fields.items():
        assert isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        out[name] = field.annotation
    return out


# -- the shipped config.toml ------------------------------------------------------------------


def test_repo_config_equals_defaults() -> None:
    """config.toml shows the defaults: loading it gives Settings() except for resolved paths."""
    loaded = load_settings(CONFIG, {})
    defaults = Settings()
    assert loaded.store.path == REPO / defaults.store.path
    assert loaded.store.path.is_absolute()
    got = loaded.model_dump()
    want = defaults.model_dump()
    got["store"].pop("path")
    want["store"].pop("path")
    assert got == want


def test_repo_config_documents_every_setting() -> None:
    """Every key of every section appears in config.toml (set or commented out) in its section."""
    text = CONFIG.read_text()
    blocks = re.split(r"^\[([a-z_]+)\]\s*$", text, flags=re.MULTILINE)
    by_section = dict(zip(blocks[1::2], blocks[2::2], strict=True))
    sections = _sections()
    assert set(by_section) == set(sections)
    for section, model in sections.items():
        for key in model.model_fields:
            pattern = rf"^#?\s*({re.escape(key)}\s*=|\[\[?{section}\.{re.escape(key)}[\].])"
            if key == "sasl_password":
                pattern = key
            assert re.search(pattern, by_section[section], flags=re.MULTILINE), (
                f"{section}.{key} is not documented in config.toml"
            )


def test_empty_file_is_the_default(tmp_path: Path) -> None:
    """Every key is optional: an empty file gives the defaults, paths resolved to its directory."""
    settings = load_settings(write(tmp_path, ""), {})
    assert settings.store.path == tmp_path / Settings().store.path
    assert settings.kafka == Settings().kafka


# -- errors name the key ----------------------------------------------------------------------


def test_invalid_value_names_key_and_value(tmp_path: Path) -> None:
    """An out-of-range value: the message has the file, the dotted key and the bad value."""
    path = write(tmp_path, "[kafka]\nmax_poll_records = -17\n")
    message = config_error(path)
    assert str(path) in message
    assert "kafka.max_poll_records" in message
    assert "-17" in message


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ('[log]\nlevel = "verbose"\n', "log.level", "verbose"),
        ("[ingest]\nbatch_max_events = 5.5\n", "ingest.batch_max_events", "5.5"),
        ('[store]\nmemory_limit = "lots"\n', "store.memory_limit", "lots"),
        ("[embedded_broker]\nport = 70000\n", "embedded_broker.port", "70000"),
    ],
)
def test_invalid_values_in_other_sections(tmp_path: Path, text: str, key: str, value: str) -> None:
    """Type and constraint errors anywhere name their dotted key and show the value."""
    message = config_error(write(tmp_path, text))
    assert key in message and value in message


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    """A misspelt key is refused with a 'did you mean' that names the real key."""
    message = config_error(write(tmp_path, "[kafka]\nmax_poll_record = 5\n"))
    assert "kafka.max_poll_record" in message
    assert "did you mean max_poll_records" in message


def test_unknown_section_suggests_the_right_one(tmp_path: Path) -> None:
    """A misspelt section is refused, and the suggestion names the section."""
    message = config_error(write(tmp_path, "[ingets]\nbatch_max_events = 5\n"))
    assert "ingets" in message
    assert "did you mean ingest" in message


def test_several_errors_are_all_reported(tmp_path: Path) -> None:
    """Two bad keys in one file: both are named, one per line."""
    message = config_error(
        write(tmp_path, "[kafka]\nmax_poll_records = 0\n[ingest]\nqueue_chunks = 0\n")
    )
    assert "kafka.max_poll_records" in message and "ingest.queue_chunks" in message
    assert len(message.splitlines()) == 2


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    """A syntax error names the file and says it is not valid TOML."""
    path = write(tmp_path, "[kafka\nmax_poll_records = 5\n", name="broken.toml")
    message = config_error(path)
    assert str(path) in message
    assert "TOML" in message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    """A config path that does not exist is an error naming it, not the defaults."""
    path = tmp_path / "nope.toml"
    message = config_error(path)
    assert str(path) in message


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    """`kafka = 5` is refused with a message naming kafka."""
    message = config_error(write(tmp_path, "kafka = 5\n"))
    assert "kafka" in message


# -- environment overrides --------------------------------------------------------------------


def test_env_override_applies(tmp_path: Path) -> None:
    """FINOPSD_INGEST__BATCH_MAX_EVENTS=5 overrides the file's value (and is parsed as an int)."""
    path = write(tmp_path, "[ingest]\nbatch_max_events = 1000\n")
    settings = load_settings(path, {"FINOPSD_INGEST__BATCH_MAX_EVENTS": "5"})
    assert settings.ingest.batch_max_events == 5
    assert load_settings(path, {}).ingest.batch_max_events == 1000


def test_env_overrides_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no config file at all, environment overrides still apply."""
    monkeypatch.chdir(tmp_path)
    settings = load_settings(None, {"FINOPSD_KAFKA__BOOTSTRAP_SERVERS": "k1:9092,k2:9092"})
    assert settings.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert not settings.kafka.embedded


def test_finopsd_config_env_names_the_file(tmp_path: Path) -> None:
    """FINOPSD_CONFIG picks the file when no path is given."""
    path = write(tmp_path, "[ingest]\nqueue_chunks = 3\n", name="other.toml")
    settings = load_settings(None, {"FINOPSD_CONFIG": str(path)})
    assert settings.ingest.queue_chunks == 3


def test_invalid_env_value_names_the_variable(tmp_path: Path) -> None:
    """An env value that fails validation names the variable, the key and the value."""
    message = config_error(write(tmp_path, ""), {"FINOPSD_INGEST__BATCH_MAX_EVENTS": "five"})
    assert "FINOPSD_INGEST__BATCH_MAX_EVENTS" in message
    assert "ingest.batch_max_events" in message
    assert "five" in message


def test_unknown_env_key_names_the_variable(tmp_path: Path) -> None:
    """FINOPSD_KAFKA__NOPE is an error naming the variable, not silently ignored."""
    message = config_error(write(tmp_path, ""), {"FINOPSD_KAFKA__NOPE": "1"})
    assert "FINOPSD_KAFKA__NOPE" in message


def test_unknown_env_key_suggests(tmp_path: Path) -> None:
    """A misspelt env key gets a suggestion too."""
    message = config_error(write(tmp_path, ""), {"FINOPSD_KAFKA__GROUP_IDD": "x"})
    assert "FINOPSD_KAFKA__GROUP_IDD" in message
    assert "group_id" in message


def test_unrelated_finopsd_env_is_ignored(tmp_path: Path) -> None:
    """Variables that are not FINOPSD_<SECTION>__<KEY> (e.g. FINOPSD_TANSU_BIN) are not settings."""
    settings = load_settings(write(tmp_path, ""), {"FINOPSD_TANSU_BIN": "/x", "OTHER__A": "1"})
    assert settings.model_dump(exclude={"store"}) == Settings().model_dump(exclude={"store"})


# -- secrets ----------------------------------------------------------------------------------


def test_password_is_redacted(tmp_path: Path) -> None:
    """The SASL password is usable but never appears in redacted() output."""
    path = write(tmp_path, '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n')
    settings = load_settings(path, {"FINOPSD_KAFKA__SASL_PASSWORD": SECRET})
    assert settings.kafka.password() == SECRET
    assert settings.kafka.client_config()["sasl_plain_password"] == SECRET
    shown = json.dumps(settings.redacted(), default=str)
    assert SECRET not in shown
    assert SECRET not in repr(settings) and SECRET not in str(settings)


@pytest.mark.parametrize(
    ("text", "env"),
    [
        # a field error on the password itself
        (f'[kafka]\nsasl_password = ["{SECRET}"]\n', {}),
        # section-level (model validator) errors, with the password set
        ('[kafka]\nsecurity_protocol = "SASL_SSL"\n', {"FINOPSD_KAFKA__SASL_PASSWORD": SECRET}),
        ('[kafka]\nsasl_password_file = "/run/pw"\n', {"FINOPSD_KAFKA__SASL_PASSWORD": SECRET}),
        # another key's error while the password is set
        ("[kafka]\nmax_poll_records = 0\n", {"FINOPSD_KAFKA__SASL_PASSWORD": SECRET}),
    ],
    ids=["password_wrong_type", "sasl_without_mechanism", "password_and_file", "other_key"],
)
def test_password_never_in_error_messages(tmp_path: Path, text: str, env: dict[str, str]) -> None:
    """Whatever is wrong with the kafka section, its error message does not show the password."""
    message = config_error(write(tmp_path, text), env)
    assert "kafka" in message
    assert SECRET not in message


# -- paths ------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """store.path and the other path settings are relative to the config file, not the cwd."""
    conf_dir = tmp_path / "etc" / "finopsd"
    conf_dir.mkdir(parents=True)
    (conf_dir / "ca.pem").write_text("a CA bundle")  # files named in config must exist
    path = write(
        conf_dir,
        '[store]\npath = "db/finops.duckdb"\n[kafka]\nssl_cafile = "ca.pem"\n'
        '[embedded_broker]\nlog_file = "../log/tansu.log"\n',
    )
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(Path(os.path.relpath(path, elsewhere)), {})
    assert settings.store.path.resolve() == conf_dir / "db" / "finops.duckdb"
    assert settings.kafka.ssl_cafile is not None
    assert settings.kafka.ssl_cafile.resolve() == conf_dir / "ca.pem"
    assert settings.embedded_broker.log_file is not None
    assert settings.embedded_broker.log_file.resolve() == conf_dir.parent / "log" / "tansu.log"


def test_absolute_store_path_is_kept(tmp_path: Path) -> None:
    """An absolute store.path is used as given."""
    target = tmp_path / "abs" / "x.duckdb"
    settings = load_settings(write(tmp_path, f'[store]\npath = "{target}"\n'), {})
    assert settings.store.path == target


# -- the CLI ----------------------------------------------------------------------------------


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
    """Run ``python -m finopsd`` with no inherited FINOPSD_* variables.

    PYTHONPATH points at the package under test, so the run does not depend on the cwd
    (or on how the package was installed).
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FINOPSD_")}
    clean["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE_ROOT), clean.get("PYTHONPATH", "")) if p
    )
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "finopsd", *args],
        cwd=cwd,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_config_check_bad_file(tmp_path: Path) -> None:
    """`finopsd config check` on a bad file exits 2, names the key, shows no traceback."""
    path = write(tmp_path, "[kafka]\nmax_poll_records = 0\n", name="bad.toml")
    result = _cli("config", "check", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "kafka.max_poll_records" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_cli_config_check_bad_env_and_show_redacts(tmp_path: Path) -> None:
    """A bad env value exits 2 naming the variable; `config show` hides the password."""
    path = write(tmp_path, '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n')
    bad = _cli(
        "config", "check", "--config", str(path), cwd=tmp_path, env={"FINOPSD_LOG__LEVEL": "loud"}
    )
    assert bad.returncode == 2
    assert "FINOPSD_LOG__LEVEL" in bad.stderr and "Traceback" not in bad.stderr
    shown = _cli(
        "config",
        "show",
        "--config",
        str(path),
        cwd=tmp_path,
        env={"FINOPSD_KAFKA__SASL_PASSWORD": SECRET},
    )
    assert shown.returncode == 0, shown.stderr
    assert SECRET not in shown.stdout + shown.stderr
    assert json.loads(shown.stdout)["kafka"]["sasl_mechanism"] == "PLAIN"


# -- what `run` would fail on, caught by `config check` ---------------------------------


RUN_WOULD_FAIL = [
    ("[kafka]\nheartbeat_interval_ms = 10000\nsession_timeout_ms = 10000\n", "heartbeat"),
    ("[ingest]\ndedup_window_hours = 1e300\n", "ingest.dedup_window_hours"),
    ('[kafka]\nbootstrap_servers = "not a host"\n', "kafka.bootstrap_servers"),
    ('[kafka]\nbootstrap_servers = "kafka-1:9092,kafka-2"\n', "kafka.bootstrap_servers"),
    ('[kafka]\nbootstrap_servers = "kafka-1:99999"\n', "kafka.bootstrap_servers"),
    (
        '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n'
        'sasl_username = "u"\nsasl_password_file = "missing-secret"\n',
        "kafka.sasl_password_file",
    ),
    ('[kafka]\nssl_cafile = "no-such-ca.pem"\n', "kafka.ssl_cafile"),
    ('[store]\npath = "."\n', "store.path"),
    ('[store]\npath = "file.txt/store.duckdb"\n', "store.path"),
    ('[embedded_broker]\nlog_file = "."\n', "embedded_broker.log_file"),
    ('[embedded_broker]\nlog_file = "file.txt/tansu.log"\n', "embedded_broker.log_file"),
]


@pytest.mark.parametrize(("text", "key"), RUN_WOULD_FAIL)
def test_config_check_catches_what_run_would_fail_on(tmp_path: Path, text: str, key: str) -> None:
    (tmp_path / "file.txt").write_text("not a directory")
    path = write(tmp_path, text)
    assert key in config_error(path)
    result = subprocess.run(
        [sys.executable, "-m", "finopsd", "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert key in result.stderr and "Traceback" not in result.stderr


def test_a_secret_file_that_is_missing_names_the_key_not_the_secret(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    path = write(
        tmp_path,
        '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n'
        f'sasl_username = "u"\nsasl_password_file = "{secret}"\n',
    )
    assert "sasl_password_file" in config_error(path)
    secret.write_text("hunter2\n")
    assert load_settings(path, env={}).kafka.password() == "hunter2"


def test_invalid_utf8_is_a_config_error_naming_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[log]\nlevel = "info"\n# caf\xe9\n')
    message = config_error(path)
    assert str(path) in message and "line 3" in message and "UTF-8" in message
    result = subprocess.run(
        [sys.executable, "-m", "finopsd", "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_sigterm_during_start_up_against_an_unanswering_broker_stops_at_once(
    tmp_path: Path,
) -> None:
    """A broker address where nothing answers keeps kafka-python busy at start-up for up to
    kafka.request_timeout_ms; SIGTERM must not wait for it."""
    import signal
    import socket
    import time

    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        path = write(
            tmp_path,
            f'[kafka]\nbootstrap_servers = "127.0.0.1:{port}"\nrequest_timeout_ms = 60000\n'
            f'[store]\npath = "{tmp_path / "s.duckdb"}"\n[api]\nport = 0\n',
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("FINOPSD_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "finopsd", "run", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + 30
            assert proc.stdout is not None
            seen = b""
            while b"ingesting" not in seen and time.monotonic() < deadline:
                seen += proc.stdout.readline()
            assert b"ingesting" in seen, seen
            time.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert proc.wait(timeout=15) == 0
            assert time.monotonic() - started < 5
        finally:
            proc.kill()


@pytest.mark.parametrize("moment", ["store opening", "connecting"])
def test_sigterm_during_start_up_against_an_unreachable_broker_exits_0_at_once(
    tmp_path: Path, moment: str
) -> None:
    """Nothing listens on the bootstrap port (kafka-python retries for up to
    kafka.request_timeout_ms). SIGTERM while the new store is being migrated (the first
    log line) or while the consumer connects: exit 0 within a couple of seconds, never a
    DuckDB "Query interrupted" (exit 1)."""
    import signal
    import socket
    import time

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    path = write(
        tmp_path,
        f'[kafka]\nbootstrap_servers = "127.0.0.1:{port}"\nrequest_timeout_ms = 60000\n'
        f'[store]\npath = "{tmp_path / "s.duckdb"}"\n[api]\nport = 0\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINOPSD_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "finopsd", "run", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        seen = proc.stdout.readline()  # logging is set up and the signals handled by now
        if moment == "connecting":
            deadline = time.monotonic() + 30
            while b"ECONNREFUSED" not in seen and time.monotonic() < deadline:
                seen += proc.stdout.readline()
            assert b"ECONNREFUSED" in seen, seen
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        rc = proc.wait(timeout=15)
        seen += proc.stdout.read()
        assert rc == 0, seen.decode()
        assert time.monotonic() - started < 5, seen.decode()
        assert b"Traceback" not in seen and b"interrupted" not in seen
    finally:
        proc.kill()


def _numeric_keys() -> list[tuple[str, str, Any]]:
    keys = []
    for section, model in _sections().items():
        for key, field in model.model_fields.items():
            text = str(field.annotation)
            if "float" in text:
                keys.append((section, key, 1e300))
            elif "int" in text and "dict" not in text and "list" not in text:
                keys.append((section, key, 2**63))
    return keys


@pytest.mark.parametrize(("section", "key", "huge"), _numeric_keys())
def test_every_number_is_bounded(tmp_path: Path, section: str, key: str, huge: Any) -> None:
    """A duration that no timedelta holds, a count no C or Kafka int32 holds: refused at load
    (naming the key), not an OverflowError or a DuckDB cast error once running."""
    path = write(tmp_path, f"[{section}]\n{key} = {huge!r}\n")
    assert f"{section}.{key}" in config_error(path)


def test_analyzer_durations_are_bounded(tmp_path: Path) -> None:
    for text, key in [
        ("[analyzers.spend]\ninterval_minutes = 1e300\n", "interval_minutes"),
        ("[analyzers.caching]\nbackfill_hours = 1e300\n", "backfill_hours"),
    ]:
        assert key in config_error(write(tmp_path, text))


@pytest.mark.parametrize(
    ("content", "reason"), [(b"\xffhunter2\xfe\n", "not UTF-8"), (b"\n", "is empty")]
)
def test_a_secret_file_that_run_could_not_use_is_refused_without_showing_it(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(content)
    path = write(
        tmp_path,
        '[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\n'
        f'sasl_username = "u"\nsasl_password_file = "{secret}"\n',
    )
    message = config_error(path)
    assert "kafka.sasl_password_file" in message and reason in message
    assert "hunter2" not in message and "\\xff" not in message


def test_analyze_window_days_is_bounded_like_the_setting(tmp_path: Path) -> None:
    path = write(tmp_path, f'[store]\npath = "{tmp_path / "s.duckdb"}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "finopsd", "analyze", "-c", str(path), "--window-days", "1e300"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--window-days" in result.stderr
    assert "Traceback" not in result.stderr


def test_actions_gateway_problems_are_caught_before_run(tmp_path: Path) -> None:
    """``config check`` names what would stop the controller from changing the gateway."""
    missing = write(tmp_path, '[actions.gateway]\nconfig_path = "nope.yaml"\n')
    assert "actions.gateway.config_path" in config_error(missing)
    (tmp_path / "litellm.yaml").write_text("model_list: []\n")
    no_reload = write(tmp_path, '[actions.gateway]\nconfig_path = "litellm.yaml"\n')
    assert "actions.gateway.reload_command: needed" in config_error(no_reload)
    bad_cmd = write(
        tmp_path,
        '[actions.gateway]\nconfig_path = "litellm.yaml"\nreload_command = ["no-such-cmd-x"]\n',
    )
    assert "'no-such-cmd-x' is not an executable" in config_error(bad_cmd)
    not_git = write(
        tmp_path,
        '[actions.gateway]\nconfig_path = "litellm.yaml"\nbackend = "git"\ngit_repo = "."\n',
    )
    assert "actions.gateway.git_repo" in config_error(not_git)
    kind = write(tmp_path, '[actions.policy."gateway.rout"]\nmode = "auto"\n')
    assert "did you mean gateway.route?" in config_error(kind)
    key = write(tmp_path, '[actions.policy."gateway.route"]\nmod = "auto"\n')
    assert "actions.policy.gateway.route.mod: unknown key (did you mean mode?)" in config_error(key)
    ok = write(
        tmp_path,
        '[actions.gateway]\nconfig_path = "litellm.yaml"\nreload_command = ["true"]\n',
    )
    assert load_settings(ok, {}).actions.gateway.config_path == tmp_path / "litellm.yaml"
