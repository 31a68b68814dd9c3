"""``finopsd replay``: real traces in, native usage events out, stored exactly once.

The traces are the real files in ``shared/data`` beside this checkout (see
DESIGN.md, "Real data here"); every expected number is computed here from the
raw file with ``csv`` / ``json``, independently of the readers under test. The
end-to-end tests run the command as a subprocess against the session's
embedded broker and a real daemon, and read the daemon's DuckDB store.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    USAGE_PARTITIONS,
    DaemonProcess,
    DaemonSetup,
    Topics,
    clean_env,
    consume_all,
    read_store,
    wait_consumed,
)

from finopsd.events import UsageEvent
from finopsd.ingest.loadgen import UsageLoad
from finopsd.ingest.replay import (
    BadLine,
    Plan,
    ReplayEvent,
    ReplayInputError,
    paced,
    read_trace,
)
from finopsd.store import Store

DATA = Path(__file__).absolute().parents[2] / "shared" / "data"
"""``shared/data`` beside the checkout (the repository is ``<root>/main`` or any sibling)."""

AZURE_CODE = "azure_llm_2023_code.csv"
AZURE_CONV = "azure_llm_2023_conv.csv"
MOONCAKE = "mooncake_synthetic_trace.jsonl"

# Requests per file. shared/data/README.md says 8,818 and 19,365 for the two Azure files:
# that is `wc -l` minus the header, and both files lack a final newline, so their last
# row is one more. `test_readers_match_the_raw_files` recounts every file with csv/json.
ROWS = {AZURE_CODE: 8_819, AZURE_CONV: 19_366, MOONCAKE: 3_993}
FORMATS = {AZURE_CODE: "azure", AZURE_CONV: "azure", MOONCAKE: "mooncake"}

START = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
PLAN = Plan(run_id="test", start=START)

MakeConfig = Callable[..., DaemonSetup]
Daemons = Callable[..., DaemonProcess]


@pytest.fixture(scope="module")
def data() -> Path:
    """The real traces' folder; a missing one fails (never skips) the test that needs it."""
    missing = [name for name in ROWS if not (DATA / name).is_file()]
    if missing:
        pytest.fail(
            f"the real traces are missing: expected {', '.join(missing)} in {DATA} "
            "(the shared/data folder beside this checkout; see DESIGN.md 'Real data here')",
            pytrace=False,
        )
    return DATA


# -- independent readings of the raw files ----------------------------------------------------


def raw_azure(path: Path) -> list[tuple[datetime, int, int]]:
    with path.open(newline="") as f:
        return [
            (
                datetime.fromisoformat(r["TIMESTAMP"]),
                int(r["ContextTokens"]),
                int(r["GeneratedTokens"]),
            )
            for r in csv.DictReader(f)
        ]


def raw_mooncake(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def raw_token_sums(path: Path) -> tuple[int, int]:
    if path.suffix == ".csv":
        rows = raw_azure(path)
        return sum(r[1] for r in rows), sum(r[2] for r in rows)
    records = raw_mooncake(path)
    return sum(r["input_length"] for r in records), sum(r["output_length"] for r in records)


def events_of(path: Path, fmt: str, plan: Plan | None = PLAN) -> list[ReplayEvent]:
    """Every event of a file that must have no bad line."""
    items = list(read_trace(path, fmt, plan))  # type: ignore[arg-type]
    bad = [str(i) for i in items if isinstance(i, BadLine)]
    assert not bad, bad[:5]
    return [i for i in items if isinstance(i, ReplayEvent)]


def file_tag(name: str) -> str:
    """The FILETAG of event ids: 8 hex digits of blake2b over the file's name (documented)."""
    return hashlib.blake2b(name.encode(), digest_size=4).hexdigest()


# -- (a) readers ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [AZURE_CODE, AZURE_CONV, MOONCAKE])
def test_readers_match_the_raw_files(data: Path, name: str) -> None:
    """Each request of the file is one valid UsageEvent with the file's token counts."""
    path = data / name
    events = events_of(path, FORMATS[name])
    raw_rows = len(raw_azure(path)) if FORMATS[name] == "azure" else len(raw_mooncake(path))
    assert len(events) == raw_rows == ROWS[name]
    assert (
        sum(e.input_tokens for e in events),
        sum(e.output_tokens for e in events),
    ) == raw_token_sums(path)

    models = [UsageEvent.model_validate_json(e.value) for e in events]
    assert [(m.input_tokens, m.output_tokens) for m in models] == [
        (e.input_tokens, e.output_tokens) for e in events
    ]
    assert [m.event_id for m in models] == [e.event_id for e in events]
    assert [m.ts for m in models] == [e.ts for e in events]
    assert len({e.event_id for e in events}) == len(events)
    first = json.loads(events[0].value)
    assert {
        "event_id",
        "ts",
        "gen_ai.provider.name",
        "gen_ai.request.model",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "tenant",
    } <= first.keys()
    assert first["event_id"] == f"replay-test-{file_tag(name)}-{events[0].line:07d}"


def test_mooncake_prefix_hashes_are_the_hash_ids(data: Path) -> None:
    """prefix_hashes = hash_ids, and prompt_hash is a function of the whole list."""
    path = data / MOONCAKE
    raw = raw_mooncake(path)
    values = [json.loads(e.value) for e in events_of(path, "mooncake")]
    assert [v["prefix_hashes"] for v in values] == [r["hash_ids"] for r in raw]
    by_list: dict[tuple[int, ...], set[str]] = {}
    for v in values:
        by_list.setdefault(tuple(v["prefix_hashes"]), set()).add(v["prompt_hash"])
    assert all(len(h) == 1 for h in by_list.values()), "one list, several prompt hashes"
    assert len({h for hs in by_list.values() for h in hs}) == len(by_list)
    # 512-token blocks: the last block may be partial
    assert all(
        (len(r["hash_ids"]) - 1) * 512 < r["input_length"] <= len(r["hash_ids"]) * 512 for r in raw
    )


def test_azure_events_carry_no_prompt_hashes(data: Path) -> None:
    values = [json.loads(e.value) for e in events_of(data / AZURE_CODE, "azure")]
    assert all("prompt_hash" not in v and "prefix_hashes" not in v for v in values)


@pytest.mark.parametrize("name", [AZURE_CONV, MOONCAKE])
def test_timestamps_keep_the_trace_gaps(data: Path, name: str) -> None:
    """ts = start + (trace time - the file's first trace time), to the microsecond."""
    path = data / name
    events = events_of(path, FORMATS[name])
    if FORMATS[name] == "azure":
        times = [r[0] for r in raw_azure(path)]
        expected = [START + (t - times[0]) for t in times]
    else:
        ms = [r["timestamp"] for r in raw_mooncake(path)]
        expected = [START + timedelta(milliseconds=t - ms[0]) for t in ms]
    assert [e.ts for e in events] == expected
    assert [e.offset_s for e in events] == [(t - START).total_seconds() for t in expected]


def test_assignment_is_deterministic_and_ids_follow_the_run_id(data: Path) -> None:
    """Same plan, same bytes; another run id, other ids and the same tenants and models;
    another seed, another draw; every tenant and model is drawn, and only those."""
    path = data / AZURE_CODE
    tenants = ("t1", "t2", "t3")
    models = (("openai", "gpt-4o"), ("vllm", "org/model-8b"))
    plan = Plan(run_id="a", start=START, tenants=tenants, models=models, seed=7)
    once = events_of(path, "azure", plan)
    assert [e.value for e in events_of(path, "azure", plan)] == [e.value for e in once]

    def draw(events: Sequence[ReplayEvent]) -> list[tuple[str, str, str]]:
        values = [json.loads(e.value) for e in events]
        return [(v["tenant"], v["gen_ai.provider.name"], v["gen_ai.request.model"]) for v in values]

    other_run = events_of(path, "azure", Plan(run_id="b", start=START, tenants=tenants,
                                               models=models, seed=7))  # fmt: skip
    assert not {e.event_id for e in once} & {e.event_id for e in other_run}
    assert draw(other_run) == draw(once)
    other_seed = events_of(path, "azure", Plan(run_id="a", start=START, tenants=tenants,
                                                models=models, seed=8))  # fmt: skip
    assert [e.event_id for e in other_seed] == [e.event_id for e in once]
    assert draw(other_seed) != draw(once)

    counts = Counter(draw(once))
    assert {t for t, _, _ in counts} == set(tenants)
    assert {(p, m) for _, p, m in counts} == set(models)
    for tenant in tenants:  # roughly uniform: each has a third, give or take
        share = sum(n for (t, _, _), n in counts.items() if t == tenant) / len(once)
        assert 0.28 < share < 0.39, (tenant, share)


def test_paced_yields_each_event_at_offset_over_speed() -> None:
    """With a clock that only sleep() moves, events come out at exactly offset / speed;
    an event that is already due (the trace went back in time) comes out at once."""
    now = [100.0]

    def clock() -> float:
        return now[0]

    def sleep(seconds: float) -> None:
        assert seconds > 0
        now[0] += seconds

    offsets = [0.0, 1.0, 1.0, 3.0, 2.0, 10.0]
    events = [
        ReplayEvent(i, o, f"e{i}", START + timedelta(seconds=o), 1, 1, b"{}")
        for i, o in enumerate(offsets)
    ]
    seen = [(e.line, clock() - 100.0) for e in paced(events, 2.0, clock=clock, sleep=sleep)]
    assert seen == [(0, 0.0), (1, 0.5), (2, 0.5), (3, 1.5), (4, 1.5), (5, 5.0)]
    assert list(paced(events, None, clock=clock, sleep=sleep)) == events


# -- (d) bad input --------------------------------------------------------------------------

BAD_AZURE = """\
TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.0319600,abc,8
2023-11-16 18:17:04.1000000,-5,8
not-a-time,10,10
2023-11-16 18:17:05.0000000,10

2023-11-16 18:17:06.0000000,1.5,3
2023-11-16 18:17:07.5000000,100,20"""
BAD_AZURE_LINES = {3: "ContextTokens", 4: "ContextTokens", 5: "TIMESTAMP", 6: "fields", 8: "1.5"}

BAD_MOONCAKE = [
    '{"timestamp": 0, "input_length": 1000, "output_length": 5, "hash_ids": [1, 2]}',
    '{"timestamp": 10, "input_length": ',
    "[1, 2, 3]",
    '{"timestamp": 20, "output_length": 5}',
    '{"timestamp": 30, "input_length": -1, "output_length": 5}',
    '{"timestamp": 40, "input_length": 10, "output_length": 5, "hash_ids": [1, "x"]}',
    '{"timestamp": 50, "input_length": 10, "output_length": 5, "hash_ids": [18446744073709551615]}',
    '{"timestamp": 60, "input_length": 10, "output_length": 5, "hash_ids": [18446744073709551616]}',
    '{"timestamp": "70", "input_length": 10, "output_length": 5}',
    '{"timestamp": 80, "input_length": true, "output_length": 5}',
    '{"timestamp": NaN, "input_length": 10, "output_length": 5}',
    '{"timestamp": 90, "input_length": 10, "output_length": 5}',
]
BAD_MOONCAKE_LINES = {
    2: "not JSON",
    3: "not a JSON object",
    4: "input_length: missing",
    5: "input_length",
    6: "hash_ids[1]",
    8: "hash_ids[0]",
    9: "timestamp",
    10: "input_length",
    11: "timestamp",
}


def write_native(path: Path, n: int, seed: int) -> tuple[list[bytes], dict[int, str]]:
    """``n`` valid native events from the load generator with bad lines among them.

    Returns the valid values in file order and {line: what the reason names} of the bad ones.
    """
    load = UsageLoad(seed=seed, start=START, step=timedelta(milliseconds=5))
    valid = [value for _key, value in itertools.islice(load, n)]
    missing_model = json.loads(valid[0])
    del missing_model["gen_ai.request.model"]
    missing_model["event_id"] = "no-model"
    wrong_type = json.loads(valid[1])
    wrong_type["gen_ai.usage.input_tokens"] = "12"
    wrong_type["event_id"] = "wrong-type"
    bad = [
        (b"this is not json", "json"),
        (json.dumps(missing_model).encode(), "gen_ai.request.model"),
        (b"[1, 2]", "object"),
        (b'{"event_id": "x\xff\xfe"}', "unicode"),
        (json.dumps(wrong_type).encode(), "gen_ai.usage.input_tokens"),
    ]
    entries: list[tuple[bytes, str | None]] = [(v, None) for v in valid]
    for i, (line, reason) in enumerate(bad):
        entries.insert((i + 1) * len(entries) // (len(bad) + 1), (line, reason))
    entries.insert(1, (b"   ", None))  # a blank line is no event and no error
    lines = [line for line, _ in entries]
    reasons = {n: reason for n, (_, reason) in enumerate(entries, 1) if reason is not None}
    path.write_bytes(b"\n".join(lines) + b"\n")
    return valid, reasons


def check_bad_lines(items: list[ReplayEvent | BadLine], expected: dict[int, str]) -> None:
    bad = {b.line: b for b in items if isinstance(b, BadLine)}
    assert sorted(bad) == sorted(expected), [str(b) for b in bad.values()]
    for line, word in expected.items():
        assert word.lower() in bad[line].reason.lower(), str(bad[line])
        assert str(bad[line]).startswith(f"{bad[line].path}:{line}: ")


def test_bad_lines_are_reported_with_their_line_and_skipped(tmp_path: Path) -> None:
    azure = tmp_path / "bad.csv"
    azure.write_text(BAD_AZURE)
    items = list(read_trace(azure, "azure", PLAN))
    check_bad_lines(items, BAD_AZURE_LINES)
    good = [i for i in items if isinstance(i, ReplayEvent)]
    assert [(e.line, e.input_tokens, e.output_tokens, e.offset_s) for e in good] == [
        (2, 4808, 10, 0.0),
        (9, 100, 20, 3.52004),
    ]

    mooncake = tmp_path / "bad.jsonl"
    mooncake.write_text("\n".join(BAD_MOONCAKE))
    items = list(read_trace(mooncake, "mooncake", PLAN))
    check_bad_lines(items, BAD_MOONCAKE_LINES)
    good_values = {i.line: json.loads(i.value) for i in items if isinstance(i, ReplayEvent)}
    assert sorted(good_values) == [1, 7, 12]
    assert good_values[7]["prefix_hashes"] == [-1], "an unsigned 64-bit id wraps to signed"
    assert "prefix_hashes" not in good_values[12] and "prompt_hash" not in good_values[12]

    native = tmp_path / "native.ndjson"
    valid, reasons = write_native(native, 50, seed=3)
    items = list(read_trace(native, "native", None))
    check_bad_lines(items, reasons)
    sent = [i for i in items if isinstance(i, ReplayEvent)]
    assert [e.value for e in sent] == valid, "native lines are sent byte for byte"
    assert [e.key for e in sent] == [json.loads(v)["event_id"].encode() for v in valid]


def test_missing_files_and_wrong_formats_are_errors(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ReplayInputError, match="no such file"):
        read_trace(tmp_path / "nope.csv", "azure", PLAN)
    with pytest.raises(ReplayInputError, match="not a regular file"):
        read_trace(tmp_path, "mooncake", PLAN)
    with pytest.raises(ReplayInputError, match=r"lacks TIMESTAMP.*mooncake or native"):
        read_trace(data / MOONCAKE, "azure", PLAN)
    with pytest.raises(ReplayInputError, match=r"no JSON object.*--format azure"):
        read_trace(data / AZURE_CODE, "mooncake", PLAN)
    with pytest.raises(ReplayInputError, match="--format mooncake"):
        read_trace(data / MOONCAKE, "native", None)
    native = tmp_path / "n.ndjson"
    write_native(native, 5, seed=1)
    with pytest.raises(ReplayInputError, match="--format native"):
        read_trace(native, "mooncake", PLAN)


# -- the command ----------------------------------------------------------------------------


def finopsd(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m finopsd ARGS`` in ``cwd`` with no FINOPSD_* from the environment."""
    return subprocess.run(
        [sys.executable, "-m", "finopsd", *map(str, args)],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=cwd,
        timeout=300,
    )


def replay(*args: str | Path, cwd: Path) -> dict[str, Any]:
    """``finopsd replay ARGS --json``; asserts exit 0 and returns the summary."""
    result = finopsd("replay", *args, "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def test_command_errors_exit_2(data: Path, tmp_path: Path) -> None:
    """A missing file, a wrong format, bad flags, or no broker to name: one line, exit 2."""
    cases: list[tuple[list[str | Path], str]] = [
        ([tmp_path / "missing.csv", "--format", "azure"], "no such file"),
        ([data / MOONCAKE, "--format", "azure"], "not an azure trace"),
        ([data / AZURE_CODE, "--format", "mooncake"], "not mooncake JSON lines"),
        ([data / AZURE_CODE, "--format", "parquet"], "invalid choice"),
        ([data / AZURE_CODE, "--format", "azure", "--speed", "0"], "leave --speed out"),
        ([data / AZURE_CODE, "--format", "azure", "--models", "gpt-4o"], "provider/model"),
        ([data / AZURE_CODE, "--format", "azure", "--start", "yesterday"], "ISO-8601"),
        ([data / AZURE_CODE, "--format", "azure", "--limit", "0"], "positive"),
        ([data / MOONCAKE, "--format", "native", "--tenants", "a"], "--tenants: not for"),
    ]
    for args, message in cases:
        result = finopsd("replay", *args, cwd=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr

    config = tmp_path / "embedded.toml"
    config.write_text('[kafka]\nbootstrap_servers = "embedded"\n[embedded_broker]\nport = 0\n')
    result = finopsd(
        "replay", data / MOONCAKE, "--format", "mooncake", "--config", config, cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "pass --bootstrap HOST:PORT" in result.stderr


def test_bad_lines_are_reported_and_skipped_by_the_command(topics: Topics, tmp_path: Path) -> None:
    """Each bad line is reported as FILE:LINE on stderr and counted; the rest is sent."""
    azure, mooncake, native = tmp_path / "a.csv", tmp_path / "m.jsonl", tmp_path / "n.ndjson"
    azure.write_text(BAD_AZURE)
    mooncake.write_text("\n".join(BAD_MOONCAKE))
    valid, native_bad = write_native(native, 40, seed=9)
    target = ["--bootstrap", topics.bootstrap, "--topic", topics.usage]
    sent = 0
    for path, fmt, bad in [
        (azure, "azure", BAD_AZURE_LINES),
        (mooncake, "mooncake", BAD_MOONCAKE_LINES),
        (native, "native", native_bad),
    ]:
        result = finopsd("replay", path, "--format", fmt, *target, "--json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        summary = json.loads(result.stdout)
        assert summary["skipped"] == len(bad)
        reported = [
            line.removeprefix("finopsd: skipped ")
            for line in result.stderr.splitlines()
            if line.startswith("finopsd: skipped ")
        ]
        assert [r.split(": ", 1)[0] for r in reported] == [f"{path}:{n}" for n in sorted(bad)]
        assert summary["bad_lines"] == reported
        sent += summary["sent"]
    assert sent == 2 + 3 + len(valid)
    records = consume_all(topics.bootstrap, topics.usage, sent, partitions=USAGE_PARTITIONS)
    assert len(records) == sent
    for r in records:
        assert UsageEvent.model_validate_json(r.value).event_id.encode() == r.key


# -- (b) end to end -------------------------------------------------------------------------


def topic_end(topics: Topics, count: int) -> dict[int, int]:
    """Partition to next offset, reading the usage topic until it holds ``count`` records."""
    records = consume_all(topics.bootstrap, topics.usage, count, partitions=USAGE_PARTITIONS)
    assert len(records) == count, f"{len(records)} records on the topic, {count} expected"
    end = dict.fromkeys(range(USAGE_PARTITIONS), 0)
    for r in records:
        end[r.partition] = max(end[r.partition], r.offset + 1)
    return end


def store_by_file(path: Path) -> dict[str, tuple[int, int, int, int, datetime, datetime]]:
    """FILETAG (or 'native') to rows, token sums, prefix-hash count and ts range."""
    with Store(path, read_only=True) as store:
        rows = (
            store.cursor()
            .execute(
                "SELECT coalesce(nullif(regexp_extract(event_id, '^replay-[^-]+-([0-9a-f]{8})-', "
                "1), ''), 'native') AS file, count(*), sum(input_tokens), sum(output_tokens), "
                "coalesce(sum(len(prefix_hashes)), 0), min(ts), max(ts) "
                "FROM usage_events GROUP BY ALL"
            )
            .fetchall()
        )
    return {r[0]: (int(r[1]), int(r[2]), int(r[3]), int(r[4]), r[5], r[6]) for r in rows}


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def test_replayed_traces_are_stored_with_their_tokens(
    data: Path, topics: Topics, make_config: MakeConfig, daemons: Daemons, tmp_path: Path
) -> None:
    """The three traces, whole, and a native file: the daemon stores every request once,
    with the raw files' token sums, hash counts and the summaries' ts ranges."""
    setup = make_config("replay")
    summaries: dict[str, dict[str, Any]] = {}
    for name in (AZURE_CODE, AZURE_CONV, MOONCAKE):
        summaries[name] = replay(
            data / name, "--format", FORMATS[name], "--config", setup.config, cwd=tmp_path
        )
        assert summaries[name]["sent"] == ROWS[name]
        assert summaries[name]["skipped"] == 0
        assert summaries[name]["topic"] == topics.usage
        assert summaries[name]["bootstrap"] == topics.bootstrap
    native = tmp_path / "native.ndjson"
    valid, bad = write_native(native, 2_000, seed=11)
    native_summary = replay(native, "--format", "native", "--config", setup.config, cwd=tmp_path)
    assert (native_summary["sent"], native_summary["skipped"]) == (len(valid), len(bad))
    total = sum(ROWS.values()) + len(valid)

    end = topic_end(topics, total)
    daemon = daemons(setup)
    daemon.start()
    daemon.wait_ready()
    wait_consumed([daemon], topics, end, timeout=120)
    assert daemon.terminate() == 0, daemon.log_tail()

    state = read_store(setup.store)
    assert state.rows == state.distinct_event_ids == total
    assert state.counts["dead_letters"] == 0
    native_events = [json.loads(v) for v in valid]
    native_sums = (
        sum(e["gen_ai.usage.input_tokens"] for e in native_events),
        sum(e["gen_ai.usage.output_tokens"] for e in native_events),
    )
    sums = [raw_token_sums(data / n) for n in ROWS]
    assert state.token_sums == (
        sum(s[0] for s in sums) + native_sums[0],
        sum(s[1] for s in sums) + native_sums[1],
    )
    by_file = store_by_file(setup.store)
    assert set(by_file) == {file_tag(n) for n in ROWS} | {"native"}
    for name in ROWS:
        rows, tokens_in, tokens_out, hashes, first, last = by_file[file_tag(name)]
        assert (rows, tokens_in, tokens_out) == (ROWS[name], *raw_token_sums(data / name))
        expected_hashes = (
            sum(len(r["hash_ids"]) for r in raw_mooncake(data / name)) if name == MOONCAKE else 0
        )
        assert hashes == expected_hashes
        assert (iso(first), iso(last)) == (
            summaries[name]["first_ts"],
            summaries[name]["last_ts"],
        )
        assert (summaries[name]["input_tokens"], summaries[name]["output_tokens"]) == (
            tokens_in,
            tokens_out,
        )
    assert by_file["native"][:3] == (len(valid), *native_sums)


def test_same_run_id_is_stored_once_and_a_new_run_id_is_not(
    data: Path, topics: Topics, make_config: MakeConfig, daemons: Daemons, tmp_path: Path
) -> None:
    """Replaying a file again with the same --run-id adds nothing; another run id adds all."""
    n = 2_000
    path = data / AZURE_CODE
    setup = make_config("rerun")
    daemon = daemons(setup)
    daemon.start()
    daemon.wait_ready()
    args = [path, "--format", "azure", "--config", setup.config, "--limit", n]

    def replay_and_wait(run_id: str, sent_so_far: int) -> dict[str, Any]:
        summary = replay(*args, "--run-id", run_id, cwd=tmp_path)
        assert summary["sent"] == n and summary["run_id"] == run_id
        wait_consumed([daemon], topics, topic_end(topics, sent_so_far + n), timeout=60)
        return summary

    first = replay_and_wait("r1", 0)
    again = replay_and_wait("r1", n)
    other = replay_and_wait("r2", 2 * n)
    assert daemon.terminate() == 0, daemon.log_tail()

    state = read_store(setup.store)
    assert state.rows == state.distinct_event_ids == 2 * n
    ids = set(state.event_ids)
    tag = file_tag(AZURE_CODE)
    assert sum(i.startswith(f"replay-r1-{tag}-") for i in ids) == n
    assert sum(i.startswith(f"replay-r2-{tag}-") for i in ids) == n
    raw = raw_azure(path)[:n]
    expected = (sum(r[1] for r in raw), sum(r[2] for r in raw))
    assert state.token_sums == (2 * expected[0], 2 * expected[1])
    for summary in (first, again, other):
        assert (summary["input_tokens"], summary["output_tokens"]) == expected


# -- (c) pacing -----------------------------------------------------------------------------


def test_speed_paces_the_replay_by_the_trace_timestamps(
    data: Path, topics: Topics, tmp_path: Path
) -> None:
    """200 Mooncake requests spanning 58.5 s, at --speed 30, take at least ~1.95 s.

    Only a lower bound is asserted: a loaded machine may always be slower.
    """
    n, speed = 200, 30.0
    stamps = [r["timestamp"] for r in raw_mooncake(data / MOONCAKE)[:n]]
    span = (max(stamps) - min(stamps)) / 1000
    target = ["--bootstrap", topics.bootstrap, "--topic", topics.usage]
    started = time.monotonic()
    summary = replay(
        data / MOONCAKE, "--format", "mooncake", "--limit", n, "--speed", speed, *target,
        cwd=tmp_path,
    )  # fmt: skip
    wall = time.monotonic() - started
    assert summary["sent"] == n
    assert summary["trace_seconds"] == pytest.approx(span)
    assert summary["seconds"] >= 0.95 * span / speed, summary
    assert wall >= 0.95 * span / speed
    last = datetime.fromisoformat(summary["last_ts"])
    first = datetime.fromisoformat(summary["first_ts"])
    assert (last - first).total_seconds() == pytest.approx(span), "pacing keeps ts unscaled"
