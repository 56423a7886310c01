"""deploy/k8s: every manifest validates offline against the Kubernetes schemas, and the
manifests agree with each other and with the proxy's config (selectors, labels, ports, probe
paths, grace periods, the ConfigMap mount).

kustomize is not installed in CI, so `build` below does what kustomize does with the
features these files use (resources, components, strategic-merge patches, namespace,
images) and refuses any other kustomization field rather than ignore it.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator

from proxy.config import Config
from proxy.loader import load_text
from tests.deploy.common import DEPLOY

K8S = DEPLOY / "k8s"
BASE = K8S
OVERLAY = K8S / "overlays" / "example"
# The oldest Kubernetes still commonly run, and the newest the schemas know.
KUBE_VERSIONS = ("1.29", kubernetes_validate.latest_version())
SUPPORTED = {
    "Kustomization": {
        "apiVersion",
        "kind",
        "resources",
        "components",
        "patches",
        "namespace",
        "images",
    },
    "Component": {"apiVersion", "kind", "resources", "patches"},
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
CONFIG_DIR = "/etc/strangler"
CONFIG_KEY = "strangler.yaml"

Manifest = dict[str, Any]


# ------------------------------------------------------------------ a small kustomize


def _read_kustomization(directory: Path) -> dict[str, Any]:
    path = directory / "kustomization.yaml"
    assert path.is_file(), f"{directory} has no kustomization.yaml"
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    kind = doc.get("kind", "Kustomization")
    unknown = set(doc) - SUPPORTED[kind]
    assert not unknown, f"{path}: fields this test's kustomize does not implement: {unknown}"
    return doc


def _load_docs(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _key(doc: Manifest) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize does it for these files: maps merge key by key, lists of
    maps with a `name` merge item by item on it, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        merged_list = [copy.deepcopy(i) for i in base]
        for item in patch:
            for index, existing in enumerate(merged_list):
                if existing["name"] == item["name"]:
                    merged_list[index] = _merge(existing, item)
                    break
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def _apply_patches(
    directory: Path, patches: list[dict[str, Any]], docs: list[Manifest]
) -> list[Manifest]:
    for entry in patches:
        assert set(entry) == {"path"}, f"{directory}: only `patches: [{{path: FILE}}]` is used"
        for patch in _load_docs(directory / entry["path"]):
            targets = [i for i, doc in enumerate(docs) if _key(doc) == _key(patch)]
            assert len(targets) == 1, (
                f"{directory / entry['path']}: the patch targets {_key(patch)}, "
                f"which the resources it applies to do not have exactly once"
            )
            docs[targets[0]] = _merge(docs[targets[0]], patch)
    return docs


def build(directory: Path) -> list[Manifest]:
    """The manifests `kustomize build directory` would print, in resource order."""
    doc = _read_kustomization(directory)
    docs: list[Manifest] = []
    for resource in doc.get("resources", []):
        path = (directory / resource).resolve()
        docs.extend(build(path) if path.is_dir() else _load_docs(path))
    for component in doc.get("components", []):
        path = (directory / component).resolve()
        comp = _read_kustomization(path)
        assert comp["kind"] == "Component", path
        for resource in comp.get("resources", []):
            docs.extend(_load_docs(path / resource))
        docs = _apply_patches(path, comp.get("patches", []), docs)
    docs = _apply_patches(directory, doc.get("patches", []), docs)
    if "namespace" in doc:
        for item in docs:
            if item["kind"] not in CLUSTER_SCOPED:
                item["metadata"]["namespace"] = doc["namespace"]
    for image in doc.get("images", []):
        for item in docs:
            for container in _containers(item):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    new_name = image.get("newName", name)
                    container["image"] = f"{new_name}:{image.get('newTag', tag)}"
    keys = [_key(item) for item in docs]
    assert len(keys) == len(set(keys)), f"{directory}: duplicate resources {keys}"
    return docs


# ------------------------------------------------------------------ helpers


def _containers(doc: Manifest) -> list[dict[str, Any]]:
    if doc["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
        return []
    containers: list[dict[str, Any]] = doc["spec"]["template"]["spec"]["containers"]
    return containers


def one(docs: list[Manifest], kind: str, name: str) -> Manifest:
    found = [d for d in docs if _key(d) == (kind, name)]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def of_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def proxy_deployment(docs: list[Manifest]) -> Manifest:
    return one(docs, "Deployment", "strangler")


def proxy_container(docs: list[Manifest]) -> dict[str, Any]:
    containers = _containers(proxy_deployment(docs))
    assert [c["name"] for c in containers] == ["strangler"]
    return containers[0]


def container_port(container: dict[str, Any], port: str | int) -> int:
    """The containerPort a Service targetPort or a probe port names."""
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    raise AssertionError(f"container {container['name']} has no port {port!r}")


def config_map_volume(docs: list[Manifest]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, its mount) of the ConfigMap holding the routes."""
    pod = proxy_deployment(docs)["spec"]["template"]["spec"]
    volumes = [v for v in pod["volumes"] if "configMap" in v]
    assert len(volumes) == 1, volumes
    mounts = [m for m in proxy_container(docs)["volumeMounts"] if m["name"] == volumes[0]["name"]]
    assert len(mounts) == 1, mounts
    return volumes[0], mounts[0]


def proxy_config(docs: list[Manifest]) -> Config:
    volume, _ = config_map_volume(docs)
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
    return load_text(config_map["data"][CONFIG_KEY], f"ConfigMap {volume['configMap']['name']}")


def prestop_seconds(container: dict[str, Any]) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


BUILDS = {"base": BASE, "overlay": OVERLAY}


@pytest.fixture(scope="module", params=sorted(BUILDS))
def docs(request: pytest.FixtureRequest) -> list[Manifest]:
    return build(BUILDS[request.param])


# ------------------------------------------------------------------ schema validation

# The Prometheus Operator's CRD is not in the Kubernetes schemas; these are the fields of
# monitoring.coreos.com/v1 ServiceMonitor the component uses, checked strictly.
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                    "additionalProperties": False,
                },
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {
                                "type": "string",
                                "pattern": "^[0-9]+(ms|s|m|h)$",
                            },
                            "scheme": {"enum": ["http", "https"]},
                        },
                        "required": ["port"],
                    },
                },
            },
        },
    },
}


def _all_manifest_files() -> list[Path]:
    files = sorted(K8S.rglob("*.yaml"))
    return [f for f in files if f.name != "kustomization.yaml"]


def test_every_manifest_file_is_built_by_some_kustomization() -> None:
    built = {(d["kind"], d["metadata"]["name"]) for d in build(BASE) + build(OVERLAY)}
    for path in _all_manifest_files():
        for doc in _load_docs(path):
            assert _key(doc) in built, f"{path}: {_key(doc)} is in no kustomization"


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for name, directory in BUILDS.items():
        for doc in build(directory):
            where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                errors = list(Draft202012Validator(SERVICE_MONITOR_SCHEMA).iter_errors(doc))
                assert not errors, f"{where}: {[e.message for e in errors]}"
            else:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as err:
                    path = ".".join(str(p) for p in err.path)
                    message = f"{where} (Kubernetes {version}): {path}: {err.message}"
                    raise AssertionError(message) from None
            checked += 1
    assert checked >= 10


def test_every_patch_names_its_target() -> None:
    """A patch file alone is a partial manifest: the schema test validates the patched
    result. Here: every patch says which kind and name it patches."""
    for path in K8S.rglob("kustomization.yaml"):
        doc = yaml.safe_load(path.read_text())
        for entry in doc.get("patches", []):
            for patch in _load_docs(path.parent / entry["path"]):
                assert patch.get("kind") and patch.get("metadata", {}).get("name"), patch


# ------------------------------------------------------------------ the base's shape


def test_the_base_has_the_expected_resources() -> None:
    kinds = {_key(d) for d in build(BASE)}
    assert kinds == {
        ("ConfigMap", "strangler-config"),
        ("Deployment", "strangler"),
        ("Service", "strangler"),
        ("HorizontalPodAutoscaler", "strangler"),
        ("PodDisruptionBudget", "strangler"),
    }


def test_overlay_patches_apply_to_resources_that_exist() -> None:
    # build() fails when a patch targets a name the resources do not have; check the
    # overlay really changed what it meant to change.
    base = build(BASE)
    overlay = build(OVERLAY)
    assert proxy_config(base) != proxy_config(overlay)
    config = proxy_config(overlay)
    legacy = urlsplit(config.backends[config.legacy].url)
    assert legacy.hostname and legacy.hostname.endswith(".svc.cluster.local"), legacy
    assert proxy_container(overlay)["image"].startswith("registry.example.com/")
    assert all(d["metadata"].get("namespace") == "shop" for d in overlay)
    annotations = proxy_deployment(overlay)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false"  # the ServiceMonitor scrapes


def test_deployment_runs_at_least_two_replicas(docs: list[Manifest]) -> None:
    deployment = proxy_deployment(docs)
    assert deployment["spec"]["replicas"] >= 2
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_selectors_match_the_pod_labels(docs: list[Manifest]) -> None:
    deployment = proxy_deployment(docs)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selects(selector, pod_labels)
    for doc in of_kind(docs, "Deployment"):
        assert selects(
            doc["spec"]["selector"]["matchLabels"], doc["spec"]["template"]["metadata"]["labels"]
        ), doc["metadata"]["name"]
    for service in of_kind(docs, "Service"):
        chosen = [
            d
            for d in of_kind(docs, "Deployment")
            if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(chosen) == 1, f"Service {service['metadata']['name']} selects {chosen}"
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert all(c["labelSelector"]["matchLabels"] == selector for c in spread)


def test_services_target_declared_container_ports(docs: list[Manifest]) -> None:
    config = proxy_config(docs)
    container = proxy_container(docs)
    assert container_port(container, "http") == config.listen.port
    assert container_port(container, "admin") == config.admin.port
    for service in of_kind(docs, "Service"):
        (deployment,) = [
            d
            for d in of_kind(docs, "Deployment")
            if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        (target_container,) = _containers(deployment)
        for port in service["spec"]["ports"]:
            container_port(target_container, port["targetPort"])
    # SPEC §10: the main Service carries client traffic only, never the admin port
    main = one(docs, "Service", "strangler")
    targets = {container_port(container, p["targetPort"]) for p in main["spec"]["ports"]}
    assert targets == {config.listen.port}


def test_probes_hit_healthz_and_readyz_on_the_admin_port(docs: list[Manifest]) -> None:
    config = proxy_config(docs)
    assert config.admin.host == "0.0.0.0", (
        "probes and Prometheus reach the admin port on the pod IP"
    )
    container = proxy_container(docs)
    probes = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in probes.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(container, get["port"]) == config.admin.port, probe


def test_termination_grace_covers_prestop_and_shutdown_grace(docs: list[Manifest]) -> None:
    config = proxy_config(docs)
    pod = proxy_deployment(docs)["spec"]["template"]["spec"]
    pre_stop = prestop_seconds(proxy_container(docs))
    assert pre_stop >= 5, "the preStop delay lets endpoints and kube-proxy forget the pod"
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config.shutdown_grace


def test_containers_are_locked_down(docs: list[Manifest]) -> None:
    for deployment in of_kind(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        name = deployment["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"].get("runAsUser", 1) != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in _containers(deployment):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["runAsNonRoot"] is True, name
            assert ctx.get("privileged", False) is False, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            resources = container["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), (name, kind)


def test_config_map_is_mounted_as_a_directory_and_read_by_the_proxy(
    docs: list[Manifest],
) -> None:
    volume, mount = config_map_volume(docs)
    assert "subPath" not in mount and "subPathExpr" not in mount, (
        "a subPath mount never sees ConfigMap updates: mount the directory"
    )
    assert mount["mountPath"] == CONFIG_DIR
    assert mount.get("readOnly") is True
    assert "items" not in volume["configMap"], "the file keeps the ConfigMap's key as its name"
    one(docs, "ConfigMap", volume["configMap"]["name"])
    args = proxy_container(docs)["args"]
    assert args[0] == "run"
    config_arg = args[args.index("-c") + 1]
    assert config_arg == f"{mount['mountPath']}/{CONFIG_KEY}", shlex.join(args)


def test_tmp_is_a_writable_empty_dir(docs: list[Manifest]) -> None:
    pod = proxy_deployment(docs)["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in proxy_container(docs)["volumeMounts"]}
    assert "/tmp" in mounts and not mounts["/tmp"].get("readOnly", False)
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts["/tmp"]["name"]]
    assert "emptyDir" in volume


def test_the_routes_in_the_config_map_validate(docs: list[Manifest]) -> None:
    for config_map in of_kind(docs, "ConfigMap"):
        for key, text in config_map["data"].items():
            if key.endswith((".yaml", ".yml")):
                load_text(text, f"{config_map['metadata']['name']}/{key}")


def test_hpa_scales_on_cpu_and_never_below_two(docs: list[Manifest]) -> None:
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    resources = [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert "cpu" in resources
    assert "cpu" in proxy_container(docs)["resources"]["requests"], "utilization needs a request"


def test_pdb_leaves_a_replica_up(docs: list[Manifest]) -> None:
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    spec = pdb["spec"]
    replicas = proxy_deployment(docs)["spec"]["replicas"]
    if "maxUnavailable" in spec:
        assert 0 < spec["maxUnavailable"] < replicas
    else:
        assert 0 < spec["minAvailable"] < replicas


def test_prometheus_can_scrape_the_admin_port(docs: list[Manifest]) -> None:
    config = proxy_config(docs)
    annotations = proxy_deployment(docs)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.admin.port)
    assert annotations["prometheus.io/path"] == "/metrics"
    for monitor in of_kind(docs, "ServiceMonitor"):
        services = [
            s
            for s in of_kind(docs, "Service")
            if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(services) == 1, services
        (service,) = services
        assert service["metadata"]["name"].startswith("strangler"), "StranglerTargetDown's job"
        names = {p["name"]: p for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            port = names[endpoint["port"]]
            assert container_port(proxy_container(docs), port["targetPort"]) == config.admin.port
            assert endpoint["path"] == "/metrics"


def test_breaker_storage_points_at_a_service_that_exists(docs: list[Manifest]) -> None:
    config = proxy_config(docs)
    storages = {config.defaults.breaker.storage} | {
        r.breaker.storage for r in config.routes if r.breaker is not None
    }
    for storage in storages - {None}:
        assert storage is not None
        url = urlsplit(storage)
        service = one(docs, "Service", str(url.hostname))
        assert url.port in {p["port"] for p in service["spec"]["ports"]}
