"""Settings: config.toml, then environment overrides, validated with pydantic.

Every key has a default, so an empty file is a valid configuration (the
embedded default). An environment variable ``FINOPSD_<SECTION>__<KEY>``
overrides ``[section] key``, e.g. ``FINOPSD_KAFKA__BOOTSTRAP_SERVERS``.
Relative paths are resolved against the directory of the config file.

``load_settings`` raises ``ConfigError`` whose message names the key (or the
environment variable) and says what is wrong; it never shows a traceback.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

ENV_PREFIX = "FINOPSD_"
INT32_MAX = (1 << 31) - 1  # Kafka's request fields (fetch sizes, rebalance timeout) are int32
DEFAULT_CONFIG = Path("config.toml")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the reason."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = Field(
        "embedded", min_length=1, description='"embedded", or host:port[,host:port...]'
    )
    group_id: str = Field("finopsd", min_length=1)
    client_id: str = Field("finopsd", min_length=1)
    usage_topic: str = Field("llm.usage", min_length=1)
    gpu_topic: str = Field("gpu.metrics", min_length=1)
    dead_letter_topic: str = Field("finopsd.dead-letters", min_length=1)
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout_ms: int = Field(10_000, ge=1_000, le=600_000)
    heartbeat_interval_ms: int = Field(3_000, ge=100, le=600_000)
    max_poll_interval_ms: int = Field(300_000, ge=1_000, le=INT32_MAX)
    request_timeout_ms: int = Field(30_000, ge=1_000, le=300_000)
    max_poll_records: int = Field(10_000, ge=1, le=INT32_MAX)
    fetch_max_bytes: int = Field(64 << 20, ge=1 << 10, le=INT32_MAX)
    max_partition_fetch_bytes: int = Field(16 << 20, ge=1 << 10, le=INT32_MAX)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    sasl_password_file: Path | None = None
    ssl_cafile: Path | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, value: str) -> str:
        """ "embedded", or a comma-separated list of host:port."""
        if value == "embedded":
            return value
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            host = host.strip("[]")  # [::1]:9092
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(
                    f'{server.strip()!r} is not host:port; expected "embedded" or '
                    '"host:port[,host:port...]"'
                )
            if any(c.isspace() for c in host) or "/" in host:
                raise ValueError(f"{host!r} is not a host name or address")
        return value

    @field_validator("heartbeat_interval_ms")
    @classmethod
    def _below_session_timeout(cls, value: int, info: ValidationInfo) -> int:
        """kafka-python refuses a heartbeat interval that is not below the session timeout."""
        session = info.data.get("session_timeout_ms")  # absent when invalid itself
        if session is not None and value >= session:
            raise ValueError(
                f"must be below kafka.session_timeout_ms ({session}); a third of it is usual"
            )
        return value

    @model_validator(mode="after")
    def _sasl(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ValueError("sasl_mechanism is required when security_protocol is SASL_*")
        if self.sasl_password and self.sasl_password_file:
            raise ValueError("set sasl_password or sasl_password_file, not both")
        return self

    @property
    def embedded(self) -> bool:
        return self.bootstrap_servers == "embedded"

    def password(self) -> str | None:
        """The SASL password, from the environment/config or from its file."""
        if self.sasl_password is not None:
            return self.sasl_password.get_secret_value()
        if self.sasl_password_file is not None:
            return self.sasl_password_file.read_text().strip()
        return None

    def client_config(self) -> dict[str, Any]:
        """Connection settings shared by kafka-python consumers, producers and admin clients."""
        config: dict[str, Any] = {
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.sasl_mechanism:
            config["sasl_mechanism"] = self.sasl_mechanism
            config["sasl_plain_username"] = self.sasl_username
            config["sasl_plain_password"] = self.password()
        if self.ssl_cafile:
            config["ssl_cafile"] = str(self.ssl_cafile)
        return config


class EmbeddedBrokerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(19092, ge=0, le=65535, description="0 picks a free port")
    partitions: int = Field(4, ge=1, le=1024, description="partitions of each topic it creates")
    log_file: Path | None = None


def _known_format(name: str) -> str:
    """A name from the input-format registry (``finopsd.ingest.formats.FORMATS``)."""
    from finopsd.ingest.formats import UnknownFormatError, check_format

    try:
        return check_format(name)
    except UnknownFormatError as exc:
        raise ValueError(str(exc)) from None


class IngestSettings(_Section):
    batch_max_events: int = Field(131_072, ge=1, le=10_000_000)
    batch_max_age_ms: int = Field(1_000, ge=1, le=3_600_000)
    max_record_bytes: int = Field(1 << 20, ge=256, le=1 << 30)
    queue_chunks: int = Field(8, ge=1, le=1024)
    queue_bytes: int = Field(64 << 20, ge=1 << 20, le=1 << 40)
    dedup_window_hours: float = Field(1, ge=0, le=24 * 366)
    max_future_skew_s: float = Field(86_400, ge=0, le=366 * 86_400)
    formats: dict[str, Annotated[str, AfterValidator(_known_format)]] = Field(
        {},
        description="topic -> input format of its usage events; unlisted topics are native",
    )

    @field_validator("formats", mode="before")
    @classmethod
    def _formats_from_json(cls, value: Any) -> Any:
        """The environment gives a string: FINOPSD_INGEST__FORMATS='{"topic": "otlp_json"}'."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError(
                    'expected a JSON object, e.g. {"otlp_spans": "otlp_json"}'
                ) from None
        return value


class StoreSettings(_Section):
    path: Path = Path("data/finopsd.duckdb")
    threads: int | None = Field(None, ge=1, le=1024)
    daemon_threads: int = Field(1, ge=1, le=1024)
    vacuum_tasks: int = Field(0, ge=0, le=INT32_MAX)
    memory_limit: str | None = Field(
        "128MiB",
        pattern=r"^(\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB))?$",
        description='DuckDB memory_limit; "" lets DuckDB decide',
    )


class AnalyzersSettings(_Section):
    """``[analyzers]``, plus one ``[analyzers.<name>]`` table of options per analyzer."""

    model_config = ConfigDict(extra="allow", validate_default=True)

    interval_minutes: float = Field(
        60, gt=0, le=366 * 24 * 60, description="how often the daemon runs them"
    )
    window_days: float = Field(30, gt=0, le=366, description="how far back each run looks")
    min_evidence_hours: float = Field(
        24,
        ge=0,
        le=366 * 24,
        description="a finding whose traffic spans less is provisional: shown, never acted on",
    )
    first_run_delay_s: float = Field(
        60, ge=0, le=86_400, description="after daemon start, before the first runs"
    )

    @model_validator(mode="after")
    def _options(self) -> AnalyzersSettings:
        extra = self.model_extra or {}
        for name, table in extra.items():
            if not isinstance(table, dict):
                raise ValueError(f"{name}: expected a table [analyzers.{name}] of options")
        if extra:
            from finopsd.analyzers.runner import build

            build(self.options())  # raises naming the unknown analyzer or option
        return self

    def options(self) -> dict[str, dict[str, Any]]:
        """Options by analyzer name, from the ``[analyzers.<name>]`` tables."""
        return {k: dict(v) for k, v in (self.model_extra or {}).items()}


class ApiSettings(_Section):
    """``[api]``: the HTTP API the daemon serves (and the CLI talks to while it runs)."""

    enabled: bool = True
    host: str = Field("127.0.0.1", min_length=1, description="the address to listen on")
    port: int = Field(8787, ge=0, le=65535, description="0: any free port (logged)")
    token: SecretStr | None = Field(None, description="the bearer token; prefer token_file")
    token_file: Path | None = Field(
        None,
        description="a file holding the bearer token; unset and no token: the daemon makes "
        "one in <store.path>.api-token (mode 0600) for the CLI on the same machine",
    )
    public_reads: bool = Field(False, description="GET endpoints without a token")
    ready_max_lag: int = Field(
        100_000, ge=0, le=10**15, description="/readyz fails while the consumer lag is above this"
    )

    @model_validator(mode="after")
    def _one_token(self) -> ApiSettings:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set token or token_file, not both")
        if self.token is not None and len(self.token.get_secret_value().strip()) < 16:
            raise ValueError("token: at least 16 characters")
        return self

    def token_path(self, store_path: Path) -> Path:
        """Where the token is read from: ``token_file``, else the daemon's own file."""
        return self.token_file or store_path.with_name(store_path.name + ".api-token")


ActionMode = Literal["off", "suggest", "approve", "auto"]
ACTION_KINDS = (
    "gateway.cache",
    "gateway.route",
    "gateway.cascade",
    "gateway.max_tokens",
    "gateway.rate_limit",
    "provider.batch",
    "finetune",
    "vllm.quantize",
    "vllm.scale",
    "vllm.prefix_caching",
)
"""Every ActionSpec kind the analyzers emit (``[actions.policy.<kind>]`` keys)."""


class PolicyRule(_Section):
    """One ``[actions.policy.<kind>]`` table; an unset key takes ``[actions.policy.default]``'s."""

    mode: ActionMode | None = Field(
        None, description="off | suggest (shown only) | approve (a person approves) | auto"
    )
    min_confidence: float | None = Field(None, ge=0, le=1)
    min_monthly_usd: float | None = Field(None, ge=0, description="smaller findings: ignored")
    max_auto_monthly_usd: float | None = Field(
        None, ge=0, description="auto mode: a larger projected saving asks for approval first"
    )
    max_share_step: float | None = Field(
        None, gt=0, le=1, description="the largest share of a scope's traffic moved per step"
    )
    max_steps_per_day: int | None = Field(None, ge=1, le=1000)
    max_actions_per_day: int | None = Field(None, ge=0, le=10_000)
    tenants: dict[str, ActionMode] = Field(
        default_factory=dict, description="tenant -> mode, over this table's mode"
    )


DEFAULT_POLICY = PolicyRule(
    mode="suggest",
    min_confidence=0.5,
    min_monthly_usd=10.0,
    max_auto_monthly_usd=1000.0,
    max_share_step=0.25,
    max_steps_per_day=4,
    max_actions_per_day=5,
)


class VerifySettings(_Section):
    """``[actions.verify]``: canary steps and the regression tests that judge them."""

    canary_share: float = Field(0.1, gt=0, le=1, description="traffic moved by the first step")
    min_requests: int = Field(200, ge=10, le=10**9, description="touched requests before a verdict")
    confidence: float = Field(0.95, ge=0.5, lt=1, description="of each one-sided regression test")
    max_error_rate_increase: float = Field(0.01, ge=0, le=1, description="absolute, tolerated")
    max_p95_latency_increase: float = Field(0.25, ge=0, le=100, description="relative, tolerated")
    max_quality_drop: float = Field(0.02, ge=0, le=1, description="absolute, tolerated")
    max_cost_increase: float = Field(0.05, ge=0, le=100, description="per request, relative")
    baseline_hours: float = Field(168, gt=0, le=24 * 366, description="traffic 'before' looked at")
    max_wait_hours: float = Field(
        72, gt=0, le=24 * 366, description="a step without min_requests by then is rolled back"
    )


class GatewaySettings(_Section):
    """``[actions.gateway]``: the LiteLLM proxy whose config.yaml finopsd edits."""

    config_path: Path | None = Field(None, description="the proxy's config.yaml; unset: no gateway")
    backend: Literal["file", "git"] = "file"
    reload_command: list[str] | None = Field(
        None, description='run after writing, e.g. ["systemctl", "restart", "litellm"]'
    )
    reload_timeout_s: float = Field(120, gt=0, le=3600)
    git_repo: Path | None = Field(None, description="backend = git: the repository's work tree")
    git_branch: str = Field("main", min_length=1)
    git_remote: str | None = Field(None, description="pushed to after each commit when set")
    proxy_url: str | None = Field(None, description="e.g. http://127.0.0.1:4000 (health checks)")
    master_key_file: Path | None = Field(None, description="else $LITELLM_MASTER_KEY")
    health_timeout_s: float = Field(120, gt=0, le=3600)


class CommandSettings(_Section):
    """``[actions.command]``: changes an external controller makes (Kafka command events)."""

    topic: str = Field("finopsd.commands", min_length=1)
    ack_topic: str = Field("finopsd.command-acks", min_length=1)
    timeout_s: float = Field(86_400, gt=0, le=366 * 86_400, description="no ack by then: failed")
    kinds: list[str] = Field(
        default_factory=list, description="ActionSpec kinds sent as commands (e.g. provider.batch)"
    )

    @field_validator("kinds")
    @classmethod
    def _known(cls, kinds: list[str]) -> list[str]:
        for kind in kinds:
            if kind not in ACTION_KINDS:
                raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(ACTION_KINDS)}")
        return kinds


class ActionsSettings(_Section):
    """``[actions]``: the controller, its policy, verification and actuators."""

    enabled: bool = Field(True, description="the controller runs in the daemon")
    dry_run: bool = Field(
        False, description="kill switch: plan and record, change nothing (rollbacks still run)"
    )
    interval_s: float = Field(60, ge=1, le=86_400, description="how often the controller ticks")
    approval_expiry_hours: float = Field(72, gt=0, le=24 * 366)
    topic: str = Field("finopsd.actions", min_length=1, description="every transition, as JSON")
    policy: dict[str, PolicyRule] = Field(default_factory=dict)
    verify: VerifySettings = VerifySettings()
    gateway: GatewaySettings = GatewaySettings()
    command: CommandSettings = CommandSettings()

    @field_validator("policy")
    @classmethod
    def _policy_kinds(cls, policy: dict[str, PolicyRule]) -> dict[str, PolicyRule]:
        for kind in policy:
            if kind != "default" and kind not in ACTION_KINDS:
                hint = _suggest(kind, ACTION_KINDS)
                raise ValueError(
                    f"unknown actuator kind {kind!r}{hint}; "
                    f"valid: default, {', '.join(ACTION_KINDS)}"
                )
        return policy

    def rule(self, kind: str, tenant: str | None = None) -> PolicyRule:
        """The effective rule for ``kind`` (and ``tenant``): kind's keys over default's."""
        merged = DEFAULT_POLICY.model_dump()
        for layer in (self.policy.get("default"), self.policy.get(kind)):
            if layer is not None:
                merged.update({k: v for k, v in layer.model_dump().items() if v not in (None, {})})
        tenants = dict((self.policy.get("default") or DEFAULT_POLICY).tenants)
        tenants.update((self.policy.get(kind) or DEFAULT_POLICY).tenants)
        if tenant is not None and tenant in tenants:
            merged["mode"] = tenants[tenant]
        merged["tenants"] = tenants
        return PolicyRule.model_validate(merged)


SLACK_USER_ID = re.compile(r"^[UW][A-Z0-9]{2,20}$")
"""A Slack user id: ``U…`` (a workspace's) or ``W…`` (an Enterprise Grid org's)."""
SLACK_POST_STATES = (
    "awaiting_approval",
    "approved",
    "rejected",
    "expired",
    "canary",
    "promoted",
    "verified",
    "rolled_back",
    "failed",
)


def _list_from_env(value: Any) -> Any:
    """The environment gives a string: a JSON array, or names separated by commas."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                raise ValueError('expected a JSON array, e.g. ["U024BE7LH"]') from None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class SlackSettings(_Section):
    """``[slack]``: actions announced in a Slack channel, approved or rejected there."""

    enabled: bool = Field(False, description="post actions to Slack and take approvals from it")
    webhook_url: SecretStr | None = Field(
        None, description="the incoming webhook's URL (FINOPSD_SLACK__WEBHOOK_URL); or a file"
    )
    webhook_url_file: Path | None = Field(None, description="a file holding the webhook's URL")
    signing_secret: SecretStr | None = Field(
        None, description="the app's signing secret (FINOPSD_SLACK__SIGNING_SECRET); or a file"
    )
    signing_secret_file: Path | None = Field(None, description="a file holding the secret")
    approvers: list[str] = Field(
        default_factory=list, description="Slack user ids (U…, W…) who may approve or reject"
    )
    api_base_url: str | None = Field(
        None, description="the API as people reach it, for links (e.g. https://finopsd.example)"
    )
    post_states: list[str] = Field(
        default_factory=lambda: list(SLACK_POST_STATES),
        description="the states whose transitions are posted (awaiting_approval: the approval)",
    )
    timeout_s: float = Field(10, gt=0, le=120, description="each request to Slack")

    @field_validator("approvers", "post_states", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        """FINOPSD_SLACK__APPROVERS='U024BE7LH,W0123ABCD' (or a JSON array)."""
        return _list_from_env(value)

    @field_validator("approvers")
    @classmethod
    def _user_ids(cls, approvers: list[str]) -> list[str]:
        for user in approvers:
            if not SLACK_USER_ID.match(user):
                raise ValueError(
                    f"{user!r} is not a Slack user id (U… or W…, as in a profile's "
                    '"Copy member ID"), e.g. U024BE7LH'
                )
        return approvers

    @field_validator("post_states")
    @classmethod
    def _states(cls, states: list[str]) -> list[str]:
        from finopsd.actions.lifecycle import State

        known = [s.value for s in State]
        for state in states:
            if state not in known:
                raise ValueError(f"unknown state {state!r}{_suggest(state, known)}")
        return states

    @field_validator("api_base_url")
    @classmethod
    def _base_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        if not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?$", url):
            raise ValueError("expected an http(s) URL without query, e.g. https://finopsd.example")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _sources(self) -> SlackSettings:
        for key in ("webhook_url", "signing_secret"):
            if getattr(self, key) is not None and getattr(self, f"{key}_file") is not None:
                raise ValueError(f"set {key} or {key}_file, not both")
        if not self.enabled:
            return self
        for key in ("webhook_url", "signing_secret"):
            if getattr(self, key) is None and getattr(self, f"{key}_file") is None:
                env = f"{ENV_PREFIX}SLACK__{key.upper()}"
                raise ValueError(f"enabled: needs {key}_file or {key} ({env})")
        if not self.approvers:
            raise ValueError("enabled: approvers is empty; no one could approve from Slack")
        return self

    def webhook_url_value(self) -> str | None:
        """The incoming webhook's URL (from the environment/config, else its file)."""
        return _secret(self.webhook_url, self.webhook_url_file)

    def signing_secret_value(self) -> str | None:
        """The signing secret (from the environment/config, else its file)."""
        return _secret(self.signing_secret, self.signing_secret_file)


def _secret(value: SecretStr | None, file: Path | None) -> str | None:
    if value is not None:
        return value.get_secret_value().strip() or None
    if file is not None:
        return file.read_text().strip() or None
    return None


class ReportsSettings(_Section):
    """``[reports]``: the weekly savings report, written (and announced) on a schedule."""

    enabled: bool = Field(True, description="write the last complete week's report weekly")
    weekday: Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"] = "mon"
    hour: int = Field(7, ge=0, le=23, description="UTC")
    out_dir: Path | None = Field(
        None, description="where the files go; unset: <store.path's directory>/reports"
    )
    topic: str = Field("finopsd.reports", min_length=1, description="each report, as JSON")
    slack_summary: bool = Field(True, description="post the headline numbers (with [slack])")

    def directory(self, store_path: Path) -> Path:
        return self.out_dir or store_path.parent / "reports"


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class PriceEntry(_Section):
    """One list price, as ``[[pricing.prices]]``; replaces the catalog's entry for the same
    provider, model and date."""

    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)
    effective_from: date
    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cached_input_per_mtok: float | None = Field(None, ge=0)
    cache_write_per_mtok: float | None = Field(None, ge=0)
    batch_discount: float = Field(0.0, ge=0, le=1)
    currency: Literal["USD"] = "USD"


class DeploymentEntry(_Section):
    """A self-hosted deployment, as ``[[pricing.deployments]]``."""

    name: str = Field(min_length=1, description="what usage events carry as `deployment`")
    gpu_type: str = Field(min_length=1)
    gpus: int = Field(ge=1, le=100_000)
    gpu_hour_usd: float | None = Field(None, ge=0, description="overrides pricing.gpu_hour_usd")


class PricingSettings(_Section):
    catalog: Path | None = Field(None, description="a prices CSV replacing the shipped catalog")
    prices: list[PriceEntry] = []
    gpu_hour_usd: dict[str, float] = {}
    deployments: list[DeploymentEntry] = []
    disagreement_tolerance: float = Field(0.01, ge=0, le=1)
    settle_interval_s: float = Field(300, ge=1, le=86_400)

    @model_validator(mode="after")
    def _deployments(self) -> PricingSettings:
        for rate_type, rate in self.gpu_hour_usd.items():
            if not rate >= 0:
                raise ValueError(f"gpu_hour_usd.{rate_type} must be >= 0")
        names = [d.name for d in self.deployments]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"deployment {name!r} is listed more than once")
        for i, d in enumerate(self.deployments):
            if d.gpu_hour_usd is None and d.gpu_type not in self.gpu_hour_usd:
                known = ", ".join(sorted(self.gpu_hour_usd)) or "none"
                raise ValueError(
                    f"deployments[{i}] ({d.name}): no price for GPU type {d.gpu_type!r}; set "
                    f"pricing.gpu_hour_usd.{d.gpu_type} or pricing.deployments[{i}].gpu_hour_usd"
                    f" (priced types: {known})"
                )
        return self


class Settings(_Section):
    kafka: KafkaSettings = KafkaSettings()
    embedded_broker: EmbeddedBrokerSettings = EmbeddedBrokerSettings()
    ingest: IngestSettings = IngestSettings()
    store: StoreSettings = StoreSettings()
    pricing: PricingSettings = PricingSettings()
    analyzers: AnalyzersSettings = AnalyzersSettings()
    api: ApiSettings = ApiSettings()
    actions: ActionsSettings = ActionsSettings()
    reports: ReportsSettings = ReportsSettings()
    slack: SlackSettings = SlackSettings()
    log: LogSettings = LogSettings()

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data, secrets shown as '**********'."""
        return self.model_dump(mode="json")


def _env_overrides(env: Mapping[str, str], sections: Mapping[str, type[BaseModel]]) -> dict:
    overrides: dict[str, dict[str, str]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == f"{ENV_PREFIX}CONFIG":
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        section, sep, key = rest.partition("__")
        if not sep or section not in sections:
            continue  # not a settings override (e.g. FINOPSD_TANSU_BIN)
        if key not in sections[section].model_fields:
            hint = _suggest(key, sections[section].model_fields)
            raise ConfigError(f"environment variable {name}: unknown key {section}.{key}{hint}")
        overrides.setdefault(section, {})[key] = value
    return overrides


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _member_type(owner: Any, part: str | None) -> Any:
    """The settings model at ``owner.part`` (a field, or a value of a ``dict[str, Model]``);
    with ``part`` None, ``owner`` itself as a model (``Model | None`` unwrapped)."""
    if part is None:
        if isinstance(owner, type) and issubclass(owner, BaseModel):
            return owner
        if typing.get_origin(owner) is dict:
            return owner
        for arg in typing.get_args(owner):  # Model | None
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
        return None
    if isinstance(owner, type) and issubclass(owner, BaseModel):
        field = owner.model_fields.get(part)
        return _member_type(field.annotation, None) if field else None
    if typing.get_origin(owner) is dict:
        return _member_type(typing.get_args(owner)[1], None)
    return None


def _secret_key(key: str) -> bool:
    """A key whose value is never shown in an error: a password, secret, token or webhook URL."""
    if key.endswith("_file"):
        return False
    return any(word in key for word in ("password", "secret", "token", "webhook_url"))


def _format(error: ValidationError, data: Mapping[str, Any], origin: Mapping[tuple, str]) -> str:
    lines = []
    for err in error.errors(include_url=False):
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc)
        where = origin.get(loc[:2], "")
        if err["type"] == "extra_forbidden":
            section_model: Any = Settings
            for part in loc[:-1]:
                section_model = _member_type(section_model, part)
                if section_model is None:
                    break
            choices = section_model.model_fields if section_model else Settings.model_fields
            lines.append(f"{key}: unknown key{_suggest(loc[-1], choices)}{where}")
            continue
        value = data
        for part in loc:
            value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, Mapping):
            value = {k: "**********" if _secret_key(k) else v for k, v in value.items()}
        shown = "" if value is None or _secret_key(loc[-1]) else f" (got {value!r})"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {msg}{shown}{where}")
    return "\n".join(lines)


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (default: $FINOPSD_CONFIG, else ./config.toml if present), apply env."""
    env = os.environ if env is None else env
    if path is None and env.get(f"{ENV_PREFIX}CONFIG"):
        path = Path(env[f"{ENV_PREFIX}CONFIG"])
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            line = Path(path).read_bytes()[: exc.start].count(b"\n") + 1
            raise ConfigError(
                f"{path}: line {line}: not valid UTF-8 (byte {exc.object[exc.start]:#04x})"
            ) from None
        base = Path(path).resolve().parent
    sections = {name: f.annotation for name, f in Settings.model_fields.items()}
    origin: dict[tuple, str] = {}
    for section, values in _env_overrides(env, sections).items():  # type: ignore[arg-type]
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: must be a table ([{section}])")
        for key, value in values.items():
            target[key] = value
            origin[(section, key)] = f" [from {ENV_PREFIX}{section.upper()}__{key.upper()}]"
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        prefix = f"{path}: " if path is not None else ""
        raise ConfigError(
            prefix + _format(exc, data, origin).replace("\n", "\n" + prefix)
        ) from None
    settings = _resolve_paths(settings, base)
    _check_format_topics(settings, f"{path}: " if path is not None else "")
    _check_files(settings, f"{path}: " if path is not None else "")
    from finopsd.pricing import PriceBook, PricingError

    try:
        PriceBook.from_settings(settings.pricing)
    except PricingError as exc:
        prefix = f"{path}: " if path is not None else ""
        raise ConfigError(f"{prefix}pricing: {exc}") from None
    return settings


def _check_files(settings: Settings, prefix: str) -> None:
    """Files the daemon reads or writes at start, checked before it connects anywhere."""
    k = settings.kafka
    for key, file in (("sasl_password_file", k.sasl_password_file), ("ssl_cafile", k.ssl_cafile)):
        if file is None:
            continue
        try:
            with open(file, "rb") as f:
                text = f.read().decode() if key == "sasl_password_file" else None
        except OSError as exc:
            raise ConfigError(f"{prefix}kafka.{key}: cannot read {file}: {exc.strerror}") from None
        except UnicodeDecodeError:  # the message would show the bytes: never a secret's
            raise ConfigError(f"{prefix}kafka.{key}: {file} is not UTF-8 text") from None
        if text is not None and not text.strip():
            raise ConfigError(f"{prefix}kafka.{key}: {file} is empty")
    _check_writable(settings.store.path, "store.path", "the store's file", prefix)
    if settings.reports.enabled:
        out = settings.reports.directory(settings.store.path)
        _check_writable(out / "report.html", "reports.out_dir", "a directory", prefix)
    _check_api(settings, prefix)
    _check_gateway(settings, prefix)
    _check_slack(settings, prefix)
    log_file = settings.embedded_broker.log_file
    if k.embedded and log_file is not None:
        _check_writable(log_file, "embedded_broker.log_file", "a file", prefix)


def _check_api(settings: Settings, prefix: str) -> None:
    """The API's token file is readable and long enough; the address can be listened on."""
    api = settings.api
    if not api.enabled:
        return
    if api.token_file is not None:
        try:
            text = api.token_file.read_bytes().decode()
        except OSError as exc:
            raise ConfigError(
                f"{prefix}api.token_file: cannot read {api.token_file}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(
                f"{prefix}api.token_file: {api.token_file} is not UTF-8 text"
            ) from None
        if len(text.strip()) < 16:
            raise ConfigError(
                f"{prefix}api.token_file: {api.token_file} holds fewer than 16 characters"
            )
    import socket

    try:
        infos = socket.getaddrinfo(api.host, api.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(
            f"{prefix}api.host: cannot resolve {api.host!r}: {exc.strerror}"
        ) from None
    if not infos:
        raise ConfigError(f"{prefix}api.host: {api.host!r} has no address")


def _check_gateway(settings: Settings, prefix: str) -> None:
    """The gateway the controller would change exists, and so does what makes it live."""
    import shutil

    g = settings.actions.gateway
    if g.config_path is None:
        return
    key = f"{prefix}actions.gateway"
    if not g.config_path.is_file():
        raise ConfigError(f"{key}.config_path: {g.config_path} is not a file")
    if not os.access(g.config_path, os.R_OK | os.W_OK):
        raise ConfigError(f"{key}.config_path: cannot read and write {g.config_path}")
    if g.backend == "file" and not g.reload_command:
        raise ConfigError(
            f'{key}.reload_command: needed with backend = "file" (LiteLLM reads its '
            'config.yaml only when it starts), e.g. ["systemctl", "restart", "litellm"]'
        )
    if g.reload_command and shutil.which(g.reload_command[0]) is None:
        raise ConfigError(f"{key}.reload_command: {g.reload_command[0]!r} is not an executable")
    if g.backend == "git":
        if g.git_repo is None:
            raise ConfigError(f'{key}.git_repo: needed with backend = "git"')
        if not (g.git_repo / ".git").exists():
            raise ConfigError(f"{key}.git_repo: {g.git_repo} is not a git work tree")
        try:
            g.config_path.resolve().relative_to(g.git_repo.resolve())
        except ValueError:
            raise ConfigError(
                f"{key}.config_path: {g.config_path} is not inside git_repo {g.git_repo}"
            ) from None
    if g.master_key_file is not None:
        try:
            if not g.master_key_file.read_text().strip():
                raise ConfigError(f"{key}.master_key_file: {g.master_key_file} is empty")
        except OSError as exc:
            raise ConfigError(
                f"{key}.master_key_file: cannot read {g.master_key_file}: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{key}.master_key_file: {g.master_key_file} is not UTF-8") from None


def _check_slack(settings: Settings, prefix: str) -> None:
    """Slack's files are readable and hold a URL and a secret (neither is ever shown)."""
    from urllib.parse import urlsplit

    sl = settings.slack
    if not sl.enabled:
        return
    if not settings.api.enabled:
        raise ConfigError(
            f"{prefix}slack.enabled: needs api.enabled (Slack's clicks come to the API's "
            "POST /v1/slack/interactions)"
        )
    for key in ("webhook_url_file", "signing_secret_file"):
        file = getattr(sl, key)
        if file is None:
            continue
        try:
            text = Path(file).read_bytes().decode()
        except OSError as exc:
            raise ConfigError(f"{prefix}slack.{key}: cannot read {file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{prefix}slack.{key}: {file} is not UTF-8 text") from None
        if not text.strip():
            raise ConfigError(f"{prefix}slack.{key}: {file} is empty")
    url = sl.webhook_url_value() or ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c.isspace() for c in url):
        where = "webhook_url_file" if sl.webhook_url_file is not None else "webhook_url"
        raise ConfigError(
            f"{prefix}slack.{where}: not an http(s) URL (an incoming webhook's URL looks like "
            "https://hooks.slack.com/services/T…/B…/…)"
        )


def _check_writable(file: Path, key: str, what: str, prefix: str) -> None:
    """``file`` can be written, its missing parent directories created."""
    if file.is_dir():
        raise ConfigError(f"{prefix}{key}: {file} is a directory; name {what}")
    parent = file.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{prefix}{key}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) and not (
        file.exists() and os.access(file, os.W_OK)
    ):
        raise ConfigError(f"{prefix}{key}: cannot write in {parent}")


def _check_format_topics(settings: Settings, prefix: str) -> None:
    """A topic in ingest.formats carries usage events: not the GPU or dead-letter topic."""
    k = settings.kafka
    for topic in settings.ingest.formats:
        if topic in (k.gpu_topic, k.dead_letter_topic):
            which = "gpu_topic" if topic == k.gpu_topic else "dead_letter_topic"
            raise ConfigError(
                f"{prefix}ingest.formats.{topic}: {topic!r} is kafka.{which}; ingest.formats "
                "lists topics of usage events"
            )


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    def resolve(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    store = settings.store.model_copy(update={"path": resolve(settings.store.path)})
    broker = settings.embedded_broker.model_copy(
        update={"log_file": resolve(settings.embedded_broker.log_file)}
    )
    kafka = settings.kafka.model_copy(
        update={
            "sasl_password_file": resolve(settings.kafka.sasl_password_file),
            "ssl_cafile": resolve(settings.kafka.ssl_cafile),
        }
    )
    pricing = settings.pricing.model_copy(update={"catalog": resolve(settings.pricing.catalog)})
    api = settings.api.model_copy(update={"token_file": resolve(settings.api.token_file)})
    g = settings.actions.gateway
    gateway = g.model_copy(
        update={
            "config_path": resolve(g.config_path),
            "git_repo": resolve(g.git_repo),
            "master_key_file": resolve(g.master_key_file),
        }
    )
    actions = settings.actions.model_copy(update={"gateway": gateway})
    reports = settings.reports.model_copy(update={"out_dir": resolve(settings.reports.out_dir)})
    slack = settings.slack.model_copy(
        update={
            "webhook_url_file": resolve(settings.slack.webhook_url_file),
            "signing_secret_file": resolve(settings.slack.signing_secret_file),
        }
    )
    return settings.model_copy(
        update={
            "slack": slack,
            "store": store,
            "embedded_broker": broker,
            "kafka": kafka,
            "pricing": pricing,
            "api": api,
            "actions": actions,
            "reports": reports,
        }
    )
