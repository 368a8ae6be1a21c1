"""Run styleblend's graph from its built images and pass a real blend through it.

    python deploy/images/smoke.py [--repo localhost/styleblend] [--version 0.1.0]
                                  [--models models] [--out out/images] [--contents-only]

Each service runs its image's own entry point and command (`python -m services NAME`), from
that image's file system, as the image's user, with the image's environment: the image is
mounted with buildah, and the process is chrooted into it, in a mount namespace of its own
(so the /proc, /dev, /sys and /models bind mounts go when it exits). It shares the host's
network, so the services talk on loopback. No container engine has to run (podman cannot start
containers on some machines; buildah can mount images anywhere it runs as root).

It checks, and fails on any miss:
- what each image holds, listed by the image's own Python (importlib.metadata): the gateway and
  blending images neither PyTorch nor ONNX Runtime (nor onnx), features no PyTorch,
  reconstruction no ONNX Runtime; and each holds what its service needs;
- a blend through the gateway (the `styleblend` command of the host's venv) writes an image
  that decodes;
- each process runs from its own image (its /proc/PID/root), as the image's user, and has
  mapped only its own runtime: the gateway neither libtorch nor onnxruntime (/proc/PID/maps).

The features and reconstruction services read the exported model from the host's models/
(`make models`), bound read-only at the images' STYLEBLEND_MODEL_DIR; no weights are in the
images. Writes OUT/smoke.png, OUT/report.json and one log per service under OUT/logs/.
Needs root (mounts, chroot) and buildah."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("features", "blending", "reconstruction", "gateway")  # the order they start in
TORCH = {"torch", "torchvision"}
ONNX_RUNTIME = {"onnxruntime", "onnxruntime-gpu"}
# What each image must not hold, and must hold, by distribution name.
FORBIDDEN = {
    "gateway": TORCH | ONNX_RUNTIME | {"onnx"},
    "blending": TORCH | ONNX_RUNTIME | {"onnx"},
    "features": TORCH,
    "reconstruction": ONNX_RUNTIME,
}
REQUIRED = {
    "gateway": {"styleblend", "grpcio", "aiohttp"},
    "blending": {"styleblend", "grpcio", "numpy"},
    "features": {"styleblend", "grpcio", "onnxruntime", "onnx"},
    "reconstruction": {"styleblend", "grpcio", "torch", "torchvision"},
}
# What each process must not map, and must map (the way of looking is checked where the
# libraries must be), as in tests/reliability/test_modules.py.
LIBTORCH, LIBORT = "libtorch", "onnxruntime"
NOT_MAPPED = {
    "gateway": (LIBTORCH, LIBORT),
    "blending": (LIBTORCH, LIBORT),
    "features": (LIBTORCH,),
    "reconstruction": (LIBORT,),
}
MAPPED = {"features": (LIBORT,), "reconstruction": (LIBTORCH,)}
NEEDS_MODELS = {"features", "reconstruction"}
# Binds the host's kernel interfaces and the models into the image, then runs the command
# chrooted, as the image's user, in the image's working directory. Every step execs, so the
# PID the caller sees is the service's.
LAUNCH = r"""
set -eu
root=$1 user=$2 workdir=$3 models=$4 target=$5
shift 5
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
if [ -n "$models" ]; then
    mkdir -p "$root$target"
    mount --bind "$models" "$root$target"
    mount -o remount,bind,ro "$root$target"
fi
exec chroot --userspec="$user" "$root" /bin/sh -c 'cd "$0" && exec "$@"' "$workdir" "$@"
"""
LIST_DISTRIBUTIONS = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
)


def normalised(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def run(argv: list[str], **kwargs: Any) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv)} exited {result.returncode}:\n{result.stderr}")
    return result.stdout


@dataclass
class Mounted:
    """One image, mounted through a buildah working container of our own."""

    service: str
    image: str
    container: str
    root: Path
    config: dict[str, Any]
    size: str
    image_id: str
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in self.config.get("Env") or [])
        return {key: value for key, value in pairs}

    @property
    def argv(self) -> list[str]:
        return [*(self.config.get("Entrypoint") or []), *(self.config.get("Cmd") or [])]

    def chroot(self, *argv: str) -> str:
        """Run a short command in the image as root (no mounts needed), with its PATH."""
        path = self.env.get("PATH", "/usr/bin:/bin")
        return run(["chroot", str(self.root), "/usr/bin/env", "-i", f"PATH={path}", *argv])


def mount(service: str, image: str) -> Mounted:
    # The whole inspection: older buildah (1.28, Debian 12's) has no `json` template function.
    config = json.loads(run(["buildah", "inspect", "--type", "image", image]))["OCIv1"]["config"]
    found = run(["buildah", "images", "--format", "{{.ID}} {{.Size}}", image]).split(maxsplit=1)
    container = f"styleblend-smoke-{service}-{os.getpid()}"
    run(["buildah", "from", "--pull-never", "--name", container, image])
    root = Path(run(["buildah", "mount", container]).strip())
    return Mounted(service, image, container, root, config, found[1].strip(), found[0])


def unmount(mounted: Mounted) -> None:
    subprocess.run(["buildah", "umount", mounted.container], capture_output=True, check=False)
    subprocess.run(["buildah", "rm", mounted.container], capture_output=True, check=False)


def check_contents(mounted: Mounted) -> list[str]:
    """The image's distributions, as its own Python lists them; the misses, if any."""
    python = mounted.argv[0]
    held = json.loads(mounted.chroot(python, "-c", LIST_DISTRIBUTIONS))
    names = {normalised(name) for name in held}
    mounted.facts["distributions"] = dict(sorted(held.items(), key=lambda kv: kv[0].lower()))
    misses = []
    if held_wrongly := names & FORBIDDEN[mounted.service]:
        misses.append(f"{mounted.service}: the image holds {sorted(held_wrongly)}")
    if missing := REQUIRED[mounted.service] - names:
        misses.append(f"{mounted.service}: the image lacks {sorted(missing)}")
    return misses


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start(mounted: Mounted, env: dict[str, str], models: Path, logs: Path) -> None:
    user = mounted.config.get("User") or "0:0"
    workdir = mounted.config.get("WorkingDir") or "/"
    image_env = mounted.env
    target = image_env.get("STYLEBLEND_MODEL_DIR", "/models")
    bound = str(models.resolve()) if mounted.service in NEEDS_MODELS else ""
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        LAUNCH,
        "launch",
        str(mounted.root),
        user,
        workdir,
        bound,
        target,
        *mounted.argv,
    ]
    log = (logs / f"{mounted.service}.log").open("wb")
    mounted.process = subprocess.Popen(
        argv, env={**image_env, **env}, stdout=log, stderr=subprocess.STDOUT
    )
    log.close()


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_until_up(graph: list[Mounted], styleblend: Path, gateway: str, logs: Path) -> float:
    started = time.monotonic()
    while time.monotonic() - started < 300:
        for mounted in graph:
            assert mounted.process is not None
            if mounted.process.poll() is not None:
                tail = (logs / f"{mounted.service}.log").read_text(errors="replace")[-3000:]
                raise SystemExit(f"error: {mounted.service} exited early:\n{tail}")
        if all(listening(m.port) for m in graph):
            info = subprocess.run(
                [str(styleblend), "info", "--gateway", gateway],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if info.returncode == 0:
                (logs / "info.txt").write_text(info.stdout)
                return time.monotonic() - started
        time.sleep(1)
    raise SystemExit("error: the graph was not up after 300 s (logs: " + str(logs) + ")")


def mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as maps:
        return {fields[5] for line in maps if len(fields := line.split()) >= 6}


def check_process(mounted: Mounted) -> list[str]:
    assert mounted.process is not None
    pid = mounted.process.pid
    misses = []
    root = os.readlink(f"/proc/{pid}/root")
    exe = os.readlink(f"/proc/{pid}/exe")
    uid = next(
        line.split()[1]
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("Uid:")
    )
    files = mapped_files(pid)
    loaded = {
        library: sorted(Path(p).name for p in files if library in p)
        for library in (LIBTORCH, LIBORT)
    }
    mounted.facts.update(pid=pid, root=root, exe=exe, uid=int(uid), loaded=loaded)
    if Path(root) != mounted.root:
        misses.append(f"{mounted.service}: runs from {root}, not its image at {mounted.root}")
    if not exe.startswith(str(mounted.root)):
        misses.append(f"{mounted.service}: its executable {exe} is not its image's")
    wanted_user = (mounted.config.get("User") or "0").split(":")[0]
    if uid != wanted_user:
        misses.append(f"{mounted.service}: runs as uid {uid}, the image says {wanted_user}")
    for library in NOT_MAPPED[mounted.service]:
        if loaded[library]:
            misses.append(f"{mounted.service}: has {library} loaded: {loaded[library]}")
    for library in MAPPED.get(mounted.service, ()):
        if not loaded[library]:
            misses.append(f"{mounted.service}: {library} is not loaded, the check cannot see")
    return misses


def stop(graph: list[Mounted]) -> None:
    running = [m.process for m in graph if m.process is not None and m.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20  # the services' grace is 5 s
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default="localhost/styleblend")
    parser.add_argument("--version", default=version)
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="holds vgg19/")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "images")
    parser.add_argument(
        "--styleblend", type=Path, default=Path(sys.executable).parent / "styleblend"
    )
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument(
        "--contents-only", action="store_true", help="check what the images hold; run nothing"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("error: needs root (buildah mount, chroot, mount namespaces)")
    if shutil.which("buildah") is None:
        raise SystemExit("error: needs buildah (apt-get install -y buildah)")
    if not args.contents_only and not (args.models / "vgg19" / "model.onnx").is_file():
        raise SystemExit(f"error: no {args.models}/vgg19/model.onnx: run `make models` first")
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"images": {}, "checks": []}
    graph: list[Mounted] = []
    misses: list[str] = []
    try:
        for service in SERVICES:
            graph.append(mount(service, f"{args.repo}:{args.version}-{service}"))
        for mounted in graph:
            misses += check_contents(mounted)
        report["checks"].append("contents")
        if not args.contents_only and not misses:
            misses += run_graph(graph, args, logs, report)
    finally:
        stop(graph)
        for mounted in graph:
            report["images"][mounted.service] = {
                "image": mounted.image,
                "id": mounted.image_id,
                "size": mounted.size,
                **mounted.facts,
            }
            unmount(mounted)
        report["misses"] = misses
        (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for service, facts in report["images"].items():
        held = facts.get("distributions", {})
        heavy = {n: v for n, v in held.items() if normalised(n) in TORCH | ONNX_RUNTIME | {"onnx"}}
        print(f"{service:15} {facts['size']:>8}  {facts['image']}  heavy: {heavy or 'none'}")
    if misses:
        raise SystemExit("FAILED:\n  " + "\n  ".join(misses))
    print(f"ok: {', '.join(report['checks'])} (report: {args.out / 'report.json'})")


def run_graph(
    graph: list[Mounted], args: argparse.Namespace, logs: Path, report: dict[str, Any]
) -> list[str]:
    ports = {m.service: free_port() for m in graph}
    env = {
        "STYLEBLEND_HOST": "127.0.0.1",  # loopback only, whatever the image says
        "STYLEBLEND_HTTP_PORT": "0",
        "STYLEBLEND_INTERNAL_TOKEN": os.urandom(24).hex(),
        "STYLEBLEND_LOG_FORMAT": "text",
    }
    for service, port in ports.items():
        env[f"STYLEBLEND_{service.upper()}_PORT"] = str(port)
        env[f"STYLEBLEND_{service.upper()}_ADDRESS"] = f"127.0.0.1:{port}"
    for mounted in graph:
        mounted.port = ports[mounted.service]
        start(mounted, env, args.models, logs)
    gateway = f"127.0.0.1:{ports['gateway']}"
    report["up_s"] = round(wait_until_up(graph, args.styleblend, gateway, logs), 1)
    output = args.out / "smoke.png"
    output.unlink(missing_ok=True)
    samples = ROOT / "clients" / "samples"
    started = time.monotonic()
    blend = subprocess.run(
        [
            str(args.styleblend),
            "blend",
            "--gateway",
            gateway,
            "--source",
            f"{samples / 'content' / 'astronaut.jpg'}:content=1",
            "--source",
            f"{samples / 'style' / 'starry_night.jpg'}:style=1",
            "--size",
            str(args.size),
            "--iterations",
            str(args.iterations),
            "--seed",
            "7",
            "-o",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report["blend_s"] = round(time.monotonic() - started, 1)
    (logs / "blend.txt").write_text(blend.stdout + blend.stderr)
    if blend.returncode != 0:
        return [f"the blend exited {blend.returncode}:\n{blend.stdout}{blend.stderr}"]
    with Image.open(output) as picture:
        picture.load()  # decodes every pixel, not just the header
        report["output"] = {"path": str(output), "size": list(picture.size), "mode": picture.mode}
    if max(picture.size) != args.size:
        return [f"the blend is {picture.size}, not {args.size} px on its longest side"]
    report["checks"].append("blend")
    misses = [miss for mounted in graph for miss in check_process(mounted)]
    report["checks"].append("processes")
    return misses


if __name__ == "__main__":
    main()
