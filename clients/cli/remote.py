"""The client side of the CLI: talks to a gateway through the generated stubs only."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from styleblend.v1 import styleblend_pb2, styleblend_pb2_grpc
from tqdm import tqdm

MiB = 1024 * 1024
_OPTIMIZERS = {"lbfgs": styleblend_pb2.OPTIMIZER_LBFGS, "adam": styleblend_pb2.OPTIMIZER_ADAM}
_INITS = {"content": styleblend_pb2.INIT_CONTENT, "noise": styleblend_pb2.INIT_NOISE}


def default_gateway() -> str:
    host = os.environ.get("STYLEBLEND_HOST", "127.0.0.1")
    return os.environ.get(
        "STYLEBLEND_GATEWAY", f"{host}:{os.environ.get('STYLEBLEND_GATEWAY_PORT', 50051)}"
    )


def connect(address: str) -> styleblend_pb2_grpc.StyleBlendStub:
    channel = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 256 * MiB),
            ("grpc.max_send_message_length", 256 * MiB),
        ],
    )
    return styleblend_pb2_grpc.StyleBlendStub(channel)


def explain(error: grpc.RpcError, args: argparse.Namespace) -> str:
    """The server's message for a person, with what to do when there is no gateway at all."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    gateway = getattr(args, "gateway", "")
    if code == grpc.StatusCode.UNAVAILABLE and "service at" not in (details or ""):
        return (
            f"error: no styleblend gateway is reachable at {gateway} ({details}).\n"
            "Start one with `styleblend up` (or pass --gateway HOST:PORT)."
        )
    name = code.name if code else "ERROR"
    return f"error ({name}): {details}"


def blend_request(args: argparse.Namespace) -> styleblend_pb2.BlendRequest:
    request = styleblend_pb2.BlendRequest(
        sources=[
            styleblend_pb2.Source(
                data=source.path.read_bytes(),
                style_weight=source.style_weight,
                content_weight=source.content_weight,
            )
            for source in args.sources
        ],
        max_side_px=args.size or 0,
        iterations=args.iterations or 0,
        optimizer=_OPTIMIZERS.get(args.optimizer, styleblend_pb2.OPTIMIZER_UNSPECIFIED),
        style_layers=args.style_layers or [],
        content_layers=args.content_layers or [],
        init=_INITS.get(args.init, styleblend_pb2.INIT_UNSPECIFIED),
        preview_every=args.preview_every or 0,
    )
    if args.init_image:
        request.init = styleblend_pb2.INIT_IMAGE
        request.init_image = args.init_image.read_bytes()
    for field in ("content_loss_weight", "style_loss_weight", "tv_loss_weight", "seed"):
        value = getattr(args, field)
        if value is not None:
            setattr(request, field, value)
    return request


def blend(args: argparse.Namespace) -> int:
    request = blend_request(args)
    if args.previews:
        args.previews.mkdir(parents=True, exist_ok=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=request.iterations or None, unit="it", desc="blending", dynamic_ncols=True)
    result: styleblend_pb2.Result | None = None
    with bar:
        for response in connect(args.gateway).Blend(request):
            event = response.event
            if event.HasField("progress"):
                progress = event.progress
                bar.total = progress.iterations_total
                bar.update(progress.iteration - bar.n)
                bar.set_postfix(
                    style=f"{progress.losses.style:.3g}",
                    content=f"{progress.losses.content:.3g}",
                    tv=f"{progress.losses.tv:.3g}",
                )
            elif event.HasField("preview") and args.previews:
                path = args.previews / f"preview_{event.preview.iteration:05d}.jpg"
                path.write_bytes(event.preview.image)
            elif event.HasField("result"):
                result = event.result
                write_result(result, args.output)
    if result is None:
        print("error: the gateway ended the stream without a result", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output} ({result.width_px}×{result.height_px}, "
        f"{result.stats.iterations} iterations in {result.stats.seconds:.1f} s)"
        + (f"; previews in {args.previews}" if args.previews else "")
    )
    return 0


def write_result(result: styleblend_pb2.Result, path: Path) -> None:
    if path.suffix.lower() == ".png":
        path.write_bytes(result.image)
        return
    import io

    from PIL import Image

    Image.open(io.BytesIO(result.image)).save(path)


def info(args: argparse.Namespace) -> int:
    answer = connect(args.gateway).GetInfo(styleblend_pb2.GetInfoRequest(), timeout=30)
    defaults, limits = answer.defaults, answer.limits
    lines = [
        f"model          {answer.model} (weights {answer.weights_sha256[:12]})",
        f"weights        {answer.weights_source}",
        f"providers      {', '.join(answer.execution_providers)} (features)",
        f"device         {answer.reconstruction_device} (reconstruction)",
        f"style layers   {' '.join(defaults.style_layers)} (default)",
        f"content layers {' '.join(defaults.content_layers)} (default)",
        f"loss weights   content {defaults.content_loss_weight:g}, style "
        f"{defaults.style_loss_weight:g}, tv {defaults.tv_loss_weight:g}",
        f"defaults       {defaults.max_side_px} px, {defaults.iterations} iterations, "
        f"preview every {defaults.preview_every}",
        f"limits         {limits.max_side_px} px, {limits.max_sources} sources, "
        f"{limits.max_iterations} iterations, {limits.max_image_pixels:,} pixels per image",
        "layers         " + " ".join(layer.name for layer in answer.layers),
    ]
    print("\n".join(lines), file=sys.stdout)
    return 0
