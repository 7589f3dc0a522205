"""The Kubernetes manifests (deploy/kubernetes) validate and agree with the service they deploy.

Validation is offline, against the schemas of Kubernetes 1.37 that ``kubernetes-validate``
bundles, in strict mode (an unknown field is an error). The cross-checks catch what a schema
cannot: settings the service does not have, probe paths it does not serve, a grace period shorter
than its drain, an autoscaling metric it does not export.
"""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.37.0"  # named in the README ("Running at scale")


def manifests() -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"}


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in manifests().values() if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("name", sorted(manifests()))
def test_manifest_validates_against_the_kubernetes_schema(name: str) -> None:
    kubernetes_validate.validate(manifests()[name], K8S_VERSION, strict=True)


def test_the_validator_catches_mistakes() -> None:
    """The check above can fail: a wrong type and an unknown field are both refused."""
    bad = by_kind("Deployment")
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = by_kind("Service")
    bad["spec"]["prots"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(manifests())


def test_configmap_holds_real_settings() -> None:
    data = by_kind("ConfigMap")["data"]
    fields = {name.upper() for name in Settings.model_fields}
    for key in data:
        assert key.startswith("ASR_") and key[4:] in fields, f"{key} is not a setting of the service"
    Settings(**{k[4:].lower(): v for k, v in data.items()})  # and the values parse


def test_deployment_matches_the_service() -> None:
    from service.app import create_app

    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    routes = set(create_app(Settings()).openapi()["paths"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] in routes, probe
    assert c["ports"][0]["containerPort"] == Settings().port
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text())
    assert uid and pod["securityContext"]["runAsUser"] == int(uid.group(1))
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # uploads spool to /tmp
    config = by_kind("ConfigMap")["data"]
    drain = float(config["ASR_SHUTDOWN_TIMEOUT_S"]) + float(config.get("ASR_DRAIN_DELAY_S", 0))
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop


def test_autoscaler_metric_is_exported() -> None:
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    m = Metrics()
    exported = generate_latest(m.registry).decode()
    for metric in by_kind("HorizontalPodAutoscaler")["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert f"# TYPE {metric['pods']['metric']['name']} " in exported
