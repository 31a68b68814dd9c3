"""The LiteLLM actuator under the controller, on a real config.yaml, a real reload command
and a real git repository (the proxy itself: tests/test_gateway_e2e.py).

The finding is ``test_actions``' routing finding (acme / bot / answer: big → mid);
the config's model groups are named as those models, served by ``openai/big`` and
``openai/mid``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from test_actions import BOOK, NOW, Clock, Sink, history, serve

from finopsd.actions.base import PlanContext
from finopsd.actions.controller import Controller
from finopsd.actions.gateway import backends, litellm_config
from finopsd.actions.gateway.actuator import LiteLLMActuator
from finopsd.actions.lifecycle import State
from finopsd.analyzers.base import ActionSpec
from finopsd.config import ActionsSettings
from finopsd.store import Store

CONFIG = """\
# the platform team's gateway
model_list:
  - model_name: big  # what bot asks for
    litellm_params:
      model: openai/big
      api_base: http://127.0.0.1:9/v1   # unused here
      api_key: os.environ/UPSTREAM_KEY
  - model_name: mid
    litellm_params:
      model: openai/mid
      api_base: http://127.0.0.1:9/v1
      api_key: os.environ/UPSTREAM_KEY

router_settings:
  routing_strategy: simple-shuffle  # weights apply under this strategy

litellm_settings:
  drop_params: true
"""

RELOAD = """\
import os, sys
with open(sys.argv[1], "a") as f:
    f.write(open(os.environ["FINOPSD_CONFIG_PATH"]).read().count("weight:").__str__() + "\\n")
if os.path.exists(sys.argv[1] + ".fail"):
    sys.exit("reload refused: the proxy did not start")
"""


def settings(**policy: Any) -> ActionsSettings:
    rule = {"mode": "auto", "max_share_step": 0.5, "max_steps_per_day": 10, **policy}
    return ActionsSettings.model_validate(
        {"policy": {"gateway.route": rule}, "verify": {"canary_share": 0.1, "min_requests": 50}}
    )


def weights_file(config: Path, out: Path) -> None:
    """What the proxy would route by: the scope group's shares, for ``serve``."""
    shares = litellm_config.read_state(config.read_text()).shares("big") or {}
    out.write_text(json.dumps({m.split("/", 1)[1]: s for m, s in shares.items()}))


@pytest.fixture
def gateway(tmp_path: Path) -> tuple[Path, Path, LiteLLMActuator]:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    script = tmp_path / "reload.py"
    script.write_text(RELOAD)
    reloads = tmp_path / "reloads.log"
    backend = backends.FileReloadBackend(config, [sys.executable, str(script), str(reloads)])
    return config, reloads, LiteLLMActuator(backend)


def test_a_reroute_edits_the_config_step_by_step_and_rolls_back_byte_for_byte(
    tmp_path: Path, gateway: tuple[Path, Path, LiteLLMActuator]
) -> None:
    config, reloads, actuator = gateway
    routes = tmp_path / "routes.json"
    clock = Clock(NOW)
    with Store(tmp_path / "s.duckdb") as store:
        history(store)
        c = Controller(
            store, settings(), BOOK, {"gateway.route": actuator}, events=Sink(), clock=clock
        )
        c.tick()
        (action,) = c.list()
        assert action["state"] == State.CANARY, action["reason"]
        state = litellm_config.read_state(config.read_text())
        assert state.shares("big") == pytest.approx({"openai/big": 0.9, "openai/mid": 0.1})
        assert "# the platform team's gateway" in config.read_text()
        assert "# what bot asks for" in config.read_text()
        plan = json.loads(action["plan"])
        assert "weight: 9" in plan["diff"] and "weight: 1" in plan["diff"]
        assert reloads.read_text().splitlines() == ["2"]  # one reload, two weights
        assert Path(str(config) + ".finopsd-prev").read_text() == CONFIG
        weights_file(config, routes)
        clock.now += timedelta(minutes=1)
        serve(store, routes, 500, clock.now, mid_quality=0.88, tag="g1-")
        clock.now += timedelta(minutes=500)
        c.tick()
        action = c.get(action["id"])
        assert action["share"] == pytest.approx(0.6)
        state = litellm_config.read_state(config.read_text())
        assert state.shares("big") == pytest.approx({"openai/big": 0.4, "openai/mid": 0.6})
        weights_file(config, routes)
        clock.now += timedelta(minutes=1)
        serve(store, routes, 500, clock.now, mid_quality=0.55, tag="g2-")  # worse now
        clock.now += timedelta(minutes=500)
        c.tick()
        action = c.get(action["id"])
        assert action["state"] == State.ROLLED_BACK, action["reason"]
        assert "quality" in action["reason"]
        assert config.read_text() == CONFIG  # the original, byte for byte
        assert len(reloads.read_text().splitlines()) == 3  # two steps, one rollback


def test_a_failing_reload_rolls_back_and_names_the_command(
    tmp_path: Path, gateway: tuple[Path, Path, LiteLLMActuator]
) -> None:
    config, reloads, actuator = gateway
    Path(str(reloads) + ".fail").write_text("")
    with Store(tmp_path / "s.duckdb") as store:
        history(store)
        c = Controller(store, settings(), BOOK, {"gateway.route": actuator}, clock=Clock(NOW))
        c.tick()
        (action,) = c.list()
    assert action["state"] == State.FAILED, action["reason"]
    assert "reload refused" in action["reason"] and "reload.py" in action["reason"]
    assert config.read_text() == CONFIG  # written back, though its reload failed too


def test_a_scope_that_is_not_all_of_its_model_group_stays_a_suggestion(
    tmp_path: Path, gateway: tuple[Path, Path, LiteLLMActuator]
) -> None:
    config, _reloads, actuator = gateway
    spec = ActionSpec(
        "gateway.route",
        {"match": {"tenant": "acme", "app": "bot", "model": "big"}, "weights": {"mid": 1.0}},
    )
    shared = PlanContext("f1", {"tenant": "acme", "app": "bot"}, {}, scope_share=lambda m: 0.4)
    plan = actuator.plan(spec, 0.1, shared)
    assert not plan.expressible and "only 40% of the recent requests" in plan.reason
    alone = PlanContext("f1", {"tenant": "acme", "app": "bot"}, {}, scope_share=lambda m: 1.0)
    assert actuator.plan(spec, 0.1, alone).expressible
    cascade = ActionSpec(
        "gateway.cascade",
        {
            "match": {"model": "big"},
            "first": "mid",
            "escalate_to": "big",
            "quality_threshold": 0.85,
        },
    )
    plan = actuator.plan(cascade, None, alone)
    assert not plan.expressible and "escalate on errors, not on a low quality" in plan.reason
    cache = ActionSpec("gateway.cache", {"mode": "response", "ttl_s": 600, "scope": {}})
    plan = actuator.plan(cache, None, alone)
    assert plan.expressible and "cache" in plan.diff
    assert config.read_text() == CONFIG  # planning changes nothing


def test_the_git_backend_commits_each_step_and_a_rollback_is_a_new_commit(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "gitops"
    repo.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
        ).stdout

    git("init", "-q", "-b", "main")
    (repo / "litellm").mkdir()
    (repo / "litellm" / "config.yaml").write_text(CONFIG)
    git("add", ".")
    git("-c", "user.name=ops", "-c", "user.email=ops@example.com", "commit", "-qm", "init")
    backend = backends.GitBackend(repo, "litellm/config.yaml", branch="main")
    actuator = LiteLLMActuator(backend)
    with Store(tmp_path / "s.duckdb") as store:
        history(store)
        c = Controller(store, settings(), BOOK, {"gateway.route": actuator}, clock=Clock(NOW))
        c.tick()
        (action,) = c.list()
        assert action["state"] == State.CANARY
        assert backend.find_commit(action["id"]) is not None
        c.rollback(action["id"], "alice", "not now")
    log = git("log", "--format=%s%n%b")
    assert log.count(f"Finopsd-Action: {action['id']}") == 2
    assert "Finopsd-Step: rollback" in log
    assert (repo / "litellm" / "config.yaml").read_text() == CONFIG
    assert len(git("rev-list", "HEAD").split()) == 3  # init, apply, rollback
