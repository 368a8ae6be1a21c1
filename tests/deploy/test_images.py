"""The images' build and smoke scripts (deploy/images/, deploy/images.mk).

The offline checks read the scripts and run them in their dry-run forms: which command each
target is built with, on each tool. The `images` test runs the graph from the built images
(`make images` first); it is skipped where they are not built, or where it cannot run (it needs
root and buildah)."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.test_docker import SERVICE_TARGETS, lineage, stages, venv_stage

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
BUILD = IMAGES / "build.sh"
BASE = IMAGES / "base.sh"
SMOKE = IMAGES / "smoke.py"
CPU_SERVICES = [target for target, service in SERVICE_TARGETS.items() if target == service]
LOCAL_BASE = "localhost/styleblend-python:3.11-bookworm"


def smoke_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("images_smoke", SMOKE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def dry_run(tmp_path: Path, *targets: str, **env: str) -> dict[str, list[str]]:
    """build.sh --dry-run: the command for each target, as words."""
    result = subprocess.run(
        ["bash", str(BUILD), "--dry-run", *targets],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "WORK": str(tmp_path / "work"),
            "LOG_DIR": str(tmp_path / "logs"),
            "PYTHON": sys.executable,
            # Never probe the network from a test: name the index.
            "TORCH_INDEX_URL": "https://example.invalid/whl/cpu",
            **env,
        },
    )
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]
    assert len(commands) == len(targets), result.stdout
    return {command[command.index("--target") + 1]: command for command in commands}


def option(command: list[str], name: str) -> list[str]:
    return [command[i + 1] for i, word in enumerate(command) if word == name]


def test_the_makefile_includes_the_image_targets() -> None:
    makefile = (ROOT / "Makefile").read_text().splitlines()
    assert "include deploy/images.mk" in makefile
    result = subprocess.run(
        ["make", "-n", "images", "image-base", "image-smoke", "IMAGE_TOOL=buildah"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(f"deploy/images/base.sh {LOCAL_BASE}" in line for line in lines)
    (build,) = [line for line in lines if "deploy/images/build.sh" in line]
    assert build.split("deploy/images/build.sh")[1].split() == CPU_SERVICES
    assert f"PYTHON_IMAGE={LOCAL_BASE}" in build
    assert any("deploy/images/smoke.py" in line for line in lines)


def test_an_upstream_base_needs_no_local_base() -> None:
    result = subprocess.run(
        ["make", "-n", "images", "IMAGE_TOOL=docker", "PYTHON_IMAGE=python:3.11-slim-bookworm"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "base.sh" not in result.stdout
    assert "IMAGE_TOOL=docker" in result.stdout


def test_each_target_is_built_with_its_own_target_and_tag(tmp_path: Path) -> None:
    for tool in ("buildah", "podman", "docker"):
        commands = dry_run(
            tmp_path, *CPU_SERVICES, IMAGE_TOOL=tool, PIP_MOUNTS="0", PYTHON_IMAGE=LOCAL_BASE
        )
        assert sorted(commands) == sorted(CPU_SERVICES)
        for target, command in commands.items():
            assert command[0] == tool, command
            assert option(command, "-f") == ["deploy/docker/Dockerfile"]
            assert option(command, "-t") == [f"localhost/styleblend:0.1.0-{target}"]
            assert f"PYTHON_IMAGE={LOCAL_BASE}" in option(command, "--build-arg")
            assert command[-1] == "."  # the repository root is the context
            if tool == "docker":  # BuildKit finds Dockerfile.dockerignore by itself
                assert "--ignorefile" not in command and "--volume" not in command
            else:
                assert option(command, "--ignorefile") == ["deploy/docker/Dockerfile.dockerignore"]
                assert {"--layers", "--force-rm"} <= set(command)
        if tool == "buildah":  # podman cannot start containers everywhere; buildah's chroot can
            assert option(commands["gateway"], "--isolation") == ["chroot"]


def test_torch_comes_from_the_index_only_where_the_dockerfile_builds_it(tmp_path: Path) -> None:
    targets = [name for name in stages() if not name.startswith(("build-", "runtime-"))]
    targets = [name for name in targets if name not in {"protos", "source", "uv"}]
    assert set(CPU_SERVICES) <= set(targets)
    commands = dry_run(tmp_path, *targets, IMAGE_TOOL="buildah", PIP_MOUNTS="0")
    for target, command in commands.items():
        on_cpu_torch = "build-torch-cpu" in lineage(venv_stage(target))
        passed = [a for a in option(command, "--build-arg") if a.startswith("TORCH_INDEX_URL=")]
        assert passed == (
            ["TORCH_INDEX_URL=https://example.invalid/whl/cpu"] if on_cpu_torch else []
        )


def test_unset_bases_are_the_dockerfiles_with_their_registry(tmp_path: Path) -> None:
    """Docker resolves python:… itself; buildah and podman resolve no short name without a
    registries.conf, so they are given the Dockerfile's defaults with docker.io in front."""
    found = stages()
    targets = ["gateway", "reconstruction", "features-gpu", "gpu"]
    docker = dry_run(tmp_path, *targets, IMAGE_TOOL="docker", PIP_MOUNTS="0")
    assert not any(
        "PYTHON_IMAGE=" in " ".join(c) or "CUDA_IMAGE=" in " ".join(c) for c in docker.values()
    )
    buildah = dry_run(tmp_path, *targets, IMAGE_TOOL="buildah", PIP_MOUNTS="0")
    for target, command in buildah.items():
        args = option(command, "--build-arg")
        assert "PYTHON_IMAGE=docker.io/library/python:3.11-slim-bookworm" in args, target
        on_cuda = found[lineage(target)[-1]][0].startswith("FROM ${CUDA_IMAGE}")
        cuda = [a for a in args if a.startswith("CUDA_IMAGE=")]
        assert cuda == (
            ["CUDA_IMAGE=docker.io/nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04"] if on_cuda else []
        ), target


def test_the_build_gets_this_machines_pip_settings_read_only(tmp_path: Path) -> None:
    wheels, index = tmp_path / "wheels", tmp_path / "index"
    (index / "simple").mkdir(parents=True)
    wheels.mkdir()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    config = tmp_path / "pip.conf"
    config.write_text(
        f"[global]\nfind-links = {wheels}\nextra-index-url = file://{index}/simple\n"
        f"constraint = {constraints}\n"
    )
    commands = dry_run(tmp_path, "gateway", IMAGE_TOOL="buildah", PIP_CONFIG_FILE=str(config))
    volumes = option(commands["gateway"], "--volume")
    # the local index's parent: its simple/ pages link to ../files
    for path in (wheels, index, constraints):
        assert f"{path}:{path}:ro" in volumes, volumes
    written = tmp_path / "work" / "pip.conf"
    assert f"{written}:/etc/pip.conf:ro" in volumes
    assert f"find-links = {wheels}" in written.read_text()
    # Docker's build has no bind mounts: nothing of this machine's goes in.
    commands = dry_run(tmp_path, "gateway", IMAGE_TOOL="docker", PIP_CONFIG_FILE=str(config))
    assert "--volume" not in commands["gateway"]


def test_the_scripts_stop_at_the_first_error() -> None:
    for script in (BUILD, BASE):
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        assert "\nset -euo pipefail\n" in text, script
        assert os.access(script, os.X_OK), script
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    base = BASE.read_text()
    # What makes Debian's Python look like python:3.11-slim to the Dockerfile.
    for needed in ("python3-venv", "python3-pip", "usr/local/bin/python", "EXTERNALLY-MANAGED"):
        assert needed in base, needed


def test_the_smoke_checks_what_deploy_readme_promises() -> None:
    smoke = smoke_module()
    assert sorted(smoke.SERVICES) == sorted(CPU_SERVICES)
    assert smoke.SERVICES[-1] == "gateway"  # started last, after what it calls
    for service in ("gateway", "blending"):
        assert {"torch", "onnxruntime", "onnx"} <= smoke.FORBIDDEN[service]
        assert set(smoke.NOT_MAPPED[service]) == {"libtorch", "onnxruntime"}
    assert "torch" in smoke.FORBIDDEN["features"] and "onnxruntime" in smoke.REQUIRED["features"]
    assert "onnxruntime" in smoke.FORBIDDEN["reconstruction"]
    assert "torch" in smoke.REQUIRED["reconstruction"]
    assert {"features", "reconstruction"} == smoke.NEEDS_MODELS


def images_missing() -> str | None:
    """Why the images smoke test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (buildah mount, chroot)"
    if shutil.which("buildah") is None or shutil.which("unshare") is None:
        return "needs buildah and unshare"
    if not (ROOT / "models" / "vgg19" / "model.onnx").is_file():
        return "no models/vgg19 export (make models)"
    for service in CPU_SERVICES:
        image = f"localhost/styleblend:0.1.0-{service}"
        found = subprocess.run(
            ["buildah", "inspect", "--type", "image", image], capture_output=True, check=False
        )
        if found.returncode != 0:
            return f"{image} is not built (make images)"
    return None


@pytest.mark.images
@pytest.mark.timeout(900)
def test_the_graph_runs_from_its_images(tmp_path: Path) -> None:
    reason = images_missing()
    if reason is not None:
        pytest.skip(reason)
    styleblend = Path(sys.executable).parent / "styleblend"
    result = subprocess.run(
        [sys.executable, str(SMOKE), "--out", str(tmp_path), "--styleblend", str(styleblend)],
        capture_output=True,
        text=True,
        timeout=850,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["checks"] == ["contents", "blend", "processes"]
    assert report["misses"] == []
    assert report["output"]["size"][0] > 0
    gateway = report["images"]["gateway"]
    assert gateway["loaded"] == {"libtorch": [], "onnxruntime": []}
    assert report["images"]["reconstruction"]["loaded"]["libtorch"]
    for service, facts in report["images"].items():
        assert facts["uid"] == 10001, service
        assert facts["exe"].startswith(facts["root"]), service
