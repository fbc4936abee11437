#!/usr/bin/env python3
"""Renders the constellation-services chart with Helm (helm-python-sdk bundles Helm's Go SDK),
lints it, and validates every rendered manifest with kubernetes-validate (strict schemas) for
each Kubernetes version given; then checks the chart's own promises (non-root, read-only root
filesystem, no capabilities, probes on the health endpoints, resource requests, no API token,
no RBAC rules). Offline. Exit code 1 with every finding listed."""

import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml

HERE = Path(__file__).resolve().parent
CHART = HERE / "constellation-services"
VALUE_SETS = {"defaults": {}, "values-full.yaml": yaml.safe_load((HERE / "test/values-full.yaml").read_text())}
VERSIONS = sys.argv[1:] or ["1.30.0", "1.37.0"]

failures = []


def fail(message):
    failures.append(message)
    print("FAIL:", message)


def check_daemonset(where, ds):
    spec = ds["spec"]["template"]["spec"]
    name = ds["metadata"]["name"]
    pod_sec = spec.get("securityContext", {})
    if pod_sec.get("runAsNonRoot") is not True or not pod_sec.get("runAsUser"):
        fail(f"{where} {name}: pod must run as a non-root user")
    if spec.get("automountServiceAccountToken") is not False:
        fail(f"{where} {name}: the API token must not be mounted")
    tolerated = {t.get("key") for t in spec.get("tolerations", [])}
    if "node-role.kubernetes.io/control-plane" not in tolerated:
        fail(f"{where} {name}: no toleration for control-plane nodes")
    for c in spec["containers"]:
        sec = c.get("securityContext", {})
        if sec.get("readOnlyRootFilesystem") is not True:
            fail(f"{where} {name}/{c['name']}: root filesystem must be read-only")
        if sec.get("allowPrivilegeEscalation") is not False:
            fail(f"{where} {name}/{c['name']}: privilege escalation must be off")
        if sec.get("capabilities", {}).get("drop") != ["ALL"]:
            fail(f"{where} {name}/{c['name']}: must drop all capabilities")
        if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
            fail(f"{where} {name}/{c['name']}: liveness probe must be GET /healthz")
        if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
            fail(f"{where} {name}/{c['name']}: readiness probe must be GET /readyz")
        requests = c.get("resources", {}).get("requests", {})
        if not requests.get("cpu") or not requests.get("memory"):
            fail(f"{where} {name}/{c['name']}: cpu and memory requests are required")
        for arg in c.get("args", []):
            for word in ("secret", "key=", "password", "token"):
                if word in arg.lower():
                    fail(f"{where} {name}/{c['name']}: flag {arg!r} looks like a secret")
    for v in spec.get("volumes", []):
        if "secret" in v and v["secret"].get("defaultMode", 0o644) & 0o007:
            fail(f"{where} {name}: secret volume {v['name']} is readable by every user")


def main():
    for label, values in VALUE_SETS.items():
        for version in VERSIONS:
            report = helm_python.lint(str(CHART), values, strict=True, kube_version=f"v{version}")
            for m in report["messages"]:
                if m["severity"] >= 2:
                    fail(f"helm lint ({label}, {version}): {m['path']}: {m['error']}")
            for e in report["errors"]:
                fail(f"helm lint ({label}, {version}): {e}")
        rendered = helm_python.Chart.load(str(CHART)).render(
            values, name="constellation", namespace="kube-system", is_install=True
        )
        objects = []
        for path, text in sorted(rendered.items()):
            for doc in yaml.safe_load_all(text):
                if doc:
                    objects.append((path, doc))
        kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for _, o in objects)
        print(f"{label}: {len(objects)} manifests: {', '.join(kinds)}")
        for path, obj in objects:
            where = f"{label}:{path}"
            for version in VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except Exception as e:  # noqa: BLE001 - every validation error is a finding
                    fail(f"{where} {obj['kind']}/{obj['metadata']['name']} (k8s {version}): {e}")
            if obj["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"):
                fail(f"{where}: {obj['kind']} rendered; the daemons need no API access")
            if obj["kind"] == "DaemonSet":
                check_daemonset(where, obj)
            if obj["kind"] == "ConfigMap":
                for key, value in obj.get("data", {}).items():
                    try:
                        yaml.safe_load(value)
                    except yaml.YAMLError as e:
                        fail(f"{where}: ConfigMap key {key} is not YAML/JSON: {e}")
        if sum(1 for _, o in objects if o["kind"] == "DaemonSet") != 3:
            fail(f"{label}: expected 3 DaemonSets")
    if failures:
        print(f"{len(failures)} finding(s)")
        return 1
    print(f"chart OK: lint --strict and kubernetes-validate --strict for {', '.join(VERSIONS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
