"""Replay real LLM serving traces to Kafka as native usage events (``finopsd replay``).

Three input formats, each read by a pure iterator (no Kafka) that yields one
``ReplayEvent`` per request and one ``BadLine`` per line it cannot use:

``azure``
    The Azure LLM inference trace 2023 CSV (``TIMESTAMP,ContextTokens,
    GeneratedTokens``): context tokens become ``gen_ai.usage.input_tokens``,
    generated tokens ``gen_ai.usage.output_tokens``. No prompt hashes.
``mooncake``
    The Mooncake trace JSONL (``timestamp`` in ms, ``input_length``,
    ``output_length``, ``hash_ids``). ``hash_ids`` are the hashes of the
    prompt's consecutive 512-token blocks (``BLOCK_TOKENS``), remapped to
    integers; they become ``prefix_hashes`` as signed 64-bit ints (an id in
    [2**63, 2**64) wraps to its two's-complement value; anything else outside
    the signed range is a bad line). ``prompt_hash`` is a hash of the whole
    ``hash_ids`` list (the last id already covers the partial last block).
``native``
    NDJSON lines already in ``UsageEvent`` form. Each is validated with
    ``UsageEvent.model_validate_json`` and, if valid, sent byte for byte
    (surrounding whitespace stripped), keyed by its own ``event_id``; its own
    ``ts``, tenant and model are kept.

Traces carry timing and sizes, not tenants, models or ids; for ``azure`` and
``mooncake`` a ``Plan`` supplies them:

- Timing: each request's offset from the file's first request (``offset_s``)
  is added to ``Plan.start``, so replayed events keep the trace's
  inter-arrival gaps. Pacing (``paced``) uses the same offsets.
- Tenant and model: seeded pseudo-random, drawn per request from a hash of
  (seed, line number), uniform over ``Plan.tenants`` and ``Plan.models``. The
  same seed gives the same assignment, whatever ``--limit`` or bad lines.
- ``event_id`` = ``replay-<run id>-<8 hex digits of the file's name>-<line>``:
  deterministic per (file name, line, run id). Replaying the same file with
  the same run id re-sends the same ids, and finopsd stores each once (its
  dedup compares ids within ``ingest.dedup_window_hours`` of the event's
  ``ts``, so pass the same ``--start`` too when replaying more than that
  later); a different run id gives new events.

Every message is keyed by its ``event_id``, so a re-send lands on the same
partition as the original.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from finopsd.events import MAX_TEXT, UsageEvent, explain
from finopsd.ingest.loadgen import TENANTS, produce

Format = Literal["azure", "mooncake", "native"]
FORMATS: tuple[Format, ...] = ("azure", "mooncake", "native")

BLOCK_TOKENS = 512
"""Tokens per Mooncake ``hash_ids`` block."""

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MAX_TOKENS = 2**40
"""The largest token count ``UsageEvent`` accepts."""

DEFAULT_TENANTS: tuple[str, ...] = tuple(t for t, _ in TENANTS)
DEFAULT_MODELS: tuple[tuple[str, str], ...] = (
    ("openai", "gpt-4o"),
    ("openai", "gpt-4o-mini"),
    ("anthropic", "claude-sonnet-4-5"),
    ("vllm", "meta-llama/Llama-3.1-8B-Instruct"),
)

RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class ReplayInputError(Exception):
    """The file cannot be replayed at all: missing, unreadable, or not in the named format."""


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line (CSV row, JSON line) that was skipped, and why."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass(frozen=True, slots=True)
class ReplayEvent:
    """One request of a trace as the native ``UsageEvent`` JSON that will be sent."""

    line: int
    """1-based line of the file (for CSV, the row's last physical line; the header is line 1)."""
    offset_s: float
    """Seconds after the file's first request (negative if the trace goes back in time)."""
    event_id: str
    ts: datetime
    input_tokens: int
    output_tokens: int
    value: bytes
    """The message value: a UsageEvent JSON object, keys as UsageEvent's aliases."""

    @property
    def key(self) -> bytes:
        """The message key: the event id."""
        return self.event_id.encode()


@dataclass(frozen=True)
class Plan:
    """How trace requests become events: run id, start time, tenants, models, seed."""

    run_id: str
    start: datetime
    tenants: tuple[str, ...] = DEFAULT_TENANTS
    models: tuple[tuple[str, str], ...] = DEFAULT_MODELS
    seed: int = 0

    def __post_init__(self) -> None:
        if not RUN_ID.fullmatch(self.run_id):
            raise ValueError(f"run id {self.run_id!r}: use 1-64 letters, digits, '_', '.' or '-'")
        if self.start.tzinfo is None:
            raise ValueError("start must carry a time zone")
        if not self.tenants or not self.models:
            raise ValueError("at least one tenant and one model are needed")

    def event_id(self, path: Path, line: int) -> str:
        """The deterministic id of the request at ``line`` of ``path`` in this run."""
        tag = hashlib.blake2b(path.name.encode(), digest_size=4).hexdigest()
        return f"replay-{self.run_id}-{tag}-{line:07d}"

    def assign(self, line: int) -> tuple[str, str, str]:
        """(tenant, provider, model) for the request at ``line``: a function of seed and line."""
        h = int.from_bytes(
            hashlib.blake2b(f"{self.seed}:{line}".encode(), digest_size=8).digest(), "big"
        )
        tenant = self.tenants[(h & 0xFFFFFFFF) % len(self.tenants)]
        provider, model = self.models[(h >> 32) % len(self.models)]
        return tenant, provider, model


def new_run_id() -> str:
    """A fresh random run id (8 hex digits)."""
    return secrets.token_hex(4)


# -- readers --------------------------------------------------------------------------------


def read_trace(path: Path, fmt: Format, plan: Plan | None) -> Iterator[ReplayEvent | BadLine]:
    """The events of ``path`` in file order, with a ``BadLine`` for each line that is skipped.

    Checks eagerly, before the first item is asked for, that the file exists and
    looks like ``fmt`` (azure: the header names the three columns; mooncake and
    native: one of the first 20 non-blank lines is a JSON object, and the first
    such object does not have only the other format's keys); raises
    ``ReplayInputError`` if not. ``plan`` is required for azure and mooncake
    and ignored for native.
    """
    if fmt not in FORMATS:
        raise ReplayInputError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    _check_file(path)
    if fmt == "native":
        _sniff_json_lines(path, fmt)
        return read_native(path)
    if plan is None:
        raise ValueError(f"--format {fmt} needs a Plan")
    if fmt == "azure":
        _azure_header(path)
        return read_azure(path, plan)
    _sniff_json_lines(path, fmt)
    return read_mooncake(path, plan)


def read_azure(path: Path, plan: Plan) -> Iterator[ReplayEvent | BadLine]:
    """Rows of an Azure LLM inference trace CSV as events (see the module docstring).

    ``TIMESTAMP`` is read as UTC (only its differences matter); blank lines are
    ignored; a row with the wrong number of fields, a token count that is not a
    non-negative integer, or an unreadable timestamp is a ``BadLine``.
    """
    index = _azure_header(path)
    first: datetime | None = None
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        for row in reader:
            if not row:
                continue
            line = reader.line_num
            if len(row) != len(header):
                yield BadLine(path, line, f"expected {len(header)} fields, got {len(row)}")
                continue
            raw_ts, raw_in, raw_out = (row[i].strip() for i in index)
            try:
                trace_ts = datetime.fromisoformat(raw_ts)
            except ValueError:
                yield BadLine(path, line, f"TIMESTAMP: not a date-time: {raw_ts[:40]!r}")
                continue
            if trace_ts.tzinfo is None:
                trace_ts = trace_ts.replace(tzinfo=UTC)
            input_tokens = _tokens(raw_in, "ContextTokens")
            output_tokens = _tokens(raw_out, "GeneratedTokens")
            if isinstance(input_tokens, str) or isinstance(output_tokens, str):
                reason = input_tokens if isinstance(input_tokens, str) else output_tokens
                yield BadLine(path, line, str(reason))
                continue
            if first is None:
                first = trace_ts
            yield _event(plan, path, line, trace_ts - first, input_tokens, output_tokens, None)


def read_mooncake(path: Path, plan: Plan) -> Iterator[ReplayEvent | BadLine]:
    """Lines of a Mooncake trace JSONL as events (see the module docstring).

    Each line is an object with ``timestamp`` (ms, a finite number),
    ``input_length`` and ``output_length`` (non-negative integers) and
    optionally ``hash_ids`` (a list of integers; missing or null: no prefix
    hashes). Blank lines are ignored; anything else is a ``BadLine``.
    """
    first: float | None = None
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                yield BadLine(path, line, f"not JSON: {exc}")
                continue
            reason = _mooncake_problem(obj)
            if reason:
                yield BadLine(path, line, reason)
                continue
            ts_ms = float(obj["timestamp"])
            if first is None:
                first = ts_ms
            ids = obj.get("hash_ids")
            hashes = None if ids is None else [i - 2**64 if i >= 2**63 else i for i in ids]
            yield _event(
                plan,
                path,
                line,
                timedelta(milliseconds=ts_ms - first),
                obj["input_length"],
                obj["output_length"],
                hashes,
            )


def read_native(path: Path) -> Iterator[ReplayEvent | BadLine]:
    """NDJSON ``UsageEvent`` lines as events, each value the line's own bytes (stripped).

    A line that ``UsageEvent.model_validate_json`` rejects is a ``BadLine`` with
    the model's explanation; blank lines are ignored. ``offset_s`` is the
    event's ``ts`` minus the first valid event's ``ts``.
    """
    first: datetime | None = None
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            value = raw.strip()
            if not value:
                continue
            try:
                event = UsageEvent.model_validate_json(value)
            except ValidationError as exc:
                yield BadLine(path, line, explain(exc).removeprefix("<record>: "))
                continue
            if first is None:
                first = event.ts
            yield ReplayEvent(
                line=line,
                offset_s=(event.ts - first).total_seconds(),
                event_id=event.event_id,
                ts=event.ts,
                input_tokens=event.input_tokens,
                output_tokens=event.output_tokens,
                value=value,
            )


def count_lines(path: Path) -> int:
    """Newline-terminated lines of ``path``, plus a last unterminated one (for a progress total)."""
    n = 0
    last = b"\n"
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ReplayInputError(f"{path}: no such file")
    if not path.is_file():
        raise ReplayInputError(f"{path}: not a regular file")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ReplayInputError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def _first_lines(path: Path, n: int) -> list[tuple[int, bytes]]:
    """The first ``n`` non-blank lines of ``path`` with their line numbers, stripped."""
    out: list[tuple[int, bytes]] = []
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            if raw.strip():
                out.append((line, raw.strip()))
                if len(out) >= n:
                    break
    return out


def _azure_header(path: Path) -> tuple[int, int, int]:
    """Indexes of the three Azure columns in the header; ``ReplayInputError`` if it lacks them."""
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    names = [h.strip().lstrip("\ufeff") for h in header]
    missing = [c for c in AZURE_COLUMNS if c not in names]
    if not missing:
        return (
            names.index(AZURE_COLUMNS[0]),
            names.index(AZURE_COLUMNS[1]),
            names.index(AZURE_COLUMNS[2]),
        )
    if not header:
        raise ReplayInputError(f"{path}: empty file: an azure trace starts with a CSV header")
    hint = ""
    if header[0].lstrip().startswith("{"):
        hint = " (it looks like JSON lines: --format mooncake or native?)"
    raise ReplayInputError(
        f"{path}:1: not an azure trace: the header lacks {', '.join(missing)}{hint}; "
        f"expected {','.join(AZURE_COLUMNS)}"
    )


def _sniff_json_lines(path: Path, fmt: Format, lines: int = 20) -> None:
    """Raise ``ReplayInputError`` unless the file's start could be ``fmt`` JSON lines.

    It could not if none of its first ``lines`` non-blank lines starts with
    ``{``, or if the first of them that parses as an object has the other JSON
    format's keys and none of ``fmt``'s. (A bad line among good ones is
    reported when read, not here.)
    """
    head = _first_lines(path, lines)
    if not head:
        return  # an empty file replays nothing
    if not any(raw.startswith(b"{") for _, raw in head):
        line, raw = head[0]
        hint = " (it looks like CSV: --format azure?)" if b"," in raw else ""
        raise ReplayInputError(
            f"{path}:{line}: not {fmt} JSON lines: no JSON object in its first lines{hint}"
        )
    objects = ((n, _json_object(raw)) for n, raw in head)
    line, obj = next(((n, o) for n, o in objects if o is not None), (0, None))
    if obj is None:
        return
    mooncake_keys = {"timestamp", "input_length", "output_length"}
    native_keys = {"event_id", "gen_ai.request.model"}
    if fmt == "mooncake" and not obj.keys() & mooncake_keys and obj.keys() & native_keys:
        raise ReplayInputError(
            f"{path}:{line}: not a mooncake trace: it has usage-event keys (--format native?)"
        )
    if fmt == "native" and not obj.keys() & native_keys and obj.keys() & mooncake_keys:
        raise ReplayInputError(
            f"{path}:{line}: not native usage events: it has mooncake keys (--format mooncake?)"
        )


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _tokens(text: str, column: str) -> int | str:
    """The token count in ``text``, or the reason it is not one."""
    if not text.isascii() or not text.isdigit():
        return f"{column}: not a non-negative integer: {text[:40]!r}"
    value = int(text)
    if value > MAX_TOKENS:
        return f"{column}: {value} is more than {MAX_TOKENS}"
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mooncake_problem(obj: Any) -> str | None:
    """Why ``obj`` is not a usable Mooncake record, or None."""
    if not isinstance(obj, dict):
        return f"not a JSON object but {type(obj).__name__}"
    for key in ("timestamp", "input_length", "output_length"):
        if key not in obj:
            return f"{key}: missing"
    ts = obj["timestamp"]
    if not (_is_int(ts) or isinstance(ts, float)) or not math.isfinite(ts):
        return f"timestamp: not a finite number: {ts!r:.40}"
    for key in ("input_length", "output_length"):
        value = obj[key]
        if not _is_int(value) or not 0 <= value <= MAX_TOKENS:
            return f"{key}: not an integer in [0, {MAX_TOKENS}]: {value!r:.40}"
    ids = obj.get("hash_ids")
    if ids is not None:
        if not isinstance(ids, list):
            return f"hash_ids: not a list: {ids!r:.40}"
        for i, value in enumerate(ids):
            if not _is_int(value) or not -(2**63) <= value < 2**64:
                return f"hash_ids[{i}]: not a 64-bit integer: {value!r:.40}"
    return None


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _event(
    plan: Plan,
    path: Path,
    line: int,
    offset: timedelta,
    input_tokens: int,
    output_tokens: int,
    prefix_hashes: list[int] | None,
) -> ReplayEvent:
    event_id = plan.event_id(path, line)
    ts = plan.start + offset
    tenant, provider, model = plan.assign(line)
    event: dict[str, object] = {
        "event_id": event_id,
        "ts": _iso(ts),
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
        "tenant": tenant,
    }
    if prefix_hashes is not None:
        if prefix_hashes:
            digest = hashlib.blake2b(
                ",".join(map(str, prefix_hashes)).encode(), digest_size=8
            ).hexdigest()
            event["prompt_hash"] = digest
        event["prefix_hashes"] = prefix_hashes
    return ReplayEvent(
        line=line,
        offset_s=offset.total_seconds(),
        event_id=event_id,
        ts=ts,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        value=json.dumps(event, separators=(",", ":")).encode(),
    )


# -- pacing and publishing ------------------------------------------------------------------


def paced(
    events: Iterable[ReplayEvent],
    speed: float | None,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> Iterator[ReplayEvent]:
    """``events``, each yielded no earlier than ``offset_s / speed`` seconds after the first.

    ``speed`` None: no pacing, as fast as the consumer of this iterator takes
    them. An event that is already due (the publisher fell behind, or the trace
    goes back in time) is yielded at once; pacing never drops events.
    """
    if speed is None:
        yield from events
        return
    if not speed > 0 or not math.isfinite(speed):
        raise ValueError(f"speed must be a positive number, not {speed}")
    t0: float | None = None
    base = 0.0
    for event in events:
        if t0 is None:
            t0, base = clock(), event.offset_s
        due = t0 + (event.offset_s - base) / speed
        while (wait := due - clock()) > 0:
            sleep(wait)
        yield event


@dataclass
class ReplayStats:
    """What a replay sent and skipped."""

    sent: int = 0
    """Messages handed to the producer and flushed."""
    skipped: int = 0
    """Bad lines skipped."""
    bad_lines: list[BadLine] = field(default_factory=list)
    """The first ``max_reported`` of them."""
    input_tokens: int = 0
    output_tokens: int = 0
    first_ts: datetime | None = None
    """Earliest ``ts`` sent."""
    last_ts: datetime | None = None
    """Latest ``ts`` sent."""
    trace_seconds: float = 0.0
    """Span of the sent events' trace offsets: the pacing target is this / speed."""
    seconds: float = 0.0
    """From the first message handed to the producer to the end of its flush."""

    def as_dict(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.sent / self.seconds) if self.seconds else None,
            "first_ts": _iso(self.first_ts) if self.first_ts else None,
            "last_ts": _iso(self.last_ts) if self.last_ts else None,
            "trace_seconds": round(self.trace_seconds, 3),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "bad_lines": [str(b) for b in self.bad_lines],
        }


def publish(
    bootstrap: str,
    topic: str,
    items: Iterable[ReplayEvent | BadLine],
    *,
    speed: float | None = None,
    limit: int | None = None,
    producer_config: dict[str, object] | None = None,
    on_progress: Callable[[int], object] | None = None,
    on_bad_line: Callable[[BadLine], object] | None = None,
    max_reported: int = 20,
) -> ReplayStats:
    """Send the events of ``items`` to ``topic``, key = event id, paced by ``speed``.

    At most ``limit`` events are sent (None: all); reading stops there. Bad
    lines are counted, the first ``max_reported`` kept in the stats, and each
    passed to ``on_bad_line``. ``on_progress(n)`` reports events sent since its
    previous call (at most every 0.1 s or 1,000 events). Uses
    ``loadgen.produce`` (acks=1; a producer retry may duplicate a message,
    which finopsd's dedup by event id absorbs). Kafka errors propagate.
    """
    stats = ReplayStats()
    lo = hi = 0.0
    pending = 0
    last_report = 0.0
    started: float | None = None

    def selected() -> Iterator[ReplayEvent]:
        if limit is not None and limit <= 0:
            return
        n = 0
        for item in items:
            if isinstance(item, BadLine):
                stats.skipped += 1
                if len(stats.bad_lines) < max_reported:
                    stats.bad_lines.append(item)
                if on_bad_line is not None:
                    on_bad_line(item)
                continue
            yield item
            n += 1
            if limit is not None and n >= limit:
                return

    def messages() -> Iterator[tuple[bytes, bytes]]:
        nonlocal lo, hi, pending, last_report, started
        for event in paced(selected(), speed):
            now = time.perf_counter()
            if stats.first_ts is None or stats.last_ts is None:
                started = last_report = now
                lo = hi = event.offset_s
                stats.first_ts = stats.last_ts = event.ts
            lo, hi = min(lo, event.offset_s), max(hi, event.offset_s)
            stats.first_ts = min(stats.first_ts, event.ts)
            stats.last_ts = max(stats.last_ts, event.ts)
            stats.input_tokens += event.input_tokens
            stats.output_tokens += event.output_tokens
            yield event.key, event.value
            pending += 1
            if on_progress is not None and (pending >= 1000 or now - last_report >= 0.1):
                on_progress(pending)
                pending, last_report = 0, now

    stats.sent = produce(bootstrap, topic, messages(), sys.maxsize, producer_config=producer_config)
    if on_progress is not None and pending:
        on_progress(pending)
    if started is not None:
        stats.seconds = time.perf_counter() - started
    stats.trace_seconds = hi - lo
    return stats


# -- command-line values (argparse types) ---------------------------------------------------


def speed_arg(text: str) -> float:
    """``--speed``: a positive, finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(
            f"{text} is not a positive number (leave --speed out for no pacing)"
        )
    return value


def tenants_arg(text: str) -> tuple[str, ...]:
    """``--tenants a,b,c``: non-empty names of at most MAX_TEXT characters."""
    names = tuple(t.strip() for t in text.split(","))
    for name in names:
        if not name or len(name) > MAX_TEXT:
            raise argparse.ArgumentTypeError(
                f"{text!r}: each tenant needs 1 to {MAX_TEXT} characters"
            )
    return names


def models_arg(text: str) -> tuple[tuple[str, str], ...]:
    """``--models provider/model,...``: split at the first '/', so the model may hold more."""
    out = []
    for item in text.split(","):
        provider, sep, model = item.strip().partition("/")
        if not sep or not provider or not model or max(len(provider), len(model)) > MAX_TEXT:
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not provider/model (e.g. openai/gpt-4o)"
            )
        out.append((provider, model))
    return tuple(out)


def start_arg(text: str) -> datetime:
    """``--start``: an ISO-8601 date-time; without an offset it is UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO-8601 date-time (e.g. 2025-01-01T09:00:00Z)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def limit_arg(text: str) -> int:
    """``--limit``: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def run_id_arg(text: str) -> str:
    """``--run-id``: 1-64 letters, digits, '_', '.' or '-'."""
    if not RUN_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return text
