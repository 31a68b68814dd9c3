"""The LiteLLM proxy config editor and the backends that make a config live.

Everything is real: the config is a LiteLLM proxy config.yaml laid out as LiteLLM's
documentation lays it out (tests/data/litellm_proxy_config.yaml: comments, quoting,
a block indented differently from the rest, flow collections), files are written in
tmp_path, the reload command is a Python script that records each run and fails on
demand, the git repository and its remote (a bare repository) are made with ``git
init``, and the proxy's health endpoints are a small HTTP server on 127.0.0.1. What
LiteLLM itself reads is checked with PyYAML, the parser LiteLLM loads config.yaml with.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from finopsd.actions.gateway import litellm_config as lc
from finopsd.actions.gateway.backends import (
    PREVIOUS_SUFFIX,
    BackendError,
    ConfigBackend,
    ConflictError,
    FileReloadBackend,
    GitBackend,
    ProxyUnhealthy,
    ReloadError,
    wait_healthy,
    write_atomically,
)

FIXTURE = Path(__file__).parent / "data" / "litellm_proxy_config.yaml"
CONFIG = FIXTURE.read_text(encoding="utf-8")
SPLIT = {"openai/gpt-4o": 0.9, "openai/gpt-4o-mini": 0.1}


def litellm_reads(text: str) -> Any:
    """The config as LiteLLM reads it (``yaml.safe_load``)."""
    return yaml.safe_load(text)


def changed_lines(old: str, new: str) -> tuple[list[str], list[str]]:
    """The lines an edit removed and the lines it added."""
    removed: list[str] = []
    added: list[str] = []
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag != "equal":
            removed += a[i1:i2]
            added += b[j1:j2]
    return removed, added


# the fixture with the response cache on, written the documentation's way
CACHED = CONFIG.replace("  drop_params: True\n", "  drop_params: True\n  cache: True\n")

# every edit: (name, the text it edits, the edit)
EDITS: list[tuple[str, str, Callable[[str], lc.ConfigEdit]]] = [
    ("weights, adding a deployment", CONFIG, lambda t: lc.set_weights(t, "gpt-4o", SPLIT)),
    (
        "weights, odd indentation",
        CONFIG,
        lambda t: lc.set_weights(t, "gpt-4o-mini", {"openai/gpt-4o-mini": 3, "openai/gpt-4o": 1}),
    ),
    ("fallbacks, added", CONFIG, lambda t: lc.set_fallbacks(t, "gpt-4o-mini", ["gpt-4o"])),
    ("fallbacks, removed", CONFIG, lambda t: lc.set_fallbacks(t, "claude-haiku", [])),
    ("cache on", CONFIG, lambda t: lc.enable_response_cache(t, ttl_s=600)),
    ("cache on, written already", CACHED, lambda t: lc.enable_response_cache(t, ttl_s=600)),
    ("cache off", CACHED, lc.disable_response_cache),
    ("prompt caching", CONFIG, lambda t: lc.set_prompt_caching(t, "claude-sonnet")),
    (
        "max_tokens default",
        CONFIG,
        lambda t: lc.set_max_tokens(t, "gpt-4o", 1024, hard_cap=False),
    ),
]


# -- the editor -----------------------------------------------------------------------------


def test_fixture_is_what_litellm_reads() -> None:
    data = litellm_reads(CONFIG)
    assert lc._plain(lc.load_config(CONFIG)) == data
    state = lc.read_state(CONFIG)
    assert sorted(state.groups) == [
        "claude-haiku",
        "claude-sonnet",
        "gpt-4o",
        "gpt-4o-mini",
        "text-embedding-3-small",
    ]
    assert state.routing_strategy == "simple-shuffle"
    assert state.fallbacks == {"claude-haiku": ("claude-sonnet",)}
    assert state.fallbacks_key == "router_settings.fallbacks"
    assert state.cache.enabled is False
    assert state.shares("gpt-4o") == {"openai/gpt-4o": 1.0}


@pytest.mark.parametrize(("name", "base", "edit"), EDITS, ids=[n for n, _, _ in EDITS])
def test_edit_keeps_the_rest_byte_for_byte_and_is_idempotent(
    name: str, base: str, edit: Callable[[str], lc.ConfigEdit]
) -> None:
    result = edit(base)
    assert result.changed and result.diff.startswith("--- a/config.yaml\n+++ b/config.yaml\n")
    removed, added = changed_lines(base, result.new_text)
    # the lines of the original an edit touches are only the changed nodes' own lines:
    # every comment line, blank line and untouched node is still there, byte for byte
    assert len(removed) <= 1, removed
    kept = result.new_text.splitlines(keepends=True)
    for line in base.splitlines(keepends=True):
        if line not in removed:
            assert line in kept, line
    # what LiteLLM reads matches what the editor reads
    assert litellm_reads(result.new_text) == lc._plain(lc.load_config(result.new_text))
    again = edit(result.new_text)
    assert again.diff == "" and again.new_text == result.new_text and not again.changed
    assert added or removed


def test_set_weights_diff_and_what_litellm_reads() -> None:
    result = lc.set_weights(CONFIG, "gpt-4o", SPLIT)
    assert result.description == (
        "model group 'gpt-4o': weights openai/gpt-4o=9, openai/gpt-4o-mini=1 "
        "(adds a deployment of openai/gpt-4o-mini)"
    )
    assert result.diff == (
        "--- a/config.yaml\n"
        "+++ b/config.yaml\n"
        "@@ -10,9 +10,16 @@\n"
        "       model: openai/gpt-4o ### MODEL NAME sent to `litellm.completion()` ###\n"
        '       api_key: "os.environ/OPENAI_API_KEY" # does os.getenv("OPENAI_API_KEY")\n'
        "       rpm: 480      # Rate limit for this deployment: in requests per minute (rpm)\n"
        "+      weight: 9\n"
        "     model_info:\n"
        '       id: "gpt-4o-primary"\n'
        "       mode: chat\n"
        "+  - model_name: gpt-4o # added by finopsd: litellm_params from model group "
        "'gpt-4o-mini'\n"
        "+    litellm_params:\n"
        "+      model: openai/gpt-4o-mini\n"
        "+      api_key: os.environ/OPENAI_API_KEY\n"
        "+      rpm: 1440\n"
        "+      weight: 1\n"
        " \n"
        "   - model_name: gpt-4o-mini\n"
        "     litellm_params:\n"
    )
    group = [e for e in litellm_reads(result.new_text)["model_list"] if e["model_name"] == "gpt-4o"]
    assert [(e["litellm_params"]["model"], e["litellm_params"]["weight"]) for e in group] == [
        ("openai/gpt-4o", 9),
        ("openai/gpt-4o-mini", 1),
    ]
    # the new deployment is the other one's litellm_params, credentials and all
    assert group[1]["litellm_params"]["api_key"] == "os.environ/OPENAI_API_KEY"
    assert lc.read_state(result.new_text).shares("gpt-4o") == pytest.approx(SPLIT)


def test_set_weights_follows_a_block_indented_its_own_way() -> None:
    result = lc.set_weights(
        CONFIG, "gpt-4o-mini", {"openai/gpt-4o-mini": 0.75, "openai/gpt-4o": 0.25}
    )
    _, added = changed_lines(CONFIG, result.new_text)
    assert added == [
        "        weight: 3\n",
        "  - model_name: gpt-4o-mini # added by finopsd: litellm_params from model group"
        " 'gpt-4o'\n",
        "    litellm_params:\n",
        "        model: openai/gpt-4o\n",
        "        api_key: os.environ/OPENAI_API_KEY\n",
        "        rpm: 480\n",
        "        weight: 1\n",
    ]
    # moving traffic back changes weights only: the added deployment stays, at 0
    back = lc.set_weights(result.new_text, "gpt-4o-mini", {"openai/gpt-4o-mini": 1})
    removed, added = changed_lines(result.new_text, back.new_text)
    assert removed == ["        weight: 3\n", "        weight: 1\n"]
    assert added == ["        weight: 1\n", "        weight: 0\n"]
    assert lc.read_state(back.new_text).shares("gpt-4o-mini") == {
        "openai/gpt-4o-mini": 1.0,
        "openai/gpt-4o": 0.0,
    }


def test_shares_to_weights() -> None:
    assert lc.shares_to_weights([0.9, 0.1]) == [9, 1]
    assert lc.shares_to_weights([9, 1]) == [9, 1]
    assert lc.shares_to_weights([0.45, 0.45, 0.1]) == [9, 9, 2]
    assert lc.shares_to_weights([1 / 3, 2 / 3]) == [33, 67]
    assert lc.shares_to_weights([0.999, 0.001]) == [99, 1]  # a positive share keeps a weight
    assert lc.shares_to_weights([1.0, 0.0]) == [1, 0]
    with pytest.raises(lc.ConfigEditError, match="all be zero"):
        lc.shares_to_weights([0.0, 0.0])
    with pytest.raises(lc.ConfigEditError):
        lc.shares_to_weights([float("nan"), 1.0])


def test_set_weights_refusals() -> None:
    with pytest.raises(lc.ConfigEditError, match="no model group 'gpt-5'"):
        lc.set_weights(CONFIG, "gpt-5", {"openai/gpt-4o": 1})
    with pytest.raises(lc.ConfigEditError, match="not defined anywhere in model_list"):
        lc.set_weights(CONFIG, "gpt-4o", {"openai/gpt-4o": 0.5, "openai/o3": 0.5})
    busy = CONFIG.replace("routing_strategy: simple-shuffle", "routing_strategy: least-busy")
    with pytest.raises(lc.NotExpressible, match="simple-shuffle") as e:
        lc.set_weights(busy, "gpt-4o", SPLIT)
    assert "least-busy" in e.value.reason


def test_fallbacks_keep_the_style_they_are_written_in() -> None:
    flow = lc.set_fallbacks(CONFIG, "gpt-4o-mini", ["gpt-4o"])
    assert flow.description == "router_settings.fallbacks: 'gpt-4o-mini' falls back to 'gpt-4o'"
    assert changed_lines(CONFIG, flow.new_text) == (
        ['  fallbacks: [{"claude-haiku": ["claude-sonnet"]}]\n'],
        ['  fallbacks: [{"claude-haiku": ["claude-sonnet"]}, {"gpt-4o-mini": ["gpt-4o"]}]\n'],
    )
    # replacing a group's entry keeps the others, in order
    moved = lc.set_fallbacks(flow.new_text, "claude-haiku", ["gpt-4o", "claude-sonnet"])
    assert litellm_reads(moved.new_text)["router_settings"]["fallbacks"] == [
        {"claude-haiku": ["gpt-4o", "claude-sonnet"]},
        {"gpt-4o-mini": ["gpt-4o"]},
    ]
    block = CONFIG.replace(
        '  fallbacks: [{"claude-haiku": ["claude-sonnet"]}]\n',
        "  fallbacks: # cheap first\n    - claude-haiku:\n        - claude-sonnet\n",
    )
    result = lc.set_fallbacks(block, "gpt-4o-mini", ["gpt-4o"])
    assert changed_lines(block, result.new_text) == (
        ["    - claude-haiku:\n", "        - claude-sonnet\n"],
        ['    - claude-haiku: ["claude-sonnet"]\n', '    - gpt-4o-mini: ["gpt-4o"]\n'],
    )
    assert lc.read_state(result.new_text).fallbacks == {
        "claude-haiku": ("claude-sonnet",),
        "gpt-4o-mini": ("gpt-4o",),
    }
    # a fallback may name one deployment by its model_info.id
    by_id = lc.set_fallbacks(CONFIG, "gpt-4o-mini", ["gpt-4o-primary"])
    assert lc.read_state(by_id.new_text).fallbacks["gpt-4o-mini"] == ("gpt-4o-primary",)
    with pytest.raises(lc.ConfigEditError, match="not a model group"):
        lc.set_fallbacks(CONFIG, "gpt-4o-mini", ["gpt-5"])
    with pytest.raises(lc.ConfigEditError, match="itself"):
        lc.set_fallbacks(CONFIG, "gpt-4o", ["gpt-4o"])


def test_fallbacks_are_edited_where_litellm_reads_them() -> None:
    # only litellm_settings has fallbacks: the router takes those, so they are edited there
    text = CONFIG.replace('  fallbacks: [{"claude-haiku": ["claude-sonnet"]}]\n', "").replace(
        "  num_retries: 3 #",
        '  fallbacks: [{"claude-haiku": ["claude-sonnet"]}]\n  num_retries: 3 #',
    )
    result = lc.set_fallbacks(text, "gpt-4o-mini", ["gpt-4o"])
    assert result.description.startswith("litellm_settings.fallbacks:")
    assert "fallbacks" not in litellm_reads(result.new_text)["router_settings"]
    # none anywhere: a new router_settings.fallbacks, in block style
    bare = text.replace('  fallbacks: [{"claude-haiku": ["claude-sonnet"]}]\n', "")
    new = lc.set_fallbacks(bare, "gpt-4o-mini", ["gpt-4o"])
    assert changed_lines(bare, new.new_text)[1] == [
        "  fallbacks:\n",
        '    - gpt-4o-mini: ["gpt-4o"]\n',
    ]


def test_response_cache() -> None:
    on = lc.enable_response_cache(CONFIG, ttl_s=600, supported_call_types=["acompletion"])
    assert changed_lines(CONFIG, on.new_text) == (
        [],
        [
            "  cache: true\n",
            "  cache_params:\n",
            "    type: local\n",
            "    ttl: 600\n",
            '    supported_call_types: ["acompletion"]\n',
        ],
    )
    settings = litellm_reads(on.new_text)["litellm_settings"]
    assert settings["cache"] is True
    assert settings["cache_params"] == {
        "type": "local",
        "ttl": 600,
        "supported_call_types": ["acompletion"],
    }
    state = lc.read_state(on.new_text).cache
    assert (state.enabled, state.type, state.ttl, state.supported_call_types) == (
        True,
        "local",
        600,
        ("acompletion",),
    )
    # a new ttl changes that one value; other cache_params keys are kept
    ttl = lc.enable_response_cache(on.new_text, ttl_s=60, mode="default_off")
    assert changed_lines(on.new_text, ttl.new_text) == (
        ["    ttl: 600\n"],
        ["    ttl: 60\n", "    mode: default_off\n"],
    )
    off = lc.disable_response_cache(ttl.new_text)
    assert changed_lines(ttl.new_text, off.new_text) == (["  cache: true\n"], ["  cache: false\n"])
    assert lc.read_state(off.new_text).cache.enabled is False
    assert lc.disable_response_cache(CONFIG).diff == ""  # off already
    # a `cache: True` written the documentation's way keeps its spelling
    assert changed_lines(CACHED, lc.disable_response_cache(CACHED).new_text) == (
        ["  cache: True\n"],
        ["  cache: False\n"],
    )


def test_response_cache_for_some_groups_is_not_expressible() -> None:
    with pytest.raises(lc.NotExpressible, match="proxy-wide") as e:
        lc.enable_response_cache(CONFIG, model_groups={"gpt-4o"})
    assert "supported_call_types" in e.value.reason
    everything = set(lc.read_state(CONFIG).groups)
    assert lc.enable_response_cache(CONFIG, model_groups=everything).changed
    with pytest.raises(lc.ConfigEditError, match="unknown call types"):
        lc.enable_response_cache(CONFIG, supported_call_types=["chat"])


def test_prompt_caching() -> None:
    on = lc.set_prompt_caching(CONFIG, "claude-haiku")
    assert changed_lines(CONFIG, on.new_text) == (
        [],
        [
            "      cache_control_injection_points:\n",
            "        - location: message\n",
            "          role: system\n",
        ],
    )
    (entry,) = [
        e for e in litellm_reads(on.new_text)["model_list"] if e["model_name"] == "claude-haiku"
    ]
    assert entry["litellm_params"]["cache_control_injection_points"] == [
        {"location": "message", "role": "system"}
    ]
    off = lc.set_prompt_caching(on.new_text, "claude-haiku", enabled=False)
    assert off.new_text == CONFIG
    last_turn = lc.set_prompt_caching(
        CONFIG, "claude-sonnet", injection_points=[{"location": "message", "index": -1}]
    )
    assert "        - location: message\n          index: -1\n" in last_turn.new_text
    with pytest.raises(lc.NotExpressible, match="caches prompts by itself"):
        lc.set_prompt_caching(CONFIG, "gpt-4o")
    with pytest.raises(lc.ConfigEditError, match="not LiteLLM's"):
        lc.set_prompt_caching(
            CONFIG, "claude-haiku", injection_points=[{"location": "message", "ttl": 5}]
        )
    # a group of both kinds: only the deployment that takes markers is changed
    mixed = lc.set_weights(
        CONFIG, "gpt-4o", {"openai/gpt-4o": 1, "anthropic/claude-3-5-sonnet-20240620": 1}
    ).new_text
    result = lc.set_prompt_caching(mixed, "gpt-4o")
    assert "left as is: openai/gpt-4o (provider openai: caches prompts by itself)" in (
        result.description
    )
    assert len(changed_lines(mixed, result.new_text)[1]) == 3


def test_max_tokens_cap_is_not_expressible() -> None:
    with pytest.raises(lc.NotExpressible, match="cannot cap max_tokens") as e:
        lc.set_max_tokens(CONFIG, "gpt-4o", 512)
    assert "Router._acompletion" in e.value.reason
    default = lc.set_max_tokens(CONFIG, "gpt-4o-mini", 512, hard_cap=False)
    assert changed_lines(CONFIG, default.new_text) == ([], ["        max_tokens: 512\n"])
    assert "requests may ask for more" in default.description
    assert (
        lc.set_max_tokens(default.new_text, "gpt-4o-mini", None, hard_cap=False).new_text == CONFIG
    )


def test_shared_nodes_are_not_edited() -> None:
    text = (
        "x-openai: &openai\n"
        "  api_key: os.environ/OPENAI_API_KEY\n"
        "model_list:\n"
        "  - model_name: a\n"
        "    litellm_params:\n"
        "      <<: *openai\n"
        "      model: openai/gpt-4o\n"
        "  - model_name: b\n"
        "    litellm_params: &shared\n"
        "      model: openai/gpt-4o-mini\n"
        "  - model_name: c\n"
        "    litellm_params: *shared\n"
    )
    with pytest.raises(lc.ConfigEditError, match="merge key"):
        lc.set_weights(text, "a", {"openai/gpt-4o": 1})
    with pytest.raises(lc.ConfigEditError, match="anchor"):
        lc.set_weights(text, "c", {"openai/gpt-4o-mini": 1})


def test_line_endings_and_a_missing_final_newline_are_kept() -> None:
    crlf = CONFIG.replace("\n", "\r\n")
    result = lc.set_weights(crlf, "gpt-4o", SPLIT)
    assert "\n" not in result.new_text.replace("\r\n", "")
    assert result.new_text.replace("\r\n", "\n") == lc.set_weights(CONFIG, "gpt-4o", SPLIT).new_text
    bare = CONFIG.rstrip("\n")
    cached = lc.enable_response_cache(bare, ttl_s=30)
    assert cached.new_text.endswith("# not used: no DB")  # still no final newline
    assert litellm_reads(cached.new_text)["litellm_settings"]["cache"] is True
    short = "model_list:\n- model_name: a\n  litellm_params: {model: openai/a}\n- model_name: b\n"
    tail = short + "  litellm_params: {model: openai/b}"
    appended = lc.set_fallbacks(tail, "a", ["b"])
    assert appended.new_text == tail + '\n\nrouter_settings:\n  fallbacks:\n    - a: ["b"]\n'
    assert "\\ No newline at end of file" in appended.diff


def test_a_minimal_config_gains_sections() -> None:
    text = (
        "model_list:\n- model_name: a\n  litellm_params: {model: openai/a}\n"
        "- model_name: b\n  litellm_params: {model: openai/b}\n"
    )
    result = lc.set_fallbacks(text, "a", ["b"])
    assert result.new_text == text + '\nrouter_settings:\n  fallbacks:\n    - a: ["b"]\n'
    weights = lc.set_weights(result.new_text, "a", {"openai/a": 0.5, "openai/b": 0.5})
    # a flow mapping is rewritten as JSON, keeping its trailing text
    assert '  litellm_params: {"model": "openai/a", "weight": 1}\n' in weights.new_text
    assert litellm_reads(weights.new_text)["model_list"][1] == {
        "model_name": "a",
        "litellm_params": {"model": "openai/b", "weight": 1},
    }
    with pytest.raises(lc.ConfigEditError, match="not valid YAML"):
        lc.read_state("model_list: [\n")


# -- files and reload commands --------------------------------------------------------------

RELOAD_SCRIPT = """\
import hashlib, json, os, pathlib, sys, time
log, fail = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
config = pathlib.Path(os.environ["FINOPSD_CONFIG_PATH"])
with log.open("a") as f:
    f.write(json.dumps({"sha256": hashlib.sha256(config.read_bytes()).hexdigest()}) + "\\n")
print("restarting litellm")
if fail.exists():
    print("litellm: Invalid config: " + fail.read_text(), file=sys.stderr)
    sys.exit(3)
"""


@pytest.fixture
def reload_script(tmp_path: Path) -> tuple[list[str], Path, Path]:
    """A reload command that records each run (the config's SHA-256 when it ran) and
    fails, saying why on stderr, while the ``fail`` file exists."""
    script = tmp_path / "reload_litellm.py"
    script.write_text(RELOAD_SCRIPT)
    log, fail = tmp_path / "reloads.jsonl", tmp_path / "fail"
    return [sys.executable, str(script), str(log), str(fail)], log, fail


def runs(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [json.loads(line)["sha256"] for line in log.read_text().splitlines()]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_write_atomically_keeps_the_previous_version_and_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    path.chmod(0o640)
    new = lc.set_weights(CONFIG, "gpt-4o", SPLIT).new_text
    assert write_atomically(path, new) == CONFIG
    prev = tmp_path / ("config.yaml" + PREVIOUS_SUFFIX)
    assert path.read_bytes() == new.encode() and prev.read_bytes() == CONFIG.encode()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 == stat.S_IMODE(prev.stat().st_mode)
    # the same text again: nothing written, the previous version is still the original
    before = path.stat().st_ino
    assert write_atomically(path, new) == new
    assert path.stat().st_ino == before and prev.read_bytes() == CONFIG.encode()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    fresh = tmp_path / "new.yaml"
    assert write_atomically(fresh, "model_list: []\n") is None
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
    assert not (tmp_path / ("new.yaml" + PREVIOUS_SUFFIX)).exists()
    # a symbolic link is followed: the file it points to is replaced, the link stays
    link = tmp_path / "live.yaml"
    link.symlink_to(path)
    write_atomically(link, CONFIG)
    assert link.is_symlink() and path.read_text() == CONFIG


def test_file_backend_applies_reloads_and_rolls_back(
    tmp_path: Path, reload_script: tuple[list[str], Path, Path]
) -> None:
    command, log, _ = reload_script
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    backend = FileReloadBackend(path, command, timeout_s=30)
    assert isinstance(backend, ConfigBackend)
    new = lc.set_weights(CONFIG, "gpt-4o", SPLIT).new_text
    change = backend.apply(new, action_id="act-1", description="weights", expect=CONFIG)
    assert change.changed and change.previous_text == CONFIG and backend.current() == new
    assert change.reload is not None and "restarting litellm" in change.reload.stdout_tail
    assert runs(log) == [sha(new)]  # the reload ran once the new text was in place
    assert backend.previous() == CONFIG
    # again (a restarted process finishing the step): nothing written, reloaded again
    again = backend.apply(new, action_id="act-1", description="weights", expect=CONFIG)
    assert not again.changed and runs(log) == [sha(new), sha(new)]
    quiet = FileReloadBackend(path, command, reload_unchanged=False)
    assert quiet.apply(new, action_id="act-1", description="weights").reload is None
    assert len(runs(log)) == 2
    back = backend.rollback(CONFIG, action_id="act-1", description="rollback", expect=new)
    assert back.changed and path.read_bytes() == CONFIG.encode()
    assert runs(log)[-1] == sha(CONFIG)
    assert backend.rollback(CONFIG, action_id="act-1", description="rollback").changed is False
    assert change.as_dict()["sha256"] == sha(new)


def test_file_backend_conflict_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    backend = FileReloadBackend(path)
    edited_by_hand = CONFIG.replace("num_retries: 2", "num_retries: 5")
    path.write_text(edited_by_hand)
    new = lc.set_weights(CONFIG, "gpt-4o", SPLIT).new_text
    with pytest.raises(ConflictError, match="changed since the change was planned"):
        backend.apply(new, action_id="act-2", description="weights", expect=CONFIG)
    assert path.read_text() == edited_by_hand
    assert backend.apply(new, action_id="act-2", description="weights").reload is None


def test_failing_reload_command_raises_a_clear_error(
    tmp_path: Path, reload_script: tuple[list[str], Path, Path]
) -> None:
    command, log, fail = reload_script
    fail.write_text("model_list.0.litellm_params.weight must be >= 0")
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    backend = FileReloadBackend(path, command, timeout_s=30)
    new = lc.set_weights(CONFIG, "gpt-4o", SPLIT).new_text
    with pytest.raises(ReloadError) as e:
        backend.apply(new, action_id="act-3", description="weights")
    message = str(e.value)
    assert "reload_litellm.py" in message and "exited with status 3" in message
    assert "Invalid config: model_list.0.litellm_params.weight must be >= 0" in message
    assert e.value.returncode == 3 and not e.value.timed_out
    assert runs(log) == [sha(new)]
    # the text was written; rolling back puts the old one back and reloads again
    fail.unlink()
    backend.rollback(CONFIG, action_id="act-3", description="rollback")
    assert path.read_text() == CONFIG and runs(log)[-1] == sha(CONFIG)


def test_reload_command_timeout_kills_it(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    # a shell string; its child (sleep) is in the killed process group too
    backend = FileReloadBackend(path, "echo going down >&2; sleep 30; echo never", timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(ReloadError, match=r"timed out after 0\.5s: going down") as e:
        backend.reload()
    assert time.monotonic() - started < 10 and e.value.timed_out
    missing = FileReloadBackend(path, [str(tmp_path / "no-such-command")])
    with pytest.raises(ReloadError, match="no-such-command"):
        missing.reload()


# -- git --------------------------------------------------------------------------------------


@pytest.fixture
def git_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep this machine's git configuration (signing, hooks, names) out of the tests."""
    config = tmp_path / "gitconfig"
    config.write_text("[init]\n\tdefaultBranch = main\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=Platform Team", "-c", "user.email=platform@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture
def gitops(tmp_path: Path, git_env: None) -> tuple[Path, Path]:
    """A repository with the config committed by a person, pushed to a bare remote."""
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "--quiet", "--bare", str(remote)], check=True)
    repo = tmp_path / "gitops"
    repo.mkdir()
    git(repo, "init", "--quiet")
    (repo / "litellm").mkdir()
    (repo / "litellm" / "config.yaml").write_bytes(CONFIG.encode())
    (repo / "README.md").write_text("gateway config\n")
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "gateway config")
    git(repo, "remote", "add", "origin", str(remote))
    git(repo, "push", "--quiet", "origin", "main")
    return repo, remote


def test_git_backend_commits_pushes_and_is_found_after_a_restart(
    gitops: tuple[Path, Path], reload_script: tuple[list[str], Path, Path]
) -> None:
    repo, remote = gitops
    command, log, _ = reload_script
    first = git(repo, "rev-parse", "HEAD").strip()
    backend = GitBackend(
        repo,
        "litellm/config.yaml",
        "main",
        "origin",
        ("finopsd", "finopsd@example.com"),
        reload_command=command,
    )
    assert isinstance(backend, ConfigBackend) and backend.current() == CONFIG
    new = lc.set_weights(CONFIG, "gpt-4o", SPLIT)
    change = backend.apply(
        new.new_text, action_id="act-42", description=new.description, expect=CONFIG
    )
    assert change.changed and change.pushed and change.revision
    assert runs(log) == [sha(new.new_text)]
    message = git(repo, "log", "-1", "--format=%an <%ae>%n%B")
    assert message == (
        "finopsd <finopsd@example.com>\n"
        f"finopsd: {new.description}\n\n"
        "Finopsd-Action: act-42\n"
        "Finopsd-Step: apply\n\n"
    )
    assert git(remote, "rev-parse", "main").strip() == change.revision
    assert git(repo, "status", "--porcelain") == ""
    # a restarted process: a new backend finds the commit by the action id
    restarted = GitBackend(repo, "litellm/config.yaml", "main", "origin")
    assert restarted.find_commit("act-42") == change.revision
    assert restarted.find_commit("act-42", "apply") == change.revision
    assert restarted.find_commit("act-42", "rollback") is None
    assert restarted.find_commit("act-4") is None  # a prefix is another action
    again = restarted.apply(new.new_text, action_id="act-42", description=new.description)
    assert not again.changed and again.revision == change.revision
    assert git(repo, "rev-list", "--count", "HEAD").strip() == "2"
    # rollback: a new commit with the original text, byte for byte; history is kept
    back = restarted.rollback(
        CONFIG, action_id="act-42", description="rollback: weights", expect=new.new_text
    )
    assert back.changed and back.revision != change.revision
    assert (repo / "litellm" / "config.yaml").read_bytes() == CONFIG.encode()
    assert git(repo, "show", "HEAD:litellm/config.yaml") == CONFIG
    assert git(repo, "rev-list", "HEAD").split() == [back.revision, change.revision, first]
    assert restarted.find_commit("act-42", "rollback") == back.revision
    assert restarted.find_commit("act-42") == back.revision  # the newest
    assert git(remote, "rev-parse", "main").strip() == back.revision
    assert not list(repo.rglob("*" + PREVIOUS_SUFFIX))  # git keeps the history


def test_git_backend_fast_forwards_and_refuses_what_it_must_not_touch(
    gitops: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, remote = gitops
    # someone else pushes another change first: the backend fast-forwards, then commits
    other = tmp_path / "other"
    git(tmp_path, "clone", "--quiet", str(remote), str(other))
    (other / "README.md").write_text("gateway config, reviewed\n")
    git(other, "commit", "--quiet", "-am", "readme")
    git(other, "push", "--quiet", "origin", "main")
    backend = GitBackend(repo, "litellm/config.yaml", "main", "origin")
    new = lc.enable_response_cache(CONFIG, ttl_s=300).new_text
    change = backend.apply(new, action_id="act-7", description="cache on", expect=CONFIG)
    assert (repo / "README.md").read_text() == "gateway config, reviewed\n"
    assert git(remote, "log", "-1", "--format=%s", "main").strip() == "finopsd: cache on"
    assert change.revision == git(remote, "rev-parse", "main").strip()
    # uncommitted edits of the file by a person stop a change
    path = repo / "litellm" / "config.yaml"
    path.write_text(new.replace("ttl: 300", "ttl: 5"))
    with pytest.raises(BackendError, match="uncommitted changes"):
        backend.apply(CONFIG, action_id="act-8", description="cache off")
    # the file already holding the text being applied (killed before the commit) does not
    path.write_text(CONFIG)
    resumed = backend.rollback(CONFIG, action_id="act-7", description="rollback", expect=new)
    assert resumed.changed and git(repo, "status", "--porcelain") == ""
    # another branch checked out: nothing is committed
    git(repo, "checkout", "--quiet", "-b", "experiment")
    with pytest.raises(BackendError, match="not 'main'"):
        backend.apply(new, action_id="act-9", description="cache on")
    git(repo, "checkout", "--quiet", "main")
    # a remote that diverged is not merged
    (other / "README.md").write_text("diverged\n")
    git(other, "commit", "--quiet", "-am", "diverge")
    git(other, "push", "--quiet", "--force", "origin", "main")
    with pytest.raises(BackendError, match="merge --quiet --ff-only"):
        backend.apply(new, action_id="act-10", description="cache on")


def test_git_backend_without_a_remote_or_with_a_new_one(
    gitops: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, _ = gitops
    backend = GitBackend(repo, "litellm/config.yaml")
    new = lc.set_fallbacks(CONFIG, "gpt-4o-mini", ["gpt-4o"]).new_text
    change = backend.apply(new, action_id="act-11", description="cascade")
    assert change.changed and not change.pushed and backend.current() == new
    assert backend.find_commit("act-11") == change.revision
    # an empty remote: the first push creates the branch there
    empty = tmp_path / "empty.git"
    subprocess.run(["git", "init", "--quiet", "--bare", str(empty)], check=True)
    git(repo, "remote", "add", "mirror", str(empty))
    mirrored = GitBackend(repo, "litellm/config.yaml", remote="mirror")
    assert mirrored.apply(new, action_id="act-11", description="cascade").pushed
    assert git(empty, "rev-parse", "main").strip() == change.revision
    # a remote that cannot be reached: nothing is committed
    git(repo, "remote", "add", "gone", str(tmp_path / "no-such-remote.git"))
    gone = GitBackend(repo, "litellm/config.yaml", remote="gone")
    with pytest.raises(BackendError, match="git fetch gone main"):
        gone.apply(CONFIG, action_id="act-12", description="rollback")
    assert backend.current() == new


# -- the proxy's health -----------------------------------------------------------------------


class FakeProxy:
    """LiteLLM's health and model-info endpoints, as its docs show them, on 127.0.0.1."""

    def __init__(self, master_key: str) -> None:
        self.master_key = master_key
        self.alive = True
        self.deployments: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str | None]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                proxy.requests.append((self.path, self.headers.get("Authorization")))
                if self.path in ("/health/liveliness", "/health/readiness"):
                    if not proxy.alive:
                        return self._send(503, {"detail": "starting"})
                    body: Any = (
                        "I'm alive!"
                        if self.path.endswith("liveliness")
                        else {
                            "status": "healthy",
                            "db": "Not connected",
                        }
                    )
                    return self._send(200, body)
                if self.path == "/v1/model/info":
                    if self.headers.get("Authorization") != f"Bearer {proxy.master_key}":
                        return self._send(401, {"error": {"message": "Authentication Error"}})
                    return self._send(200, {"data": proxy.deployments})
                self._send(404, {"detail": "Not Found"})

            def _send(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def serve(self, groups: dict[str, int]) -> None:
        self.deployments = [
            {
                "model_name": g,
                "litellm_params": {"model": f"openai/{g}", "weight": w},
                "model_info": {"id": f"id-{g}"},
            }
            for g, w in groups.items()
        ]


@pytest.fixture
def proxy() -> Iterator[FakeProxy]:
    p = FakeProxy("sk-test-master")
    p.thread.start()
    yield p
    p.server.shutdown()
    p.server.server_close()


def test_wait_healthy_returns_once_the_groups_are_served(proxy: FakeProxy) -> None:
    proxy.alive = False
    proxy.serve({"gpt-4o": 1})

    def restart_done() -> None:
        time.sleep(0.3)
        proxy.alive = True
        time.sleep(0.3)
        proxy.serve({"gpt-4o": 9, "gpt-4o-mini": 1})

    threading.Thread(target=restart_done, daemon=True).start()
    data = wait_healthy(
        proxy.url,
        "sk-test-master",
        {"gpt-4o", "gpt-4o-mini"},
        timeout_s=10,
        interval_s=0.05,
        check=lambda d: any(x["litellm_params"].get("weight") == 9 for x in d),
    )
    assert {d["model_name"] for d in data} == {"gpt-4o", "gpt-4o-mini"}
    paths = {p for p, _ in proxy.requests}
    assert {"/health/liveliness", "/health/readiness", "/v1/model/info"} <= paths
    assert ("/v1/model/info", "Bearer sk-test-master") in proxy.requests
    assert all(auth is None for p, auth in proxy.requests if p.startswith("/health/"))


def test_wait_healthy_says_what_is_missing(proxy: FakeProxy) -> None:
    proxy.serve({"gpt-4o": 1})
    started = time.monotonic()
    with pytest.raises(ProxyUnhealthy, match=r"within 0\.5s: model groups not served") as e:
        wait_healthy(proxy.url, "sk-test-master", {"gpt-4o", "claude-sonnet"}, 0.5, interval_s=0.05)
    assert e.value.missing == {"claude-sonnet"} and time.monotonic() - started < 5
    with pytest.raises(ProxyUnhealthy, match="refused the master key"):
        wait_healthy(proxy.url, "sk-wrong", {"gpt-4o"}, timeout_s=10)
    proxy.alive = False
    with pytest.raises(ProxyUnhealthy, match=r"GET /health/liveliness: HTTP 503"):
        wait_healthy(proxy.url, "sk-test-master", {"gpt-4o"}, timeout_s=0.3, interval_s=0.05)
    nothing = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ProxyUnhealthy, match="ConnectError"):
        wait_healthy(nothing, "sk-test-master", {"gpt-4o"}, timeout_s=0.3, interval_s=0.05)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reload_command_sees_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    out = tmp_path / "seen"
    backend = FileReloadBackend(path, f'printf %s "$FINOPSD_CONFIG_PATH" > {out}')
    result = backend.reload()
    assert result is not None and result.returncode == 0
    assert out.read_text() == str(path)
    assert os.environ.get("FINOPSD_CONFIG_PATH") is None
