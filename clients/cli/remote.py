"""The client side of the CLI: talks to a gateway through the generated stubs only."""

from __future__ import annotations

import argparse
import hashlib
import json
import queue
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from styleblend.v1 import styleblend_pb2, styleblend_pb2_grpc
from tqdm import tqdm

from clients.cli import recipe, script

MiB = 1024 * 1024
_OPTIMIZERS = {"lbfgs": styleblend_pb2.OPTIMIZER_LBFGS, "adam": styleblend_pb2.OPTIMIZER_ADAM}
_INITS = {"content": styleblend_pb2.INIT_CONTENT, "noise": styleblend_pb2.INIT_NOISE}
_COLOURS = {
    "luminance": styleblend_pb2.PRESERVE_COLOR_LUMINANCE,
    "histogram": styleblend_pb2.PRESERVE_COLOR_HISTOGRAM,
}


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer TOKEN` to every call."""

    def __init__(self, token: str) -> None:
        self.entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self.entry]
        return details._replace(metadata=metadata)  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def connect(address: str, token: str | None = None) -> styleblend_pb2_grpc.StyleBlendStub:
    channel = grpc.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 256 * MiB),
            ("grpc.max_send_message_length", 256 * MiB),
        ],
    )
    if token:
        channel = grpc.intercept_channel(channel, _Bearer(token))
    return styleblend_pb2_grpc.StyleBlendStub(channel)


def run(args: argparse.Namespace) -> int:
    """`blend` or `info`, with the gateway's errors and bad recipes or scripts said for a person."""
    try:
        return blend(args) if args.command == "blend" else info(args)
    except grpc.RpcError as error:
        print(explain(error, args), file=sys.stderr)
        return 1
    except (recipe.RecipeError, script.ScriptError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


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
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"error (UNAUTHENTICATED): {details}\nPass --token TOKEN or set STYLEBLEND_TOKEN."
    name = code.name if code else "ERROR"
    return f"error ({name}): {details}"


def blend_request(args: argparse.Namespace) -> styleblend_pb2.BlendRequest:
    request = styleblend_pb2.BlendRequest(
        max_side_px=args.size or 0,
        iterations=args.iterations or 0,
        optimizer=_OPTIMIZERS.get(args.optimizer, styleblend_pb2.OPTIMIZER_UNSPECIFIED),
        style_layers=args.style_layers or [],
        content_layers=args.content_layers or [],
        init=_INITS.get(args.init, styleblend_pb2.INIT_UNSPECIFIED),
        preview_every=args.preview_every or 0,
        preserve_color=_COLOURS.get(args.preserve_color, styleblend_pb2.PRESERVE_COLOR_UNSPECIFIED),
        scales=args.scales or 0,
    )
    for source in args.sources:
        message = request.sources.add(
            data=source.path.read_bytes(),
            style_weight=source.style_weight,
            content_weight=source.content_weight,
        )
        if source.style_map:
            message.style_map.data = source.style_map.read_bytes()
        if source.content_map:
            message.content_map.data = source.content_map.read_bytes()
    if args.fast:
        request.fast.model = args.fast
        request.fast.refine = args.refine
        if args.strength is not None:
            request.fast.strength = args.strength
    if args.universal:
        request.universal.refine = args.refine
        request.universal.levels.extend(args.levels or [])
        if args.strength is not None:
            request.universal.strength = args.strength
    if args.init_image:
        request.init = styleblend_pb2.INIT_IMAGE
        request.init_image = args.init_image.read_bytes()
    for field in (
        "content_loss_weight",
        "style_loss_weight",
        "tv_loss_weight",
        "seed",
        "style_scale",
    ):
        value = getattr(args, field)
        if value is not None:
            setattr(request, field, value)
    return request


def local_paths(args: argparse.Namespace) -> dict[str, str]:
    """sha256 → path of every file the request reads, so a recipe can find them again."""
    files = [args.init_image] if args.init_image else []
    for source in args.sources:
        files += [f for f in (source.path, source.style_map, source.content_map) if f]
    return {hashlib.sha256(f.read_bytes()).hexdigest(): str(f.resolve()) for f in files}


def blend(args: argparse.Namespace) -> int:
    stub = connect(args.gateway, args.token)
    if args.recipe:
        request, steps, paths = recipe.replay(args.recipe, stub)
    else:
        request, paths = blend_request(args), local_paths(args)
        steps = (
            script.parse_script(args.script.read_text(), str(args.script), args.script.parent)
            if args.script
            else []
        )
    if args.previews:
        args.previews.mkdir(parents=True, exist_ok=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    result = follow(stub, request, steps, args)
    if result is None:
        print("error: the gateway ended the stream without a result", file=sys.stderr)
        return 1
    write_result(result, args.output, paths)
    print(
        f"wrote {args.output} ({result.width_px}×{result.height_px}, "
        + (
            f"{result.stats.iterations} iterations in {result.stats.seconds:.1f} s)"
            if result.stats.iterations
            else "in one pass)"
        )
        + (f"; previews in {args.previews}" if args.previews else "")
    )
    return 0


def _events(
    stub: styleblend_pb2_grpc.StyleBlendStub,
    request: styleblend_pb2.BlendRequest,
    steps: list[script.Step],
) -> tuple[Iterator[styleblend_pb2.BlendEvent], Callable[[int], None]]:
    """The run's events, and what to call with each iteration (sends a scripted finish)."""
    if not steps:
        responses = stub.Blend(request)
        return (r.event for r in responses), lambda _: None
    outgoing: queue.Queue[styleblend_pb2.SessionRequest | None] = queue.Queue()
    outgoing.put(styleblend_pb2.SessionRequest(start=request))
    for step in steps:  # each is held for its iteration, so sending them all now is exact
        if step.update is not None:
            outgoing.put(styleblend_pb2.SessionRequest(update=step.update))
    finishes = sorted(step.at_iteration for step in steps if step.update is None)

    def on_iteration(iteration: int) -> None:
        if finishes and iteration >= finishes[0]:
            finishes.clear()
            outgoing.put(styleblend_pb2.SessionRequest(finish=styleblend_pb2.FinishSession()))

    def requests() -> Iterator[styleblend_pb2.SessionRequest]:
        while (message := outgoing.get()) is not None:
            yield message

    def events() -> Iterator[styleblend_pb2.BlendEvent]:
        try:
            for response in stub.Session(requests()):
                yield response.event
        finally:
            outgoing.put(None)

    return events(), on_iteration


def follow(
    stub: styleblend_pb2_grpc.StyleBlendStub,
    request: styleblend_pb2.BlendRequest,
    steps: list[script.Step],
    args: argparse.Namespace,
) -> styleblend_pb2.Result | None:
    events, on_iteration = _events(stub, request, steps)
    # A one-pass method alone has no iterations to count: no bar then.
    one_pass = (request.HasField("fast") and not request.fast.refine) or (
        request.HasField("universal") and not request.universal.refine
    )
    bar = tqdm(total=None, unit="it", desc="blending", dynamic_ncols=True, disable=one_pass)
    with bar:
        for event in events:
            if event.HasField("progress"):
                progress = event.progress
                bar.total = progress.iterations_total
                bar.update(progress.iteration - bar.n)
                bar.set_postfix(
                    scale=f"{progress.scale + 1}/{progress.scales_total}",
                    style=f"{progress.losses.style:.3g}",
                    content=f"{progress.losses.content:.3g}",
                    tv=f"{progress.losses.tv:.3g}",
                )
                on_iteration(progress.iteration)
            elif event.HasField("preview") and args.previews:
                preview = event.preview
                name = (
                    f"{'fast' if preview.fast else 'universal'}_{preview.update_id:05d}.png"
                    if preview.fast or preview.universal
                    else f"preview_{preview.iteration:05d}.jpg"
                )
                path = args.previews / name
                path.write_bytes(event.preview.image)
            elif event.HasField("update_rejected"):
                rejected = event.update_rejected
                bar.write(f"update {rejected.update_id} refused: {rejected.message}")
            elif event.HasField("result"):
                return event.result
    return None


def write_result(result: styleblend_pb2.Result, path: Path, paths: dict[str, str]) -> None:
    """The image with its recipe, plus where this machine keeps the recipe's files."""
    import io

    from PIL import Image, PngImagePlugin

    made = json.loads(result.recipe_json)
    made["paths"] = paths
    text = json.dumps(made, indent=2)
    image = Image.open(io.BytesIO(result.image))
    if path.suffix.lower() == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt(recipe.RECIPE_KEY, text)
        image.save(path, pnginfo=info)
    else:
        image.save(path)
        path.with_suffix(".recipe.json").write_text(text)


def info(args: argparse.Namespace) -> int:
    answer = connect(args.gateway, args.token).GetInfo(styleblend_pb2.GetInfoRequest(), timeout=30)
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
        f"extraction     at most {limits.max_extract_side_px} px a side, "
        f"{limits.max_extract_pixels:,} pixels (style images at every scale)",
        "layers         " + " ".join(layer.name for layer in answer.layers),
    ]
    lines += [
        f"fast           {model.name}: " + ", ".join(s.name for s in model.styles if s.sha256)
        for model in answer.fast_models
    ]
    universal = answer.universal
    lines.append(
        f"universal      {universal.name}: decoders for {' '.join(universal.layers)}; "
        f"{' '.join(universal.default_levels)} by default"
        if answer.HasField("universal")
        else "universal      no decoders (make universal-model)"
    )
    print("\n".join(lines), file=sys.stdout)
    return 0
