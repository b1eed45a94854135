"""The Helm chart, rendered by Helm's own engine (helm-python-sdk binds Helm's Go SDK; no binary).

Every scenario below renders the chart offline, and every manifest is validated against the
Kubernetes 1.30 OpenAPI schemas (kubernetes-validate, strict: unknown fields fail). CRD kinds
are not in those schemas: they are listed in CRD_KINDS and their shape is asserted by hand.
On top of that: probes, termination timing, secret handling, resource requests, selectors,
disabled features, and the rendered gateway config accepted by `Settings.from_mapping`.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from lora_gateway.client import ROUTING_HEADER
from lora_gateway.config import Settings, TenantDefaults
from lora_gateway.tenancy import KeyRing
from tests.support.s3server import s3_server

CHART = Path(__file__).resolve().parents[2] / "helm" / "lora-gateway"
KUBE_VERSION = "1.30.0"
RELEASE = "rel"
NAMESPACE = "lora"
GRPC_PORT = 50051
HEALTH_PORT = 50052
HASH = "a" * 64

#: Kinds whose schema kubernetes-validate does not ship (CRDs); asserted by hand instead.
CRD_KINDS = frozenset({"ServiceMonitor"})
#: Settings fields the chart sets itself (not in values' `config`), and TLS, which the chart does
#: not wire because kubelet gRPC probes speak plaintext.
CHART_MANAGED = frozenset(
    {
        "model",
        "store",
        "s3_endpoint",
        "s3_region",
        "tenants_file",
        "listen",
        "metrics_listen",
        "cache_dir",
        "spool_dir",
        "health_listen",
        "openai_listen",
    }
)
#: TLS is not wired; vllm_open_adapter_routes is for `vllm serve` with the plugin, not the gateway.
NOT_IN_CHART = frozenset({"tls_cert", "tls_key", "tls_client_ca", "vllm_open_adapter_routes"})
WORKLOADS = frozenset({"Deployment", "Job", "StatefulSet", "DaemonSet"})
#: What the Dockerfile's runtime stages set (environment wins over the config file).
IMAGE_ENV = {
    "LORA_GATEWAY_LISTEN": "0.0.0.0:50051",
    "LORA_GATEWAY_METRICS_LISTEN": "0.0.0.0:9400",
    "LORA_GATEWAY_CACHE_DIR": "/var/cache/lora-gateway",
}

TENANTS = {
    "tenants": {
        "acme": {
            "max_concurrent": 8,
            "keys": [{"id": "acme-admin", "sha256": HASH, "role": "tenant-admin"}],
        }
    }
}

#: Every optional feature on at once.
ALL_ON: dict[str, Any] = {
    "gpu": {"enabled": True, "count": 2},
    "replicaCount": 3,
    "model": {"source": "s3", "uri": "", "s3": {"uri": "s3://lora-gateway/models/llama"}},
    "minio": {"enabled": True},
    "envoy": {"enabled": True},
    "autoscaling": {"enabled": True},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
    "cache": {"type": "ephemeral", "ephemeral": {"storageClassName": "fast"}},
    "networkPolicy": {
        "egress": {"enabled": True, "to": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]}
    },
    "tenants": {"file": TENANTS},
    "config": {"tensor_parallel_size": 2, "warm_adapters": ["acme/support@prod"]},
}
del ALL_ON["model"]["uri"]

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "all-on": ALL_ON,
    "external-s3-existing-secrets": {
        "s3": {
            "store": "s3://adapters/prod",
            "endpoint": "https://s3.example.internal",
            "region": "eu-west-1",
            "existingSecret": "s3-creds",
        },
        "tenants": {"existingSecret": "tenants", "secretKey": "tenants.yaml"},
        "model": {"source": "s3", "s3": {"uri": "s3://models/llama-3-8b"}},
        "cache": {"type": "pvc", "pvc": {"claimName": "adapter-cache"}},
    },
    "minio-existing-secret-no-persistence": {
        "minio": {
            "enabled": True,
            "auth": {"existingSecret": "minio-root"},
            "persistence": {"enabled": False},
        },
        "envoy": {"enabled": True, "lbPolicy": "MAGLEV"},
        "networkPolicy": {"grpcFrom": []},
    },
    "hostpath-model-irsa": {
        "model": {"source": "hostPath", "hostPath": {"path": "/mnt/models"}, "path": "llama"},
        "s3": {"store": "s3://adapters"},
        "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}},
        "networkPolicy": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
    },
}

#: The example values files the docs use, rendered like any other scenario.
EXAMPLES = {
    f"example-{path.stem}": yaml.safe_load(path.read_text())
    for path in sorted((CHART / "examples").glob("*.yaml"))
}
EXAMPLES["example-local-cpu"]["tenants"] = {"existingSecret": "lora-tenants"}
SCENARIOS.update(EXAMPLES)


# --- rendering --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render_files(chart: helm.Chart, values: dict[str, Any]) -> dict[str, str]:
    return chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The rendered Kubernetes objects (NOTES.txt and empty documents left out)."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render_files(chart, values).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


@pytest.fixture(scope="module", params=sorted(SCENARIOS))
def scenario(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(chart, SCENARIOS[request.param])


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


def gateway(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in of_kind(docs, "Deployment") if component(d) == "gateway"]
    return deployment


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return dict(workload["spec"]["template"]["spec"])


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def gateway_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec(gateway(docs))["containers"] if c["name"] == "gateway"]
    return container


def gateway_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (cm,) = [d for d in of_kind(docs, "ConfigMap") if component(d) == "gateway"]
    loaded = yaml.safe_load(cm["data"]["config.yaml"])
    assert isinstance(loaded, dict)
    return loaded


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def quantity_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", text).groups()  # type: ignore[union-attr]
    return int(number) * units.get(unit or "", 1)


# --- lint and schema --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "all-on", *sorted(EXAMPLES)])
def test_helm_lint_strict_is_clean(name: str) -> None:
    report = helm.lint(
        CHART, copy.deepcopy(SCENARIOS[name]), strict=True, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["errors"] == []
    findings = [m for m in report["messages"] if m["severity"] >= 2]
    assert findings == []
    # Info-level only, and only the cosmetic icon advice.
    assert all("icon" in m["error"] for m in report["messages"]), report["messages"]


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"config": {"max_loras": 0}}, "max_loras"),
        ({"config": {"listen": "0.0.0.0:1"}}, "listen"),  # chart-managed
        ({"config": {"no_such_setting": 1}}, "no_such_setting"),
        ({"config": {"max_lora_rank": 48}}, "max_lora_rank"),
        ({"s3": {"store": "minio://x"}}, "store"),
        ({"extraEnv": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}, "extraEnv"),
        (
            {"tenants": {"file": {"tenants": {"t": {"keys": [{"id": "k", "key": "plain"}]}}}}},
            "tenants",
        ),
        ({"tenants": {"file": {"tenants": {"t": {"keys": [{"id": "k", "sha256": "x"}]}}}}}, "sha"),
        ({"tenants": {"file": {"tenants": {"t": {"quota": 1}}}}}, "quota"),
        ({"tenants": {"file": {"tenants": {"t": {"max_pins": 0}}}}}, "max_pins"),
        ({"envoy": {"lbPolicy": "ROUND_ROBIN"}}, "lbPolicy"),
        ({"resources": {"requests": None}}, "requests"),
        ({"bogus": True}, "bogus"),
    ],
)
def test_schema_refuses_bad_values(chart: helm.Chart, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError) as info:
        render_files(chart, values)
    assert where in str(info.value)


def test_schema_config_covers_exactly_the_settings_fields(chart: helm.Chart) -> None:
    schema = chart.schema
    assert schema is not None
    config_props = set(schema["properties"]["config"]["properties"])
    assert schema["properties"]["config"]["additionalProperties"] is False
    assert config_props | CHART_MANAGED | NOT_IN_CHART == set(Settings.field_names())
    assert not config_props & (CHART_MANAGED | NOT_IN_CHART)


def test_tenants_file_with_every_limit_renders_and_loads(chart: helm.Chart, tmp_path: Path) -> None:
    """The chart's `tenants.file` schema is generated from the tenants file's model: every
    per-tenant limit the gateway reads is accepted (before: only max_concurrent and max_tokens,
    a README example with rates was refused by `helm install`), and the gateway reads them."""
    limits = {
        "max_concurrent": 8,
        "max_tokens": 1024,
        "max_engine_slots": 2,
        "max_pins": 3,
        "max_concurrent_uploads": 1,
        "max_stored_bytes": 1 << 30,
        "max_adapters": 50,
        "tokens_per_minute": 60000,
        "requests_per_minute": 600,
    }
    file = {
        "tenants": {
            "acme": {**limits, "keys": [{"id": "acme-admin", "sha256": HASH, "role": "user"}]},
            "idle": None,
        }
    }
    (secret,) = [
        s
        for s in of_kind(render(chart, {"tenants": {"file": file}}), "Secret")
        if "tenants.yaml" in s["data"]
    ]
    tenants_file = tmp_path / "tenants.yaml"
    tenants_file.write_bytes(base64.b64decode(secret["data"]["tenants.yaml"]))
    keyring = KeyRing.load(tenants_file, TenantDefaults())
    acme = keyring.tenant("acme")
    assert {name: getattr(acme, name) for name in limits} == {
        "max_concurrent": 8,
        "max_tokens": 1024,
        "max_engine_slots": 2,
        "max_pins": 3,
        "max_concurrent_uploads": 1,
        "max_stored_bytes": 1073741824,
        "max_adapters": 50,
        "tokens_per_minute": 60000,
        "requests_per_minute": 600,
    }
    assert sorted(keyring.tenants) == ["acme", "idle"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"terminationGracePeriodSeconds": 25}, "terminationGracePeriodSeconds"),
        ({"config": {"drain_grace_s": 60}}, "terminationGracePeriodSeconds"),
        ({"gpu": {"enabled": True, "count": 1}, "config": {"tensor_parallel_size": 2}}, "gpu"),
        ({"model": {"source": "hostPath"}}, "hostPath"),
        ({"model": {"source": "s3"}}, "model.s3.uri"),
        ({"cache": {"type": "pvc"}}, "claimName"),
        ({"s3": {"existingSecret": "x"}}, "s3.store"),
    ],
)
def test_render_refuses_inconsistent_values(
    chart: helm.Chart, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render_files(chart, values)


# --- every manifest is valid Kubernetes -------------------------------------------------------


def test_every_manifest_validates_against_kubernetes(
    scenario: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = scenario
    assert docs, name
    for doc in docs:
        labels = doc["metadata"]["labels"]
        for key in ("name", "instance", "version", "component"):
            assert labels.get(f"app.kubernetes.io/{key}"), (doc["kind"], key)
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_service_monitor_shape(chart: helm.Chart) -> None:
    docs = render(chart, ALL_ON)
    (monitor,) = of_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    selected = [
        s
        for s in of_kind(docs, "Service")
        if matches(spec["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in selected] == [f"{RELEASE}-lora-gateway"]
    assert "metrics" in [p["name"] for p in selected[0]["spec"]["ports"]]


# --- the gateway pod --------------------------------------------------------------------------


def test_probes_are_grpc_on_the_probe_port(scenario: tuple[str, list[dict[str, Any]]]) -> None:
    """Probes ask grpc.health.v1 on the health-only listener (readiness: service "", liveness:
    "liveness", the names lora_gateway.server serves), which no NetworkPolicy rule opens."""
    from lora_gateway.server import LIVENESS_NAME

    _, docs = scenario
    container = gateway_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": 9400, "health": HEALTH_PORT, "openai": 8000}
    config = gateway_config(docs)
    assert config["listen"].rsplit(":", 1)[1] == str(ports["grpc"])
    assert config["openai_listen"].rsplit(":", 1)[1] == str(ports["openai"])
    assert config["metrics_listen"].rsplit(":", 1)[1] == str(ports["metrics"])
    assert config["health_listen"].rsplit(":", 1)[1] == str(ports["health"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        want = {"port": HEALTH_PORT}
        if probe == "livenessProbe":
            want["service"] = LIVENESS_NAME  # type: ignore[assignment]
        assert spec["grpc"] == want, probe
        assert not {"httpGet", "tcpSocket", "exec"} & set(spec), probe
    for policy in of_kind(docs, "NetworkPolicy"):
        opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
        assert not opened & {"health", HEALTH_PORT}, "no pod may reach the probe port"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_termination_outlasts_prestop_and_drain(
    scenario: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = scenario
    container = gateway_container(docs)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(gateway_config(docs).get("drain_grace_s", Settings().drain_grace_s))
    grace = pod_spec(gateway(docs))["terminationGracePeriodSeconds"]
    assert grace > drain + pre_stop


def test_security_context(scenario: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = scenario
    for workload in [d for d in docs if d["kind"] in WORKLOADS]:
        pod = pod_spec(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in containers(workload):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
    pod = pod_spec(gateway(docs))
    assert pod["securityContext"]["runAsUser"] == 10001
    # The read-only root needs writable emptyDirs where vLLM, torch and the cache write.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in gateway_container(docs)["volumeMounts"]}
    for path in ("/tmp", "/home/lora", "/dev/shm", "/var/cache/lora-gateway"):
        assert path in mounts, path
        volume = volumes[mounts[path]]
        assert {"emptyDir", "ephemeral", "persistentVolumeClaim"} & set(volume), path
    assert gateway_config(docs)["cache_dir"] == "/var/cache/lora-gateway"


def test_resource_requests_everywhere(scenario: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = scenario
    for workload in [d for d in docs if d["kind"] in WORKLOADS]:
        for container in containers(workload):
            requests = container["resources"]["requests"]
            assert {"cpu", "memory"} <= set(requests), (workload["metadata"]["name"], container)


def test_secrets_only_through_secret_key_refs(
    scenario: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = scenario
    sensitive = re.compile(r"(ACCESS_KEY|SECRET|PASSWORD|TOKEN|ROOT_USER)", re.IGNORECASE)
    for workload in [d for d in docs if d["kind"] in WORKLOADS]:
        for container in containers(workload):
            assert "envFrom" not in container
            for env in container.get("env", []):
                if sensitive.search(env["name"]):
                    assert "value" not in env, (name, env)
                    assert set(env["valueFrom"]) == {"secretKeyRef"}, (name, env)
    # Nothing that looks like a credential outside Secret objects.
    for doc in docs:
        if doc["kind"] == "Secret":
            continue
        text = json.dumps(doc)
        assert not re.search(r"AKIA[0-9A-Z]{16}", text)
        assert not re.search(r"(?i)(aws_secret_access_key|password)\"\s*:\s*\"[^\"]", text)
    # The tenants Secret holds only sha256 hashes.
    for secret in of_kind(docs, "Secret"):
        if "tenants.yaml" in secret.get("data", {}):
            tenants = yaml.safe_load(base64.b64decode(secret["data"]["tenants.yaml"]))
            for tenant in (tenants.get("tenants") or {}).values():
                for key in tenant["keys"]:
                    assert set(key) == {"id", "sha256", "role"}
                    assert re.fullmatch(r"[0-9a-f]{64}", key["sha256"])


def test_s3_credentials_come_from_the_right_secret(chart: helm.Chart) -> None:
    def refs(values: dict[str, Any]) -> dict[str, tuple[str, str]]:
        env = gateway_container(render(chart, values)).get("env", [])
        return {
            e["name"]: (
                e["valueFrom"]["secretKeyRef"]["name"],
                e["valueFrom"]["secretKeyRef"]["key"],
            )
            for e in env
            if e["name"].startswith("AWS_")
        }

    assert refs({}) == {}  # no store, no keys
    assert refs({"s3": {"store": "s3://b"}}) == {}  # IRSA / instance role
    external = refs(SCENARIOS["external-s3-existing-secrets"])
    assert external == {
        "AWS_ACCESS_KEY_ID": ("s3-creds", "AWS_ACCESS_KEY_ID"),
        "AWS_SECRET_ACCESS_KEY": ("s3-creds", "AWS_SECRET_ACCESS_KEY"),
    }
    bundled = refs({"minio": {"enabled": True}})
    assert bundled == {
        "AWS_ACCESS_KEY_ID": (f"{RELEASE}-lora-gateway-minio", "root-user"),
        "AWS_SECRET_ACCESS_KEY": (f"{RELEASE}-lora-gateway-minio", "root-password"),
    }
    assert refs({"minio": {"enabled": True, "auth": {"existingSecret": "m"}}}) == {
        "AWS_ACCESS_KEY_ID": ("m", "root-user"),
        "AWS_SECRET_ACCESS_KEY": ("m", "root-password"),
    }


def test_tenants_secret_or_existing_secret(chart: helm.Chart, tmp_path: Path) -> None:
    docs = render(chart, {"tenants": {"file": TENANTS}})
    (secret,) = [s for s in of_kind(docs, "Secret") if "tenants.yaml" in s["data"]]
    assert yaml.safe_load(base64.b64decode(secret["data"]["tenants.yaml"])) == TENANTS
    # The gateway accepts the file as rendered.
    tenants_file = tmp_path / "tenants.yaml"
    tenants_file.write_bytes(base64.b64decode(secret["data"]["tenants.yaml"]))
    keyring = KeyRing.load(tenants_file, TenantDefaults(max_concurrent=4, max_tokens=64))
    assert set(keyring.tenants) == {"acme"}
    # So does the empty default (every call refused, NOTES.txt warns).
    (empty,) = of_kind(render(chart, {}), "Secret")
    tenants_file.write_bytes(base64.b64decode(empty["data"]["tenants.yaml"]))
    assert not KeyRing.load(tenants_file, TenantDefaults(max_concurrent=4, max_tokens=64)).tenants
    volumes = {v["name"]: v for v in pod_spec(gateway(docs))["volumes"]}
    assert volumes["tenants"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert gateway_config(docs)["tenants_file"] == "/etc/lora-gateway/tenants/tenants.yaml"

    docs = render(chart, {"tenants": {"existingSecret": "mine", "secretKey": "t.yaml"}})
    assert of_kind(docs, "Secret") == []
    volumes = {v["name"]: v for v in pod_spec(gateway(docs))["volumes"]}
    assert volumes["tenants"]["secret"]["secretName"] == "mine"
    assert gateway_config(docs)["tenants_file"] == "/etc/lora-gateway/tenants/t.yaml"


def test_selectors_match_pod_labels(scenario: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = scenario
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] in WORKLOADS
    }
    for workload in [d for d in docs if d["kind"] == "Deployment"]:
        assert matches(
            workload["spec"]["selector"]["matchLabels"], pods[workload["metadata"]["name"]]
        )
    deployments = {
        d["metadata"]["name"]: pods[d["metadata"]["name"]] for d in of_kind(docs, "Deployment")
    }

    def selects_a_deployment(selector: dict[str, str]) -> bool:
        return any(matches(selector, labels) for labels in deployments.values())

    for service in of_kind(docs, "Service"):
        assert selects_a_deployment(service["spec"]["selector"]), (
            name,
            service["metadata"]["name"],
        )
        for port in service["spec"]["ports"]:
            (target,) = [
                d
                for d in of_kind(docs, "Deployment")
                if matches(service["spec"]["selector"], pods[d["metadata"]["name"]])
            ]
            named = {p["name"] for c in containers(target) for p in c.get("ports", [])}
            assert port["targetPort"] in named, (service["metadata"]["name"], port)
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        assert selects_a_deployment(pdb["spec"]["selector"]["matchLabels"])
    for policy in of_kind(docs, "NetworkPolicy"):
        assert selects_a_deployment(policy["spec"]["podSelector"]["matchLabels"])
        for rule in policy["spec"].get("ingress") or []:
            assert rule.get("from"), (name, policy["metadata"]["name"], "admits every source")
        peers = [
            peer
            for rule in (policy["spec"].get("ingress") or []) + policy["spec"].get("egress", [])
            for peer in rule.get("from", []) + rule.get("to", [])
            if peer.get("podSelector", {}).get("matchLabels")
        ]
        for peer in peers:
            labels = peer["podSelector"]["matchLabels"]
            assert any(matches(labels, pod) for pod in pods.values()), (policy["metadata"], labels)
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        target = [
            d
            for d in of_kind(docs, "Deployment")
            if d["metadata"]["name"] == hpa["spec"]["scaleTargetRef"]["name"]
        ]
        assert "replicas" not in target[0]["spec"]  # the HPA owns the count


EVERYONE = "every source"


def admitted(policy: dict[str, Any], port: str) -> list[dict[str, Any]] | str:
    """Who a NetworkPolicy lets in on a named port, read the way Kubernetes reads it: a rule
    whose `ports` is missing or empty covers every port, and one whose `from` is missing or
    empty admits every source; no rule covering the port admits nobody."""
    if "Ingress" not in policy["spec"].get("policyTypes", ["Ingress"]):
        return EVERYONE
    peers: list[dict[str, Any]] = []
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports") or []
        if ports and not any(p.get("port") == port for p in ports):
            continue
        if not rule.get("from"):
            return EVERYONE
        peers += rule["from"]
    return peers


def policy_of(docs: list[dict[str, Any]], which: str) -> dict[str, Any]:
    (policy,) = [p for p in of_kind(docs, "NetworkPolicy") if component(p) == which]
    return policy


def test_network_policy_admits_exactly_the_configured_peers(chart: helm.Chart) -> None:
    """What is rendered, read with Kubernetes' semantics. `grpcFrom: []` admits nobody (only the
    release's Envoy when it is on): before, it rendered a rule without `from`, open to every
    source, and the old test read `rule.get("from", [])` as no peers."""
    envoy_pods = {"matchLabels": {"app.kubernetes.io/component": "envoy"}}

    def envoy_peer(peers: list[dict[str, Any]] | str) -> list[dict[str, Any]]:
        assert peers != EVERYONE
        assert isinstance(peers, list)
        return [
            p
            for p in peers
            if p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
            == "envoy"
        ]

    default = render(chart, {})
    gateway_policy = policy_of(default, "gateway")
    assert admitted(gateway_policy, "grpc") == [{"podSelector": {}}]  # the release's namespace
    assert admitted(gateway_policy, "metrics") == [{"namespaceSelector": {}}]
    assert admitted(gateway_policy, "openai") == [{"podSelector": {}}]

    closed = render(chart, {"networkPolicy": {"grpcFrom": [], "metricsFrom": [], "openaiFrom": []}})
    assert admitted(policy_of(closed, "gateway"), "grpc") == []
    assert admitted(policy_of(closed, "gateway"), "metrics") == []
    assert admitted(policy_of(closed, "gateway"), "openai") == []
    assert policy_of(closed, "gateway")["spec"]["ingress"] == []

    fronted = render(chart, {"envoy": {"enabled": True}, "networkPolicy": {"grpcFrom": []}})
    only_envoy = admitted(policy_of(fronted, "gateway"), "grpc")
    assert len(envoy_peer(only_envoy)) == 1
    assert len(only_envoy) == 1
    assert admitted(policy_of(fronted, "envoy"), "grpc") == []  # nobody may call the front

    chosen = [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]
    picked = render(chart, {"envoy": {"enabled": True}, "networkPolicy": {"grpcFrom": chosen}})
    peers = admitted(policy_of(picked, "gateway"), "grpc")
    assert isinstance(peers, list)
    assert [p for p in peers if p not in envoy_peer(peers)] == chosen
    assert admitted(policy_of(picked, "envoy"), "grpc") == chosen
    assert (
        envoy_pods["matchLabels"].items()
        <= envoy_peer(peers)[0]["podSelector"]["matchLabels"].items()
    )

    # The OpenAI-compatible port: its own peers; off, no port and no rule.
    ml = [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]
    openai_peers = render(chart, {"networkPolicy": {"openaiFrom": ml}})
    assert admitted(policy_of(openai_peers, "gateway"), "openai") == ml
    assert admitted(policy_of(openai_peers, "gateway"), "grpc") == [{"podSelector": {}}]
    off = render(chart, {"openai": {"enabled": False}})
    assert admitted(policy_of(off, "gateway"), "openai") == []
    assert "openai_listen" not in gateway_config(off)
    assert "openai" not in {p["name"] for p in gateway_container(off)["ports"]}
    for service in of_kind(off, "Service"):
        assert "openai" not in {p["name"] for p in service["spec"]["ports"]}
    (served,) = [s for s in of_kind(default, "Service") if "openai" in str(s["spec"]["ports"])]
    assert {"name": "openai", "port": 8000, "targetPort": "openai"}.items() <= next(
        p for p in served["spec"]["ports"] if p["name"] == "openai"
    ).items()

    # Opening it to everything is possible, and explicit.
    anywhere = [{"ipBlock": {"cidr": "0.0.0.0/0"}}]
    opened = render(chart, {"networkPolicy": {"grpcFrom": anywhere}})
    assert admitted(policy_of(opened, "gateway"), "grpc") == anywhere
    with pytest.raises(helm.HelmValuesError):
        render_files(chart, {"networkPolicy": {"grpcFrom": [{}]}})  # an empty peer


def test_config_map_is_accepted_by_settings(
    scenario: tuple[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    name, docs = scenario
    config = gateway_config(docs)
    settings = Settings.from_mapping(config)
    assert settings.listen == "0.0.0.0:50051"
    # The way `serve --config` reads it, under the environment the image sets.
    (cm,) = [d for d in of_kind(docs, "ConfigMap") if component(d) == "gateway"]
    (tmp_path / "config.yaml").write_text(cm["data"]["config.yaml"])
    assert Settings.load(tmp_path / "config.yaml", environ=IMAGE_ENV) == settings
    container = gateway_container(docs)
    assert container["args"] == ["--config", "/etc/lora-gateway/config/config.yaml"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == "/etc/lora-gateway/config"
    # The model folder is inside the model volume's mount.
    assert settings.model.startswith(mounts["model"])
    # The disk cache's own budget acts before the kubelet's size limit evicts the pod.
    volumes = {v["name"]: v for v in pod_spec(gateway(docs))["volumes"]}
    cache = volumes["cache"]
    limit = cache.get("emptyDir", {}).get("sizeLimit") or cache.get("ephemeral", {}).get(
        "volumeClaimTemplate", {}
    ).get("spec", {}).get("resources", {}).get("requests", {}).get("storage")
    if limit:
        assert settings.cache_budget_bytes < quantity_bytes(limit), name
    if settings.store.startswith("file://"):
        assert settings.store.removeprefix("file://").startswith(mounts["local-store"])


def test_chart_values_drive_the_settings(chart: helm.Chart) -> None:
    docs = render(chart, ALL_ON)
    settings = Settings.from_mapping(gateway_config(docs))
    assert settings.store == "s3://lora-gateway/adapters"
    assert settings.s3_endpoint == f"http://{RELEASE}-lora-gateway-minio.{NAMESPACE}.svc:9000"
    assert settings.tensor_parallel_size == 2
    assert settings.warm_adapters == ("acme/support@prod",)
    assert settings.poll_interval_s == 2.0
    settings = Settings.from_mapping(
        gateway_config(render(chart, SCENARIOS["hostpath-model-irsa"]))
    )
    assert settings.model == "/models/llama"
    assert settings.store == "s3://adapters"
    assert settings.s3_endpoint is None


# --- optional features ------------------------------------------------------------------------


def test_disabled_features_render_nothing(chart: helm.Chart) -> None:
    files = render_files(chart, {})
    for template in ("envoy.yaml", "minio.yaml", "hpa.yaml", "servicemonitor.yaml"):
        assert files[f"lora-gateway/templates/{template}"].strip() == "", template
    docs = render(chart, {})
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"HorizontalPodAutoscaler", "ServiceMonitor", "Job", "PersistentVolumeClaim"}
    assert {component(d) for d in docs} == {"gateway"}
    assert [s["metadata"]["name"] for s in of_kind(docs, "Service")] == [f"{RELEASE}-lora-gateway"]
    assert "initContainers" not in pod_spec(gateway(docs))
    off = render(chart, SCENARIOS["hostpath-model-irsa"])
    assert not {"NetworkPolicy", "PodDisruptionBudget"} & {d["kind"] for d in off}


def test_gpu_resources(chart: helm.Chart) -> None:
    docs = render(chart, ALL_ON)
    container = gateway_container(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["image"] == "lora-gateway:0.1.0-gpu"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec(
        gateway(docs)
    )["tolerations"]
    cpu = render(chart, {})
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    assert gateway_container(cpu)["image"] == "lora-gateway:0.1.0-cpu"
    digest = "sha256:" + "0" * 64
    pinned = render(chart, {"image": {"repository": "r/lg", "digest": digest}})
    assert gateway_container(pinned)["image"] == f"r/lg@{digest}"


def test_model_sources(chart: helm.Chart) -> None:
    docs = render(chart, {})
    volumes = {v["name"]: v for v in pod_spec(gateway(docs))["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["readOnly"] is True
    docs = render(chart, SCENARIOS["hostpath-model-irsa"])
    volumes = {v["name"]: v for v in pod_spec(gateway(docs))["volumes"]}
    assert volumes["model"]["hostPath"] == {"path": "/mnt/models", "type": "Directory"}

    docs = render(chart, ALL_ON)
    spec = pod_spec(gateway(docs))
    (init,) = spec["initContainers"]
    assert init["image"] == gateway_container(docs)["image"]
    env = {e["name"]: e for e in init["env"]}
    assert env["MODEL_URI"]["value"] == "s3://lora-gateway/models/llama"
    assert env["MODEL_DIR"]["value"] == gateway_config(docs)["model"]
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["key"] == "root-user"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["model"]["emptyDir"]["sizeLimit"] == "50Gi"
    init_mounts = {m["name"]: m for m in init["volumeMounts"]}
    assert not init_mounts["model"].get("readOnly")
    script_path = Path(init["command"][1])
    (cm,) = [d for d in of_kind(docs, "ConfigMap") if component(d) == "gateway"]
    assert script_path.parent.as_posix() == init_mounts["config"]["mountPath"]
    script = cm["data"][script_path.name]
    assert script == (CHART / "files" / "pull-model.py").read_text()


def test_model_pull_script_against_a_real_s3_server(tmp_path: Path) -> None:
    """files/pull-model.py (the init container's program) downloads a model folder."""
    files = {
        "config.json": b"{}",
        "model.safetensors": os.urandom(2048),
        "tok/tokenizer.json": b"[]",
    }
    with s3_server("models") as server:
        client = server.client()
        for name, data in files.items():
            client.put_object(Bucket="models", Key=f"llama/{name}", Body=data)
        client.put_object(Bucket="models", Key="other/evil.bin", Body=b"x")
        env = {
            **os.environ,
            "MODEL_URI": "s3://models/llama",
            "MODEL_DIR": str(tmp_path / "model"),
            "S3_ENDPOINT": server.endpoint_url,
            "S3_REGION": server.region,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "WAIT_SECONDS": "0",
        }
        script = str(CHART / "files" / "pull-model.py")
        done = subprocess.run(
            [sys.executable, script], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        for name, data in files.items():
            assert (tmp_path / "model" / name).read_bytes() == data
        assert not list((tmp_path / "model").rglob("*.partial"))
        assert not (tmp_path / "model" / "evil.bin").exists()
        # A second run keeps what is there; an empty prefix fails instead of serving nothing.
        again = subprocess.run(
            [sys.executable, script], env=env, capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 0
        assert "0 bytes downloaded" in again.stdout
        missing = {**env, "MODEL_URI": "s3://models/absent"}
        failed = subprocess.run(
            [sys.executable, script], env=missing, capture_output=True, text=True, timeout=60
        )
        assert failed.returncode == 1
        assert "no objects" in failed.stdout


@pytest.mark.parametrize("budget", [None, 1 << 30, 20 << 30])
def test_spool_volume_is_sized_from_the_spool_budget(chart: helm.Chart, budget: int | None) -> None:
    """Uploads spool into their own volume, mounted at the gateway's spool_dir, whose size limit
    exceeds the gateway's spool budget (the budget refuses uploads before the kubelet evicts)."""
    values: dict[str, Any] = {} if budget is None else {"config": {"spool_budget_bytes": budget}}
    docs = render(chart, values)
    settings = Settings.from_mapping(gateway_config(docs))
    if budget is not None:
        assert settings.spool_budget_bytes == budget
    mounts = {m["name"]: m["mountPath"] for m in gateway_container(docs)["volumeMounts"]}
    assert settings.spool_dir == mounts["spool"]
    assert mounts["tmp"] != mounts["spool"]
    volumes = {v["name"]: v for v in pod_spec(gateway(docs))["volumes"]}
    limit = quantity_bytes(str(volumes["spool"]["emptyDir"]["sizeLimit"]))
    assert settings.spool_budget_bytes < limit <= settings.spool_budget_bytes * 1.2


def test_cache_volume_kinds(chart: helm.Chart) -> None:
    def cache_volume(values: dict[str, Any]) -> dict[str, Any]:
        volumes = {v["name"]: v for v in pod_spec(gateway(render(chart, values)))["volumes"]}
        return dict(volumes["cache"])

    assert cache_volume({}) == {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}}
    assert cache_volume({"cache": {"type": "pvc", "pvc": {"claimName": "c"}}})[
        "persistentVolumeClaim"
    ] == {"claimName": "c"}
    ephemeral = cache_volume(ALL_ON)["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert ephemeral["storageClassName"] == "fast"
    assert ephemeral["resources"]["requests"]["storage"] == "20Gi"


def test_envoy_front(chart: helm.Chart) -> None:
    docs = render(chart, ALL_ON)
    envoy = [d for d in docs if component(d) == "envoy"]
    assert {d["kind"] for d in envoy} == {"ConfigMap", "Deployment", "Service", "NetworkPolicy"}
    (cm,) = of_kind(envoy, "ConfigMap")
    config = yaml.safe_load(cm["data"]["envoy.yaml"])
    (cluster,) = config["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["lb_policy"] == "RING_HASH"
    options = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http2_protocol_options" in options["explicit_http_config"]
    assert cluster["health_checks"][0]["grpc_health_check"] == {}
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    address = address["socket_address"]
    assert address["port_value"] == GRPC_PORT
    (headless,) = [s for s in of_kind(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    assert address["address"] == f"{headless['metadata']['name']}.{NAMESPACE}.svc"
    assert matches(
        headless["spec"]["selector"], gateway(docs)["spec"]["template"]["metadata"]["labels"]
    )
    (listener,) = config["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["hash_policy"] == [{"header": {"header_name": ROUTING_HEADER}}]
    assert route["route"]["timeout"] == "0s"
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    (deployment,) = of_kind(envoy, "Deployment")
    (container,) = pod_spec(deployment)["containers"]
    assert (
        container["ports"][0]["containerPort"]
        == listener["address"]["socket_address"]["port_value"]
    )
    assert deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    # The gateway's NetworkPolicy lets Envoy in.
    (policy,) = [p for p in of_kind(docs, "NetworkPolicy") if component(p) == "gateway"]
    peers = [peer for peer in policy["spec"]["ingress"][0]["from"] if "podSelector" in peer]
    assert any(
        matches(p["podSelector"].get("matchLabels", {}), pod_spec_labels(deployment)) for p in peers
    )

    maglev = yaml.safe_load(
        of_kind(
            [
                d
                for d in render(chart, SCENARIOS["minio-existing-secret-no-persistence"])
                if component(d) == "envoy"
            ],
            "ConfigMap",
        )[0]["data"]["envoy.yaml"]
    )
    assert maglev["static_resources"]["clusters"][0]["lb_policy"] == "MAGLEV"


def pod_spec_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def test_bundled_minio(chart: helm.Chart) -> None:
    docs = render(chart, {"minio": {"enabled": True}})
    minio = [d for d in docs if component(d) in {"minio", "minio-setup"}]
    kinds = sorted(d["kind"] for d in minio)
    assert kinds == [
        "Deployment",
        "Job",
        "NetworkPolicy",
        "PersistentVolumeClaim",
        "Secret",
        "Service",
    ]
    (secret,) = of_kind(minio, "Secret")
    for key in ("root-user", "root-password"):
        assert len(base64.b64decode(secret["data"][key])) >= 20
    (job,) = of_kind(minio, "Job")
    (container,) = pod_spec(job)["containers"]
    assert container["image"].startswith("quay.io/minio/mc:RELEASE.")
    env = {e["name"]: e for e in container["env"]}
    assert env["BUCKET"]["value"] == "lora-gateway"
    assert env["MINIO_URL"]["value"] == gateway_config(docs)["s3_endpoint"]
    assert "mc mb --ignore-existing" in container["command"][-1]
    (service,) = of_kind(minio, "Service")
    assert (
        gateway_config(docs)["s3_endpoint"]
        == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:9000"
    )
    # An existing Secret replaces the generated one; no persistence means an emptyDir.
    docs = render(chart, SCENARIOS["minio-existing-secret-no-persistence"])
    assert of_kind(docs, "Secret") == [
        s for s in of_kind(docs, "Secret") if component(s) == "gateway"
    ]
    assert not of_kind(docs, "PersistentVolumeClaim")


def test_notes_point_at_the_right_target(chart: helm.Chart) -> None:
    notes = render_files(chart, {})["lora-gateway/templates/NOTES.txt"]
    assert f"{RELEASE}-lora-gateway.{NAMESPACE}.svc:50051" in notes
    assert "no tenants are configured" in notes
    notes = render_files(chart, ALL_ON)["lora-gateway/templates/NOTES.txt"]
    assert f"{RELEASE}-lora-gateway-envoy.{NAMESPACE}.svc:50051" in notes
    assert "no tenants are configured" not in notes
