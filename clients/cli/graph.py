"""The launcher side of the CLI: export models and start the graph on this machine."""

from __future__ import annotations

import argparse
import errno
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import (
    BlendingConfig,
    FeaturesConfig,
    GatewayConfig,
    ReconstructionConfig,
)

# Each service's port as its config class defaults it (services/common/config.py is their home).
DEFAULT_PORTS: dict[str, int] = {
    name: int(settings.model_fields[f"{name}_port"].default)
    for name, settings in (
        ("gateway", GatewayConfig),
        ("features", FeaturesConfig),
        ("blending", BlendingConfig),
        ("reconstruction", ReconstructionConfig),
    )
}
START_TIMEOUT_S = 300.0  # loading PyTorch and the model can take a while on a cold disk


def _environment(args: argparse.Namespace) -> dict[str, str]:
    """STYLEBLEND_* variables from the flags, over the ones already set, and a new internal
    secret: only this start's gateway may call this start's services."""
    env = dict(os.environ)
    env["STYLEBLEND_INTERNAL_TOKEN"] = secrets.token_urlsafe(32)
    for name in DEFAULT_PORTS:
        port = getattr(args, f"{name}_port", None)
        if port is not None:
            env[f"STYLEBLEND_{name.upper()}_PORT"] = str(port)
    for flag in ("host", "model", "model_dir", "http_port"):
        value = getattr(args, flag, None)
        if value is not None:
            env[f"STYLEBLEND_{flag.upper()}"] = str(value)
    host = env.get("STYLEBLEND_HOST", "127.0.0.1")
    for name in ("features", "blending", "reconstruction"):
        port = env.get(f"STYLEBLEND_{name.upper()}_PORT", str(DEFAULT_PORTS[name]))
        env.setdefault(f"STYLEBLEND_{name.upper()}_ADDRESS", f"{host}:{port}")
    return env


def export(args: argparse.Namespace) -> int:
    from export.onnx_export import ensure_model, export_model
    from services.common.config import ModelConfig

    root = args.model_dir or ModelConfig().model_dir
    try:
        if args.force:
            folder = export_model(args.model, root, args.weights)
        else:
            folder = ensure_model(args.model, root, args.weights)
    except (FileNotFoundError, ValueError, KeyError) as error:  # bad or missing weights, bad id
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.model}: {folder}")
    return 0


def _health_channel(address: str) -> grpc.Channel:
    """Plain, or TLS with the gateway's upstream CA (and client certificate) when the services
    serve TLS, as the gateway itself reaches them."""
    from services.common.channels import upstream_credentials
    from services.common.config import GatewayConfig

    config = GatewayConfig()
    credentials = upstream_credentials(config) if config.tls_cert_file else None
    if credentials is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, credentials)


def wait_healthy(address: str, name: str, process: subprocess.Popen[bytes] | None) -> None:
    """Block until `address` reports SERVING; fail early if its process died."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with _health_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise SystemExit(f"the {name} service exited with code {process.returncode}")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit(f"the {name} service at {address} did not start in {START_TIMEOUT_S:.0f} s")


def up(args: argparse.Namespace) -> int:
    env = _environment(args)
    os.environ.update(env)  # the configs below and the child processes read the same variables
    from services.common import logs
    from services.common.config import ServiceConfig
    from services.common.server import PortInUse

    taken = _taken_port(env, args.single_process)
    if taken is not None:  # before anything starts: a running graph is left as it is
        print(f"error: {taken}", file=sys.stderr)
        return 1
    config = ServiceConfig()
    logs.configure("styleblend-up", config.log_level, config.log_format)
    _ensure_exported()
    if args.single_process:
        try:
            return _up_single_process()
        except PortInUse as error:  # taken since it was checked
            print(f"error: {error}", file=sys.stderr)
            return 1
    return _up_processes(env)


def _taken_port(env: Mapping[str, str], single_process: bool) -> str | None:
    """What is wrong with the first port this graph needs that another server holds."""
    from services.common.server import bind_error

    host = env.get("STYLEBLEND_HOST", "127.0.0.1")
    names = ["gateway"] if single_process else list(DEFAULT_PORTS)
    wanted = {
        name: (int(env.get(f"STYLEBLEND_{name.upper()}_PORT", DEFAULT_PORTS[name])), name)
        for name in names
    }
    wanted["studio"] = (int(env.get("STYLEBLEND_HTTP_PORT", 8080)), "http")
    for name, (port, flag) in wanted.items():
        error = bind_error(host, port) if port else None
        if error is None:
            continue
        if error.errno == errno.EADDRINUSE:
            return (
                f"port {port} on {host}, for the {name}, is in use: another server (another "
                f"styleblend graph?) listens there; stop it, or give this graph another port "
                f"(--{flag}-port)"
            )
        return f"cannot listen on port {port} on {host}, for the {name}: {error}"
    return None


def _ensure_exported() -> None:
    from export.onnx_export import ensure_model
    from services.common.config import ModelConfig

    config = ModelConfig()
    ensure_model(config.model, config.model_dir)


def _addresses(env: Mapping[str, str]) -> dict[str, str]:
    host = env.get("STYLEBLEND_HOST", "127.0.0.1")
    return {
        name: f"{host}:{env.get(f'STYLEBLEND_{name.upper()}_PORT', port)}"
        for name, port in DEFAULT_PORTS.items()
    }


def _up_processes(env: dict[str, str]) -> int:
    addresses = _addresses(env)
    children: dict[str, subprocess.Popen[bytes]] = {}
    stop = _on_signals()
    try:
        for name in ("features", "blending", "reconstruction", "gateway"):
            children[name] = subprocess.Popen([sys.executable, "-m", "services", name], env=env)
        for name, process in children.items():
            wait_healthy(addresses[name], name, process)
        host, http_port = (
            env.get("STYLEBLEND_HOST", "127.0.0.1"),
            env.get("STYLEBLEND_HTTP_PORT", 8080),
        )
        studio = f"http://{host}:{http_port}/"
        print(_banner({**addresses, "studio": studio}), flush=True)
        while not stop():
            for name, process in children.items():
                if process.poll() is not None:
                    print(
                        f"the {name} service exited ({process.returncode}); stopping",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
        return 0
    finally:
        _stop_children(children)


def _up_single_process() -> int:
    from services.common.config import GatewayConfig
    from services.common.server import serve_until_terminated
    from services.graph import serve_all_in_one, start_studio

    gateway = GatewayConfig()
    running = serve_all_in_one(gateway)
    try:
        studio = start_studio(gateway, running.port)
    except BaseException:
        running.stop(0)
        raise
    addresses = {
        "gateway": f"{gateway.host}:{running.port} (all four services)",
        "studio": f"http://{gateway.host}:{studio.port}/",
    }
    print(_banner(addresses), flush=True)
    try:
        serve_until_terminated(running, gateway.grace_s)
    finally:
        studio.stop()
    return 0


def _on_signals() -> Callable[[], bool]:
    stopped: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _: stopped.append(number))
    return lambda: bool(stopped)


def _stop_children(children: Mapping[str, subprocess.Popen[bytes]]) -> None:
    for process in children.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in children.values():
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


def _banner(addresses: Mapping[str, str]) -> str:
    lines = [f"  {name:<15} {address}" for name, address in addresses.items()]
    return "styleblend is up:\n" + "\n".join(lines) + "\nCtrl-C stops it."
