"""The deployment files under deploy/ agree with the gateway and with each other.

They are easy to break without noticing: a probe path renamed in the code, a grace period left
shorter than a raised drain timeout, a proxy timeout that cuts 60-minute WebSockets. These tests
read the files as data (YAML manifests, the example TOML through cch's own loader, the nginx
config, the systemd unit, the Dockerfile) and check the settings that matter.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from cch.config import Config, config_schema, is_loopback_endpoint, load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
EXAMPLE_TOML = DEPLOY / "cch.example.toml"
K8S = DEPLOY / "k8s"
SECRET_EXAMPLE = K8S / "secret.yaml.example"
SCALING_DOC = ROOT / "docs" / "scaling.md"
PLACEHOLDER = "CHANGE-ME"
# The CCH_* variables cch reads besides CCH_<SECTION>_<KEY> (docs/configuration.md, "Other
# environment variables", and config_schema's aliases).
OTHER_CCH_VARIABLES = {
    "CCH_LISTEN",
    "CCH_UPSTREAM_WEBSOCKET",
    "CCH_RESPONSES_WS_INTERNAL_SECRET",
    "CCH_LOG_FORMAT",
    "CCH_LOG_LEVEL",
}
CONFIG_PATH = "/etc/cch/cch.toml"
# After server.drain_timeout the gateway still waits up to 10 s for close handshakes and 10 s
# for cancelled requests to wind down (cch.service.GatewayService._stop).
AFTER_DRAIN = 20.0
PROXY_TIMEOUT = 3700  # seconds; OpenAI caps a Responses WebSocket at ~60 minutes

KEYS_TOML = '[[keys]]\nname = "alice"\nkey = "sk-cch-test-0123456789"\n'


# --- helpers ---------------------------------------------------------------------------------


def env_for(raw: dict[str, Any]) -> dict[str, str]:
    """Values for the environment variables a config's providers and tunnel name."""
    names = [p["api_key_env"] for p in raw.get("providers", []) if "api_key_env" in p]
    if "secret_env" in raw.get("tunnel", {}):
        names.append(raw["tunnel"]["secret_env"])
    return {name: f"test-value-of-{name.lower()}" for name in names}


def load_toml_text(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "cch.toml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env=env_for(tomllib.loads(text)) if env is None else env)


def listen_port(config: Config) -> int:
    match = re.fullmatch(r"(?:tcp6?|ssl):(\d+)(?::.*)?", config.server.listen)
    assert match, f"not a TCP listen endpoint: {config.server.listen!r}"
    return int(match.group(1))


@pytest.fixture(scope="module")
def example() -> Config:
    raw = tomllib.loads(EXAMPLE_TOML.read_text(encoding="utf-8"))
    return load_config(EXAMPLE_TOML, env=env_for(raw))


@pytest.fixture(scope="module")
def yaml() -> Any:
    return pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def manifests(yaml: Any) -> dict[str, dict[str, Any]]:
    """Every document under deploy/k8s, keyed by kind (one of each kind)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is None:
                continue
            assert doc["kind"] not in found, f"{path.name}: second {doc['kind']}"
            found[doc["kind"]] = doc
    return found


@pytest.fixture(scope="module")
def pod(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return manifests["Deployment"]["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    (main,) = [c for c in pod["spec"]["containers"] if c["name"] == "cch"]
    return main


@pytest.fixture(scope="module")
def configmap_toml(manifests: dict[str, dict[str, Any]]) -> str:
    return manifests["ConfigMap"]["data"]["cch.toml"]


@pytest.fixture
def configmap_config(configmap_toml: str, tmp_path: Path) -> Config:
    """The ConfigMap's cch.toml with a keys.toml appended, as the init container renders it."""
    return load_toml_text(configmap_toml + "\n" + KEYS_TOML, tmp_path)


@pytest.fixture(scope="module")
def secret_example(yaml: Any) -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all(SECRET_EXAMPLE.read_text(encoding="utf-8")) if d]
    return doc


@pytest.fixture(scope="module")
def secret_values(secret_example: dict[str, Any]) -> dict[str, str]:
    """The example Secret's values by key (stringData, or data base64-decoded)."""
    import base64

    values = dict(secret_example.get("stringData") or {})
    for key, value in (secret_example.get("data") or {}).items():
        values[key] = base64.b64decode(value).decode("utf-8")
    return values


def secret_refs(pod: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, Secret name, key) for every Secret key the pod reads: env of every container and
    init container, and Secret volumes."""
    refs = []
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append((f"{c['name']}: env {e['name']}", ref["name"], ref["key"]))
    for v in pod["spec"].get("volumes", []):
        if "secret" in v:
            for item in v["secret"].get("items", []):
                refs.append((f"volume {v['name']}", v["secret"]["secretName"], item["key"]))
    return refs


def deployment_env(container: dict[str, Any], secret_values: dict[str, str]) -> dict[str, str]:
    """The container's environment, with Secret references filled from the example Secret."""
    env = {}
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            env[e["name"]] = secret_values[e["valueFrom"]["secretKeyRef"]["key"]]
    return env


def prestop_seconds(container: dict[str, Any]) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", command
    return float(command[1])


def is_subset(small: dict[str, str], big: dict[str, str]) -> bool:
    return bool(small) and all(big.get(k) == v for k, v in small.items())


# --- the example config ------------------------------------------------------------------------


def test_example_config_is_valid_and_public(example: Config) -> None:
    assert not is_loopback_endpoint(example.server.listen)
    assert example.keys, "a public bind needs [[keys]]"
    assert len(example.providers) >= 2
    assert all(p.api_key for p in example.providers), "secrets come from api_key_env"
    assert listen_port(example) == 8080


def test_example_config_needs_its_secrets() -> None:
    """The example names its provider keys by variable; without them start-up stops."""
    from cch.config import ConfigError

    with pytest.raises(ConfigError, match="environment variable .* is not set"):
        load_config(EXAMPLE_TOML, env={})


def uncommented(text: str) -> str:
    """The example with its commented-out settings turned on: lines starting "#[" or "#name"."""
    return "\n".join(
        line[1:] if re.match(r"#[\[a-z_]", line) else line for line in text.splitlines()
    )


def test_example_config_shows_a_cluster_section_that_loads(tmp_path: Path) -> None:
    text = EXAMPLE_TOML.read_text(encoding="utf-8")
    assert "cluster" not in tomllib.loads(text), "commented out: one process needs no Redis"
    on = uncommented(text)
    assert "cluster" in tomllib.loads(on)
    config = load_toml_text(on, tmp_path)  # unknown keys and bad values are refused
    assert config.cluster.enabled
    assert config.cluster.expected_replicas >= 2
    assert config.usage.database.startswith("postgresql://")
    assert "docs/scaling.md" in text


# --- Kubernetes --------------------------------------------------------------------------------


def test_every_manifest_parses(yaml: Any) -> None:
    paths = sorted(K8S.glob("*.yaml"))
    assert {p.name for p in paths} >= {
        "deployment.yaml",
        "service.yaml",
        "ingress.yaml",
        "pdb.yaml",
        "hpa.yaml",
        "configmap.yaml",
    }
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
        assert docs, path.name
        for doc in docs:
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path.name


def test_the_example_secret_is_kept_out_of_kubectl_apply_and_holds_only_placeholders(
    secret_example: dict[str, Any], secret_values: dict[str, str]
) -> None:
    # `kubectl apply -f deploy/k8s/` reads only .json, .yaml and .yml files: the example must
    # never overwrite a real Secret.
    assert SECRET_EXAMPLE.suffix not in (".json", ".yaml", ".yml")
    assert secret_example["apiVersion"] == "v1" and secret_example["kind"] == "Secret"
    assert secret_values
    for key, value in secret_values.items():
        assert PLACEHOLDER in value, f"{key}: not an obvious placeholder"


def test_every_secret_key_the_deployment_reads_is_in_the_example_secret(
    pod: dict[str, Any], secret_example: dict[str, Any], secret_values: dict[str, str]
) -> None:
    refs = secret_refs(pod)
    assert refs
    for where, name, key in refs:
        assert name == secret_example["metadata"]["name"], where
        assert key in secret_values, f"{where}: key {key!r} is not in {SECRET_EXAMPLE.name}"
    # ... and the example holds nothing the Deployment does not read.
    assert set(secret_values) == {key for _, _, key in refs}


def test_every_cch_variable_the_deployment_sets_is_one_cch_reads(
    container: dict[str, Any], configmap_toml: str
) -> None:
    source = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "cch").rglob("*.py"))
    assert [name for name in OTHER_CCH_VARIABLES if name not in source] == []
    known = {env for *_, env in config_schema() if env} | OTHER_CCH_VARIABLES
    provider_vars = set(env_for(tomllib.loads(configmap_toml)))
    for e in container["env"]:
        name = e["name"]
        if name.startswith("CCH_"):
            assert name in known, f"{name}: not a variable cch reads (cch.config.config_schema)"
        else:
            assert name in provider_vars, f"{name}: no provider names it in api_key_env"


def test_replicas_share_redis_and_a_postgresql_ledger_from_the_secret(
    container: dict[str, Any],
    secret_values: dict[str, str],
    configmap_toml: str,
    manifests: dict[str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    env = {e["name"]: e for e in container["env"]}
    for name in ("CCH_CLUSTER_REDIS", "CCH_USAGE_DATABASE"):
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"
    # The ConfigMap's file, the Secret's keys.toml and the Deployment's environment (Secret
    # values from the example) make a valid clustered config.
    text = configmap_toml + "\n" + secret_values["keys.toml"]
    variables = deployment_env(container, secret_values)
    config = load_toml_text(
        text, tmp_path, {k: v for k, v in variables.items() if not k.startswith("CCH_LOG_")}
    )
    assert config.cluster.enabled
    assert config.usage.database.startswith("postgresql://")
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    assert hpa["minReplicas"] <= config.cluster.expected_replicas <= hpa["maxReplicas"]
    assert manifests["Deployment"]["spec"]["replicas"] >= 2


def test_the_manifests_point_to_the_scaling_doc() -> None:
    assert SCALING_DOC.is_file()
    for path in (K8S / "deployment.yaml", K8S / "configmap.yaml", K8S / "hpa.yaml", SECRET_EXAMPLE):
        assert "docs/scaling.md" in path.read_text(encoding="utf-8"), path.name


def test_configmap_config_is_valid(configmap_config: Config, example: Config) -> None:
    assert not is_loopback_endpoint(configmap_config.server.listen)
    assert configmap_config.keys
    assert listen_port(configmap_config) == listen_port(example)


def test_configmap_config_ignores_service_link_variables(
    configmap_toml: str, tmp_path: Path
) -> None:
    """Should enableServiceLinks be turned back on, a Service named "cch" injects CCH_SERVICE_*
    and CCH_PORT* variables; they must not stop the gateway from starting."""
    env = env_for(tomllib.loads(configmap_toml)) | {
        "CCH_SERVICE_HOST": "10.0.0.1",
        "CCH_SERVICE_PORT": "80",
        "CCH_SERVICE_PORT_HTTP": "80",
        "CCH_PORT": "tcp://10.0.0.1:80",
        "CCH_PORT_80_TCP": "tcp://10.0.0.1:80",
        "CCH_PORT_80_TCP_PORT": "80",
    }
    load_toml_text(configmap_toml + "\n" + KEYS_TOML, tmp_path, env)


def test_deployment_probes(container: dict[str, Any]) -> None:
    ready = container["readinessProbe"]["httpGet"]
    live = container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz"
    assert live["path"] == "/healthz"
    assert ready["port"] == live["port"] == "http"


def test_deployment_port_matches_listen(
    container: dict[str, Any], example: Config, configmap_config: Config
) -> None:
    (port,) = [p for p in container["ports"] if p["name"] == "http"]
    assert port["containerPort"] == listen_port(example) == listen_port(configmap_config)


def test_grace_period_covers_prestop_and_drain(
    pod: dict[str, Any], container: dict[str, Any], example: Config, configmap_config: Config
) -> None:
    drain = max(example.server.drain_timeout, configmap_config.server.drain_timeout)
    pre_stop = prestop_seconds(container)
    assert 1 <= pre_stop <= 30
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + AFTER_DRAIN


def test_deployment_config_and_secrets(
    pod: dict[str, Any], container: dict[str, Any], configmap_toml: str
) -> None:
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/etc/cch" in mounts
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    config_map_names = {v["configMap"]["name"] for v in volumes.values() if "configMap" in v}
    assert "cch-config" in config_map_names
    # Every variable a provider names is set in the container, from a Secret.
    env = {e["name"]: e for e in container["env"]}
    for name in env_for(tomllib.loads(configmap_toml)):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    # The image's CMD reads /etc/cch/cch.toml; the Deployment must not point elsewhere.
    assert "command" not in container and "args" not in container
    # The init container renders the file the main container mounts.
    (init,) = pod["spec"]["initContainers"]
    init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert init_mounts["/etc/cch"] == mounts["/etc/cch"]
    assert CONFIG_PATH in " ".join(init["command"])


def test_deployment_gives_the_usage_ledger_a_database_and_a_writable_run_directory(
    pod: dict[str, Any], container: dict[str, Any]
) -> None:
    # Replicas share one PostgreSQL ledger, named by a Secret.
    env = {e["name"]: e for e in container["env"]}
    assert env["CCH_USAGE_DATABASE"]["valueFrom"]["secretKeyRef"]["name"] == "cch-secrets"
    # The spill file needs the image's run directory writable under a read-only root.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    state = mounts["/var/lib/cch"]
    assert not state.get("readOnly")
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[state["name"]]


def test_deployment_runs_unprivileged(pod: dict[str, Any], container: dict[str, Any]) -> None:
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"]


def test_service_selects_the_pods(
    manifests: dict[str, dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]
) -> None:
    service = manifests["Service"]
    assert is_subset(service["spec"]["selector"], pod["metadata"]["labels"])
    port_names = {p["name"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names


def test_pdb_and_hpa_target_the_deployment(
    manifests: dict[str, dict[str, Any]], pod: dict[str, Any]
) -> None:
    deployment = manifests["Deployment"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert is_subset(selector, pod["metadata"]["labels"])
    assert manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_ingress_allows_long_unbuffered_connections(manifests: dict[str, dict[str, Any]]) -> None:
    ingress = manifests["Ingress"]
    notes = {
        k.removeprefix("nginx.ingress.kubernetes.io/"): v
        for k, v in ingress["metadata"]["annotations"].items()
    }
    assert notes["proxy-read-timeout"] == notes["proxy-send-timeout"] == str(PROXY_TIMEOUT)
    assert notes["proxy-buffering"] == notes["proxy-request-buffering"] == "off"
    assert notes["proxy-body-size"] == "100m"
    service = manifests["Service"]
    service_ports = {p["name"] for p in service["spec"]["ports"]} | {
        p["port"] for p in service["spec"]["ports"]
    }
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert next(iter(backend["port"].values())) in service_ports


# --- nginx -------------------------------------------------------------------------------------


def nginx_location(text: str, prefix: str) -> str:
    match = re.search(r"location\s+" + re.escape(prefix) + r"\s*\{(.*?)\n\s*\}", text, re.S)
    assert match, f"no location {prefix}"
    return match.group(1)


def directives(block: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.endswith(";"):
            name, _, value = line[:-1].partition(" ")
            found.setdefault(name, []).append(" ".join(value.split()))
    return found


def test_nginx_config() -> None:
    text = (DEPLOY / "nginx" / "cch.conf").read_text(encoding="utf-8")
    upgrade_map = re.search(r"map\s+\$http_upgrade\s+\$connection_upgrade\s*\{(.*?)\}", text, re.S)
    assert upgrade_map
    assert directives(upgrade_map.group(1)) == {"default": ["upgrade"], "''": ["close"]}

    location = directives(nginx_location(text, "/v1/responses"))
    headers = dict(value.split(" ", 1) for value in location["proxy_set_header"])
    assert headers == {
        "Upgrade": "$http_upgrade",
        "Connection": "$connection_upgrade",
        "Host": "$host",
        "X-Real-IP": "$remote_addr",
        "X-Forwarded-For": "$proxy_add_x_forwarded_for",
        "X-Forwarded-Proto": "$scheme",
    }
    assert location["proxy_http_version"] == ["1.1"]
    assert location["proxy_read_timeout"] == location["proxy_send_timeout"] == [f"{PROXY_TIMEOUT}s"]
    assert "proxy_connect_timeout" in location
    assert location["proxy_buffering"] == location["proxy_request_buffering"] == ["off"]
    assert location["client_max_body_size"] == ["100m"]
    assert location["proxy_pass"]


# --- systemd -----------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def systemd_seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_systemd_unit(example: Config) -> None:
    unit = (DEPLOY / "systemd" / "cch.service").read_text(encoding="utf-8")
    service = unit_settings(unit)["Service"]
    assert service["Type"] == ["simple"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["Restart"] == ["on-failure"]
    assert service["DynamicUser"] == ["yes"]
    stop_timeout = systemd_seconds(service["TimeoutStopSec"][-1])
    assert stop_timeout >= example.server.drain_timeout + AFTER_DRAIN

    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/twistd")
    assert "-n" in argv and "--pidfile=" in argv
    assert argv[argv.index("--config") - 1] == "cch"
    # The config reaches the dynamic user as a credential loaded from /etc/cch/cch.toml.
    credential = argv[argv.index("--config") + 1]
    name = credential.removeprefix("${CREDENTIALS_DIRECTORY}/")
    assert f"{name}:{CONFIG_PATH}" in service["LoadCredential"]
    # The default usage ledger needs a writable run directory under ProtectSystem=strict.
    assert service["StateDirectory"] == ["cch"]
    assert service["WorkingDirectory"] == ["/var/lib/cch"]


# --- Dockerfile --------------------------------------------------------------------------------


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> arguments, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found: dict[str, list[str]] = {}
    for line in joined.splitlines():
        if line.strip():
            instruction, _, rest = line.strip().partition(" ")
            found.setdefault(instruction.upper(), []).append(rest.strip())
    return found


def test_dockerfile(example: Config) -> None:
    docker = dockerfile()
    assert docker["FROM"] == ["python:3.11-slim"]
    assert docker["STOPSIGNAL"] == ["SIGTERM"]
    assert docker["USER"][-1].split(":")[0] not in ("root", "0")
    # With psycopg, for a PostgreSQL usage ledger.
    assert any(run.startswith('pip install ".[postgres,fast]"') for run in docker["RUN"])
    # The run directory (the default SQLite ledger and its spill file) is the service user's.
    workdir = docker["WORKDIR"][-1]
    assert workdir == "/var/lib/cch" and docker["VOLUME"] == [workdir]
    assert any(f"chown cch:cch {workdir}" in run for run in docker["RUN"])

    (cmd_line,) = docker["CMD"]
    cmd = json.loads(cmd_line)
    assert cmd[:2] == ["twistd", "-n"] and "--pidfile=" in cmd
    assert cmd[cmd.index("--config") + 1] == CONFIG_PATH
    plugin = cmd[cmd.index("--config") - 1]
    makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
    assert plugin in makers and makers[plugin].module == "cch.plugin"
    loggers = [a.removeprefix("--logger=") for a in cmd if a.startswith("--logger=")]
    for logger in loggers:
        module, _, name = logger.rpartition(".")
        assert callable(getattr(__import__(module, fromlist=[name]), name))

    port = listen_port(example)
    assert docker["EXPOSE"] == [str(port)]
    (healthcheck,) = docker["HEALTHCHECK"]
    assert f"127.0.0.1:{port}/healthz" in healthcheck


def test_every_cch_package_is_installed_by_a_plain_pip_install() -> None:
    """``pip install .`` (README, Dockerfile) ships exactly setup.cfg's ``packages``: a package
    missing there is missing at run time (cch.translate once was)."""
    import configparser

    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    listed = {line.strip() for line in parser["options"]["packages"].splitlines() if line.strip()}
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "cch").rglob("__init__.py")
    }
    assert on_disk - listed == set()
