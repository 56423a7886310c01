"""deploy/compose.yaml, parsed (there is no Docker engine in CI): every mounted file exists,
every strangler service runs a valid strangler command, the proxy's config validates and
reaches the demo apps where compose runs them, Prometheus scrapes the admin port and loads
our alert rules, and Grafana is provisioned with the datasource and our dashboard."""

from __future__ import annotations

import json
import posixpath
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.cli import _parser
from proxy.config import Config
from proxy.loader import load
from tests.deploy.common import ALERTS, DASHBOARD, DEPLOY, ROOT

COMPOSE = DEPLOY / "compose.yaml"
STRANGLER_IMAGE = "strangler:dev"
Service = dict[str, Any]


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def services() -> dict[str, Service]:
    found: dict[str, Service] = compose()["services"]
    return found


def bind_mounts(service: Service) -> list[tuple[Path, str, bool]]:
    """(host path, container path, read-only) of the service's bind mounts."""
    mounts = []
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), "use the short syntax: ./HOST:/CONTAINER[:ro]"
        parts = volume.split(":")
        source, target = parts[0], parts[1]
        if not source.startswith((".", "/")):
            assert source in compose().get("volumes", {}), f"undeclared named volume {source}"
            continue
        mounts.append((DEPLOY / source, target, parts[2:] == ["ro"]))
    return mounts


def host_path(service: Service, container_path: str) -> Path:
    """The host file behind a path inside the service's container, through its binds."""
    wanted = PurePosixPath(posixpath.normpath(container_path))
    for host, target, _ in bind_mounts(service):
        target_path = PurePosixPath(target)
        if wanted == target_path:
            return host
        if target_path in wanted.parents:
            return host / wanted.relative_to(target_path)
    raise AssertionError(f"{container_path} is not mounted into the service")


def strangler_command(name: str) -> list[str]:
    service = services()[name]
    assert service["image"] == STRANGLER_IMAGE and "entrypoint" not in service, name
    command: list[str] = service["command"]
    assert isinstance(command, list), f"{name}: use the exec form (a list)"
    return command


def parse(command: list[str]) -> Any:
    try:
        return _parser().parse_args(command)
    except SystemExit as exc:  # argparse exits on an invalid command line
        raise AssertionError(f"not a valid strangler command: {command}") from exc


def proxy_config() -> tuple[Config, Path]:
    args = parse(strangler_command("strangler"))
    path = host_path(services()["strangler"], args.config)
    return load(path), path


def demo_apps() -> dict[str, tuple[str, int]]:
    """compose service -> (demo app, port) for the services running `strangler demo`."""
    apps = {}
    for name, service in services().items():
        if service.get("image") != STRANGLER_IMAGE or "entrypoint" in service:
            continue
        args = parse(strangler_command(name))
        if args.command == "demo":
            assert args.app in ("monolith", "orders"), name
            assert args.host == "0.0.0.0", f"{name}: reachable from the other containers"
            apps[name] = (args.app, args.port)
    return apps


def seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
            return float(text[: -len(unit)]) * units[unit]
    raise AssertionError(f"not a duration: {text}")


# ------------------------------------------------------------------------ the tests


def test_the_stack_has_its_services() -> None:
    assert {"monolith", "orders", "strangler", "prometheus", "grafana"} <= set(services())


def test_every_mounted_host_path_exists() -> None:
    count = 0
    for name, service in services().items():
        for host, target, read_only in bind_mounts(service):
            assert host.exists(), f"{name}: {host} (mounted on {target}) does not exist"
            assert read_only, f"{name}: mount {host} read-only"
            count += 1
    assert count >= 6


def test_the_image_is_built_from_the_dockerfile() -> None:
    built = [s for s in services().values() if s.get("image") == STRANGLER_IMAGE]
    assert len(built) >= 3
    for service in built:
        build = service["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).is_file()
        # the container runs like the Kubernetes pods: read-only, a tmpfs for /tmp
        assert service["read_only"] is True
        assert "/tmp" in service["tmpfs"]


def test_every_strangler_service_runs_a_valid_command() -> None:
    commands = 0
    for name, service in services().items():
        if service.get("image") != STRANGLER_IMAGE:
            continue
        if "entrypoint" in service:
            # the traffic generator: a Python script from a mounted directory
            entrypoint = service["entrypoint"]
            assert entrypoint[0] == "python", name
            script = host_path(service, entrypoint[1])
            assert script.is_file(), script
            compile(script.read_text(), str(script), "exec")  # valid Python
            continue
        parse(strangler_command(name))
        commands += 1
    assert commands >= 3
    assert {app for app, _ in demo_apps().values()} == {"monolith", "orders"}


def test_the_proxy_config_validates_and_reaches_the_demo_apps() -> None:
    config, path = proxy_config()
    assert path == DEPLOY / "config" / "strangler.yaml"
    assert config.admin.host == "0.0.0.0", "Prometheus scrapes the admin port from outside"
    assert config.listen.host == "0.0.0.0"
    apps = demo_apps()
    for backend in config.backends.values():
        url = urlsplit(backend.url)
        assert url.hostname in apps, f"{backend.url}: no compose service runs that host"
        assert url.port == apps[url.hostname][1], f"{backend.url}: the demo app listens elsewhere"


def test_the_proxy_mounts_its_config_directory_and_drains_in_time() -> None:
    service = services()["strangler"]
    config, _ = proxy_config()
    args = parse(strangler_command("strangler"))
    directory = posixpath.dirname(args.config)
    assert any(target == directory for _, target, _ in bind_mounts(service)), (
        "mount the config's directory, not the file, so edits reach the proxy"
    )
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert seconds(service["stop_grace_period"]) > config.shutdown_grace
    published = {str(p).rsplit(":", 2)[-1] for p in service["ports"]}
    assert {str(config.listen.port), str(config.admin.port)} <= published
    assert "STRANGLER_ADMIN_TOKEN" in service["environment"]
    assert config.admin.token_env == "STRANGLER_ADMIN_TOKEN"


def _prometheus() -> tuple[Service, Path, dict[str, Any]]:
    service = services()["prometheus"]
    flags = dict(arg.split("=", 1) for arg in service["command"] if "=" in arg)
    container_config = flags["--config.file"]
    config_path = host_path(service, container_config)
    return service, config_path, yaml.safe_load(config_path.read_text())


def test_prometheus_scrapes_the_admin_port_and_loads_the_alert_rules() -> None:
    service, config_path, prom = _prometheus()
    assert config_path == DEPLOY / "prometheus" / "prometheus.yml"
    config, _ = proxy_config()
    targets = [
        target
        for job in prom["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
        if job.get("metrics_path", "/metrics") == "/metrics"
    ]
    assert f"strangler:{config.admin.port}" in targets
    jobs = [job["job_name"] for job in prom["scrape_configs"]]
    assert any(job.startswith("strangler") for job in jobs), "StranglerTargetDown's job=~"
    container_dir = posixpath.dirname(
        dict(arg.split("=", 1) for arg in service["command"] if "=" in arg)["--config.file"]
    )
    rule_files = [
        host_path(service, posixpath.join(container_dir, rule)) for rule in prom["rule_files"]
    ]
    assert ALERTS in rule_files


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make system-deps` installs Debian's prometheus"
    _, config_path, _ = _prometheus()
    result = subprocess.run(
        [promtool, "check", "config", str(config_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard() -> None:
    service = services()["grafana"]
    provisioning = host_path(service, "/etc/grafana/provisioning")
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    (prometheus,) = [d for d in datasources if d["type"] == "prometheus"]
    url = urlsplit(prometheus["url"])
    assert url.hostname == "prometheus" and url.hostname in services()
    assert f"{url.port}:{url.port}" in services()["prometheus"]["ports"]

    providers = yaml.safe_load((provisioning / "dashboards" / "strangler.yaml").read_text())[
        "providers"
    ]
    (provider,) = providers
    assert provider["type"] == "file"
    folder = provider["options"]["path"]
    assert host_path(service, f"{folder}/{DASHBOARD.name}") == DASHBOARD
    home = service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(service, home) == DASHBOARD
    board = json.loads(DASHBOARD.read_text())
    (variable,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == prometheus["type"]


@pytest.mark.parametrize("name", ["prometheus", "grafana"])
def test_third_party_images_are_pinned(name: str) -> None:
    image = services()[name]["image"]
    tag = image.rpartition(":")[2]
    assert ":" in image and tag != "latest" and any(c.isdigit() for c in tag), image
