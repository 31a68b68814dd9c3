"""End to end: the real broker, ``python -m finopsd run`` as a process, a real DuckDB file.

Nothing is mocked. Each test produces usage events to its own topics, runs the
daemon until the group has committed the topic's end (the daemon commits an
offset to Kafka only after the batch below it is stored), stops it, and reads
its store. The topic's end is taken from the producer's acks (see
``conftest.next_offsets``).
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    USAGE_PARTITIONS,
    DaemonProcess,
    DaemonSetup,
    Sent,
    StoreState,
    Topics,
    clean_env,
    committed_offsets,
    consume_all,
    next_offsets,
    produce_messages,
    read_store,
    wait_consumed,
    wait_for,
)

from finopsd.ingest.loadgen import UsageLoad

START = datetime(2025, 1, 1, tzinfo=UTC)
MakeConfig = Callable[..., DaemonSetup]
Daemons = Callable[..., DaemonProcess]


def usage_messages(n: int, seed: int) -> list[tuple[bytes, bytes]]:
    """``n`` distinct valid usage events (key = event_id), the same bytes for the same seed."""
    load = UsageLoad(seed=seed, start=START)
    return list(itertools.islice(iter(load), n))


def token_sums(messages: Sequence[tuple[bytes | None, bytes]]) -> tuple[int, int]:
    events = [json.loads(v) for _, v in messages]
    return (
        sum(e["gen_ai.usage.input_tokens"] for e in events),
        sum(e["gen_ai.usage.output_tokens"] for e in events),
    )


def covered_ids(sent: Sequence[Sent], offsets: dict[int, int]) -> list[str]:
    """Event ids of the messages below ``offsets`` (partition to next offset), sorted."""
    return sorted(
        s.key.decode() for s in sent if s.key is not None and s.offset < offsets.get(s.partition, 0)
    )


def assert_store_matches_offsets(state: StoreState, sent: Sequence[Sent], topic: str) -> None:
    """The store holds each event below its stored offsets exactly once, and nothing else."""
    offsets = state.usage_offsets(topic)
    expected = covered_ids(sent, offsets)
    assert state.distinct_event_ids == state.rows, (
        f"{state.rows - state.distinct_event_ids} duplicate event_id row(s)"
    )
    stored = sorted(state.event_ids)
    if stored != expected:
        missing = set(expected) - set(stored)
        extra = set(stored) - set(expected)
        raise AssertionError(
            f"store does not match its offsets {offsets}: {len(stored)} rows, "
            f"{len(expected)} expected; {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
            f"{len(extra)} beyond the offsets (e.g. {sorted(extra)[:3]})"
        )


def run_until_consumed(daemon: DaemonProcess, topics: Topics, end: dict[int, int]) -> None:
    """Start the daemon, wait until it has stored everything below ``end``, SIGTERM it."""
    daemon.start()
    daemon.wait_ready()
    wait_consumed([daemon], topics, end)
    assert daemon.terminate() == 0, daemon.log_tail()


# -- 1. duplicates --------------------------------------------------------------------------


def test_resent_events_are_stored_once(
    topics: Topics, make_config: MakeConfig, daemons: Daemons
) -> None:
    """N events give exactly N rows with their values; the same N bytes sent again add none."""
    n = 20_000
    messages = usage_messages(n, seed=1)
    sent1 = produce_messages(topics.bootstrap, topics.usage, messages)
    end1 = next_offsets(sent1)
    setup = make_config("dedup")
    daemon = daemons(setup)

    run_until_consumed(daemon, topics, end1)
    first = read_store(setup.store)
    assert first.rows == n
    assert first.distinct_event_ids == n
    assert first.token_sums == token_sums(messages)
    assert first.usage_offsets(topics.usage) == end1
    assert first.counts["dead_letters"] == 0

    sent2 = produce_messages(topics.bootstrap, topics.usage, messages)
    end2 = next_offsets(sent1 + sent2)
    assert end2 == {p: 2 * o for p, o in end1.items()}, "a resend keeps its key's partition"

    run_until_consumed(daemon, topics, end2)
    second = read_store(setup.store)
    assert second.rows == n
    assert sorted(second.event_ids) == sorted(k.decode() for k, _ in messages)
    assert second.token_sums == token_sums(messages)
    assert second.usage_offsets(topics.usage) == end2
    assert second.counts["dead_letters"] == 0


# -- 2. crashes -----------------------------------------------------------------------------


def test_sigkill_mid_ingest_loses_and_duplicates_nothing(
    topics: Topics, make_config: MakeConfig, daemons: Daemons
) -> None:
    """SIGKILL at random points of ingest, restart each time: after every kill the store
    holds exactly the events below its stored offsets; a last clean run gives exactly N."""
    n = 100_000
    messages = usage_messages(n, seed=2)
    sent = produce_messages(topics.bootstrap, topics.usage, messages)
    end = next_offsets(sent)
    setup = make_config("crash", ingest={"batch_max_events": 5_000})
    daemon = daemons(setup)
    rng = random.Random(20_251_123)

    progress: list[int] = []
    for _trial in range(4):
        daemon.start()
        daemon.wait_ready()  # the group join takes a few seconds; ingest starts after it
        time.sleep(rng.uniform(0.0, 1.0))
        status = daemon.kill()
        assert status == -signal.SIGKILL, f"the daemon ended by itself ({status})\n" + (
            daemon.log_tail()
        )
        if setup.store.exists():
            state = read_store(setup.store)
            assert_store_matches_offsets(state, sent, topics.usage)
            progress.append(state.rows)

    # Partitions the killed runs stored to the end get no new commit from the last run (see
    # test_group_offsets_catch_up_with_the_store); wait for the others only.
    before = read_store(setup.store).usage_offsets(topics.usage)
    pending = {p: o for p, o in end.items() if before.get(p, 0) < o}
    run_until_consumed(daemon, topics, pending)
    final = read_store(setup.store)
    assert final.rows == n, f"rows after each kill: {progress}"
    assert final.distinct_event_ids == n
    assert final.usage_offsets(topics.usage) == end
    assert_store_matches_offsets(final, sent, topics.usage)
    assert final.token_sums == token_sums(messages)


# -- 3. a consumer group of two daemons -----------------------------------------------------


def _usage_assignment(daemon: DaemonProcess, topics: Topics) -> set[int]:
    return {p for t, p in daemon.assignment() if t == topics.usage}


def wait_for_split(a: DaemonProcess, b: DaemonProcess, topics: Topics) -> None:
    """Wait until the two daemons' latest assignments split the usage partitions between them."""

    def settled() -> bool:
        for d in (a, b):
            if not d.alive:
                pytest.fail(f"{d.name} exited with status {d.returncode}\n{d.log_tail()}")
        pa, pb = _usage_assignment(a, topics), _usage_assignment(b, topics)
        return bool(pa) and bool(pb) and not pa & pb and pa | pb == set(range(USAGE_PARTITIONS))

    wait_for(
        settled,
        timeout=45,
        what="the two daemons to split the usage partitions",
        context=lambda: f"{a.log_tail(1500)}\n{b.log_tail(1500)}",
    )


def test_two_daemons_in_one_group_split_partitions(
    topics: Topics, make_config: MakeConfig, daemons: Daemons
) -> None:
    """Two daemons of one group each take a share of the partitions and together store
    every event exactly once (in two separate stores)."""
    n = 20_000
    sa, sb = make_config("a"), make_config("b")
    a, b = daemons(sa, name="a"), daemons(sb, name="b")
    a.start()
    a.wait_ready()
    b.start()
    b.wait_ready()
    wait_for_split(a, b, topics)

    messages = usage_messages(n, seed=3)
    sent = produce_messages(topics.bootstrap, topics.usage, messages)
    end = next_offsets(sent)
    wait_consumed([a, b], topics, end)
    assert a.terminate() == 0, a.log_tail()
    assert b.terminate() == 0, b.log_tail()

    state_a, state_b = read_store(sa.store), read_store(sb.store)
    offsets_a, offsets_b = state_a.usage_offsets(topics.usage), state_b.usage_offsets(topics.usage)
    assert offsets_a and offsets_b, (offsets_a, offsets_b)
    assert not offsets_a.keys() & offsets_b.keys(), "a partition was stored by both daemons"
    assert len(offsets_a) < USAGE_PARTITIONS and len(offsets_b) < USAGE_PARTITIONS
    assert {**offsets_a, **offsets_b} == end
    assert state_a.rows + state_b.rows == n
    ids_a, ids_b = set(state_a.event_ids), set(state_b.event_ids)
    assert not ids_a & ids_b, f"{len(ids_a & ids_b)} event(s) stored by both daemons"
    assert ids_a | ids_b == {k.decode() for k, _ in messages}
    assert_store_matches_offsets(state_a, sent, topics.usage)
    assert_store_matches_offsets(state_b, sent, topics.usage)


def test_partitions_moving_between_daemons_are_stored_once(
    topics: Topics, make_config: MakeConfig, daemons: Daemons
) -> None:
    """Partitions that move between two daemons (separate stores, one group) resume where
    the group left them: a daemon that joins late starts at the first one's committed
    offsets, and when it leaves, the first one takes its partitions back at the offsets it
    committed, not at its own older stored offsets. Nothing is stored twice or skipped."""
    n = 21_000
    messages = usage_messages(n, seed=33)
    parts = [messages[:7_000], messages[7_000:14_000], messages[14_000:]]
    sa, sb = make_config("first"), make_config("second")
    a, b = daemons(sa, name="first"), daemons(sb, name="second")

    # 1. the first daemon alone
    sent = produce_messages(topics.bootstrap, topics.usage, parts[0])
    a.start()
    a.wait_ready()
    wait_consumed([a], topics, next_offsets(sent))

    # 2. a second daemon joins and takes some partitions over
    b.start()
    b.wait_ready()
    wait_for_split(a, b, topics)
    taken = _usage_assignment(b, topics)
    second = produce_messages(topics.bootstrap, topics.usage, parts[1])
    sent += second
    wait_consumed([a, b], topics, next_offsets(sent))

    # 3. it leaves; the first daemon gets those partitions back
    assert b.terminate() == 0, b.log_tail()
    a.wait_until(
        lambda: _usage_assignment(a, topics) == set(range(USAGE_PARTITIONS)),
        timeout=45,
        what="all partitions back",
    )
    sent += produce_messages(topics.bootstrap, topics.usage, parts[2])
    end = next_offsets(sent)
    wait_consumed([a], topics, end)
    assert a.terminate() == 0, a.log_tail()

    state_a, state_b = read_store(sa.store), read_store(sb.store)
    # the second daemon stored exactly the second part's events on the partitions it held
    assert sorted(state_b.event_ids) == sorted(
        s.key.decode() for s in second if s.key is not None and s.partition in taken
    )
    assert set(state_b.usage_offsets(topics.usage)) == taken
    ids_a, ids_b = set(state_a.event_ids), set(state_b.event_ids)
    twice = ids_a & ids_b
    assert not twice, (
        f"{len(twice)} event(s) stored by both daemons: the first one re-read partitions "
        f"{sorted(taken)} from its own stored offsets after taking them back"
    )
    assert state_a.rows == state_a.distinct_event_ids
    assert state_a.rows + state_b.rows == n
    assert ids_a | ids_b == {k.decode() for k, _ in messages}
    assert state_a.usage_offsets(topics.usage) == end


def test_group_offsets_catch_up_with_the_store(
    topics: Topics, make_config: MakeConfig, daemons: Daemons
) -> None:
    """When the group's committed offsets are behind a daemon's store (a crash between the
    store's commit and Kafka's, or a renamed group), the daemon commits its store's offsets on
    assignment, so a peer that takes a partition over does not ingest it a second time."""
    n = 8_000
    messages = usage_messages(n, seed=34)
    sent = produce_messages(topics.bootstrap, topics.usage, messages)
    end = next_offsets(sent)
    old_group = f"{topics.group}-old"
    before = make_config("before", kafka={"group_id": old_group})
    first = daemons(before, name="before")
    first.start()
    first.wait_ready()
    wait_consumed([first], topics, end, group=old_group)
    assert first.terminate() == 0, first.log_tail()
    assert read_store(before.store).rows == n

    # the same store in the test's group, whose committed offsets are empty
    a = daemons(make_config("a", store=before.store), name="a")
    sb = make_config("b")
    b = daemons(sb, name="b")
    a.start()
    a.wait_ready()
    b.start()
    b.wait_ready()
    wait_for_split(a, b, topics)
    taken = _usage_assignment(b, topics)
    wait_consumed([a, b], topics, {p: end[p] for p in taken}, timeout=30)
    # a gets no new records: a commit of its store's offsets could only come on assignment
    committed = committed_offsets(topics.bootstrap, topics.group, topics.usage_partitions())
    assert a.terminate() == 0, a.log_tail()
    assert b.terminate() == 0, b.log_tail()

    state_a, state_b = read_store(before.store), read_store(sb.store)
    twice = set(state_a.event_ids) & set(state_b.event_ids)
    assert not twice, (
        f"{len(twice)} event(s) stored by both daemons: b re-read partitions {sorted(taken)} "
        f"from the start (group offsets committed: {committed}; a's store: "
        f"{state_a.usage_offsets(topics.usage)})"
    )
    assert committed == end


# -- 4. bad input ---------------------------------------------------------------------------


def bad_messages() -> list[tuple[str, bytes, bytes]]:
    """(expected reason, key, value) of each kind of bad record."""
    load = UsageLoad(seed=44, start=START)

    def event(i: int) -> dict[str, object]:
        return load.event(i)

    def dump(e: dict[str, object]) -> bytes:
        return json.dumps(e, separators=(",", ":")).encode()

    wrong_type = event(1)
    wrong_type["gen_ai.usage.input_tokens"] = str(wrong_type["gen_ai.usage.input_tokens"])
    missing = event(2)
    del missing["gen_ai.request.model"]
    negative = event(3)
    negative["gen_ai.usage.output_tokens"] = -5
    huge = event(4)
    huge["padding"] = "x" * (5 << 20)  # valid JSON, valid event, but 5 MiB
    return [
        ("invalid_json", b"bad-json", dump(event(0))[:-7]),
        ("wrong_type", b"bad-type", dump(wrong_type)),
        ("missing_field", b"bad-missing", dump(missing)),
        ("not_an_object", b"bad-array", json.dumps([1, 2, 3]).encode()),
        ("not_an_object", b"bad-string", b'"just a string"'),
        ("invalid_json", b"bad-empty", b""),
        ("invalid_value", b"bad-negative", dump(negative)),
        ("too_large", b"bad-huge", dump(huge)),
    ]


def test_bad_records_go_to_dead_letters_and_good_ones_are_stored(
    topics: Topics, make_config: MakeConfig, daemons: Daemons
) -> None:
    """Malformed, mistyped, incomplete, non-object, empty and oversized records between good
    ones in one partition: the daemon keeps running, stores every good event, and puts each
    bad record, unchanged, on the dead-letter topic with its reason and source headers."""
    good = usage_messages(400, seed=4)
    bad = bad_messages()
    stream: list[tuple[bytes, bytes]] = []
    kinds: dict[bytes, str] = {}
    for i, (reason, key, value) in enumerate(bad):
        stream += good[i * 50 : (i + 1) * 50]
        stream.append((key, value))
        kinds[key] = reason
    stream += good[len(bad) * 50 :]
    setup = make_config("bad")
    daemon = daemons(setup)
    daemon.start()
    daemon.wait_ready()

    sent = produce_messages(
        topics.bootstrap, topics.usage, stream, partition=0, max_request_size=16 << 20
    )
    end = next_offsets(sent)
    assert end == {0: len(stream), 1: 0, 2: 0, 3: 0}
    wait_consumed([daemon], topics, end)
    dead = consume_all(topics.bootstrap, topics.dead_letter, len(bad))
    assert daemon.alive, f"the daemon died on bad input\n{daemon.log_tail()}"
    assert daemon.terminate() == 0, daemon.log_tail()

    by_key = {s.key: s for s in sent}
    assert len(dead) == len(bad), [r.key for r in dead]
    assert sorted(r.key for r in dead) == sorted(kinds)
    for record in dead:
        headers = {k: v.decode() for k, v in record.headers}
        source = by_key[record.key]
        assert headers.get("finopsd-reason") == kinds[record.key], (record.key, headers)
        assert headers.get("finopsd-detail"), (record.key, headers)
        assert headers.get("finopsd-source-topic") == topics.usage
        assert headers.get("finopsd-source-partition") == "0"
        assert headers.get("finopsd-source-offset") == str(source.offset)
        assert (record.value or b"") == source.value, f"{record.key!r}: value changed"

    state = read_store(setup.store)
    assert sorted(state.event_ids) == sorted(k.decode() for k, _ in good)
    assert state.token_sums == token_sums(good)
    assert state.counts["dead_letters"] == len(bad)
    assert state.counts["dead_letters_by_reason"] == dict(Counter(kinds.values()))
    assert state.usage_offsets(topics.usage) == {0: len(stream)}


# -- 5. clean stop --------------------------------------------------------------------------


def test_sigterm_mid_ingest_stops_cleanly_and_resumes(
    topics: Topics, make_config: MakeConfig, daemons: Daemons
) -> None:
    """SIGTERM while events stream in: exit status 0, the store holds exactly the events
    its offsets cover; a restart stores the rest, N in all."""
    n = 60_000
    messages = usage_messages(n, seed=5)
    chunks = [messages[i : i + 5_000] for i in range(0, n, 5_000)]
    setup = make_config("term", ingest={"batch_max_events": 5_000})
    daemon = daemons(setup)
    daemon.start()
    daemon.wait_ready()

    sent = produce_messages(topics.bootstrap, topics.usage, chunks[0])

    def committed_any() -> bool:
        committed = committed_offsets(topics.bootstrap, topics.group, topics.usage_partitions())
        return sum(committed.values()) > 0

    daemon.wait_until(committed_any, timeout=30, what="a first stored batch", interval=0.05)
    sent += produce_messages(topics.bootstrap, topics.usage, chunks[1])  # in flight
    assert daemon.terminate() == 0, daemon.log_tail()

    stopped = read_store(setup.store)
    assert_store_matches_offsets(stopped, sent, topics.usage)
    assert 0 < stopped.rows <= len(sent)

    for chunk in chunks[2:]:
        sent += produce_messages(topics.bootstrap, topics.usage, chunk)
    end = next_offsets(sent)
    run_until_consumed(daemon, topics, end)
    final = read_store(setup.store)
    assert final.rows == n
    assert final.usage_offsets(topics.usage) == end
    assert_store_matches_offsets(final, sent, topics.usage)


# -- 6. and 7. the command line -------------------------------------------------------------


def test_invalid_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    """An invalid config file: exit status 2, one message naming the key, no traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[kafka]\nmax_poll_records = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "finopsd", "run", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "kafka.max_poll_records" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_produce_command_sends_n_events(topics: Topics, tmp_path: Path) -> None:
    """``finopsd produce -n 500 --json`` prints a JSON summary and the topic holds 500."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finopsd",
            "produce",
            "--bootstrap",
            topics.bootstrap,
            "--topic",
            topics.usage,
            "-n",
            "500",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["sent"] == 500
    assert summary["topic"] == topics.usage
    assert summary["valid_messages"] == 500
    records = consume_all(topics.bootstrap, topics.usage, 500, partitions=USAGE_PARTITIONS)
    assert len(records) == 500
    assert len({r.key for r in records}) == 500


def test_produce_runs_send_fresh_event_ids_unless_seeded(topics: Topics, tmp_path: Path) -> None:
    """Two runs without --seed send different event ids (a second quick-start run is not
    all duplicates); two runs with the same --seed send the same ones."""

    def produce(*extra: str) -> dict[str, Any]:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "finopsd",
                "produce",
                "--bootstrap",
                topics.bootstrap,
                "--topic",
                topics.usage,
                "-n",
                "50",
                "--json",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=clean_env(),
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    runs = [produce(), produce(), produce("--seed", "7"), produce("--seed", "7")]
    assert runs[0]["seed"] != runs[1]["seed"] and runs[2]["seed"] == runs[3]["seed"] == 7
    records = consume_all(topics.bootstrap, topics.usage, 200, partitions=USAGE_PARTITIONS)
    keys = [r.key.decode() for r in records]
    by_run = [{k for k in keys if k.startswith(run["run_id"] + "-")} for run in runs]
    assert [len(ids) for ids in by_run] == [50, 50, 50, 50]
    assert not by_run[0] & by_run[1]
    assert by_run[2] == by_run[3] and len(keys) == 200 and len(set(keys)) == 150
