"""The `styleblend` command.

Every command's flags are here, and its module is imported only when it runs (but for `up`'s
port table, which costs only gRPC), so `info` and `blend` load neither ONNX Runtime nor PyTorch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from clients.cli.graph import DEFAULT_PORTS
from clients.cli.sources import parse_source, parse_style, positive_side, unit_interval
from services.common.config import GatewayConfig, ModelConfig


def default_gateway() -> str:
    host = os.environ.get("STYLEBLEND_HOST", "127.0.0.1")
    port = os.environ.get("STYLEBLEND_GATEWAY_PORT", DEFAULT_PORTS["gateway"])
    return os.environ.get("STYLEBLEND_GATEWAY", f"{host}:{port}")


def default_token() -> str | None:
    return os.environ.get("STYLEBLEND_TOKEN") or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="styleblend", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start the four services on this machine")
    up.add_argument("--single-process", action="store_true", help="host all four in one server")
    up.add_argument("--host", help="interface to listen on (STYLEBLEND_HOST, 127.0.0.1)")
    for name, port in DEFAULT_PORTS.items():
        up.add_argument(
            f"--{name}-port", type=int, help=f"(STYLEBLEND_{name.upper()}_PORT, {port})"
        )
    http, model, folder = (
        GatewayConfig.model_fields["http_port"].default,
        ModelConfig.model_fields["model"].default,
        ModelConfig.model_fields["model_dir"].default,
    )
    up.add_argument("--http-port", type=int, help=f"browser studio (STYLEBLEND_HTTP_PORT, {http})")
    up.add_argument("--model", help=f"feature model id (STYLEBLEND_MODEL, {model})")
    up.add_argument(
        "--model-dir", type=Path, help=f"folder of exports (STYLEBLEND_MODEL_DIR, {folder})"
    )

    blend = commands.add_parser("blend", help="blend images through a running gateway")
    blend.add_argument(
        "--source",
        dest="sources",
        action="append",
        type=parse_source,
        default=[],
        metavar="PATH[:style=W][:content=W][:mask=PATH][:content-mask=PATH]",
        help="a source image, its weights and where they apply; repeat for each source",
    )
    blend.add_argument(
        "--recipe", type=Path, metavar="FILE", help="replay a result's recipe (PNG or JSON)"
    )
    blend.add_argument(
        "--script", type=Path, metavar="FILE", help="timed changes: `at 40: style 0.2,0.8`"
    )
    one_pass = blend.add_mutually_exclusive_group()
    one_pass.add_argument(
        "--fast", metavar="MODEL", help="an instant image from this trained fast network"
    )
    one_pass.add_argument(
        "--universal",
        action="store_true",
        help="an instant image of any sources from the universal decoders",
    )
    blend.add_argument(
        "--levels",
        nargs="+",
        metavar="LAYER",
        help="with --universal: the decoders to use (default: the model's; `styleblend info`)",
    )
    blend.add_argument(
        "--strength",
        type=float,
        metavar="S",
        help="with --fast or --universal: 0 (the photo) .. 1 (default)",
    )
    blend.add_argument(
        "--refine",
        action="store_true",
        help="with --fast or --universal: optimise on from the one-pass image",
    )
    blend.add_argument("--preserve-color", choices=("luminance", "histogram"))
    blend.add_argument(
        "--scales", type=int, metavar="N", help="coarse-to-fine scales (default: by size)"
    )
    blend.add_argument(
        "--style-scale", type=float, metavar="X", help="style size relative to the canvas"
    )
    blend.add_argument("-o", "--output", type=Path, required=True, help="where to write the result")
    blend.add_argument("--size", type=int, help="longest side of the result in pixels")
    blend.add_argument("--iterations", type=int)
    blend.add_argument("--optimizer", choices=("lbfgs", "adam"))
    blend.add_argument("--previews", type=Path, metavar="DIR", help="write every preview here")
    blend.add_argument("--seed", type=int)
    blend.add_argument("--style-layers", nargs="+", metavar="LAYER")
    blend.add_argument("--content-layers", nargs="+", metavar="LAYER")
    blend.add_argument("--content-loss-weight", type=float, metavar="ALPHA")
    blend.add_argument("--style-loss-weight", type=float, metavar="BETA")
    blend.add_argument("--tv-loss-weight", type=float, metavar="GAMMA")
    start = blend.add_mutually_exclusive_group()
    start.add_argument("--init", choices=("content", "noise"), help="where the optimisation starts")
    start.add_argument("--init-image", type=Path, metavar="PATH", help="start from this image")
    blend.add_argument("--preview-every", type=int, metavar="N")
    blend.add_argument("--gateway", default=default_gateway(), metavar="HOST:PORT")
    blend.add_argument(
        "--token", default=default_token(), help="the gateway's token (STYLEBLEND_TOKEN)"
    )

    video = commands.add_parser(
        "video", help="stylise every frame of a video with a trained fast network"
    )
    video.add_argument("input", type=Path, help="a video (mp4, webm, mov, mkv, avi, gif, …)")
    video.add_argument(
        "-o", "--output", type=Path, required=True,
        help="the stylised video, in the format its suffix names (.mp4, .webm, .gif, …), "
        "at the input's frame rate",
    )  # fmt: skip
    video.add_argument(
        "--model", type=Path, default=Path("models/fast/demo"),
        help="a trained fast network's folder (default: models/fast/demo)",
    )  # fmt: skip
    video.add_argument(
        "--style", dest="styles", action="append", type=parse_style, required=True,
        metavar="NAME=WEIGHT", help="a style of the model and its weight; repeat to mix "
        "(weights are normalised to sum 1; NAME alone is weight 1)",
    )  # fmt: skip
    video.add_argument(
        "--strength", type=unit_interval, default=1.0, metavar="S",
        help="0 (the clip as it is) .. 1 (all style, the default)",
    )  # fmt: skip
    video.add_argument(
        "--size", type=positive_side, metavar="N",
        help="longest side of the frames in pixels (default: the input's)",
    )  # fmt: skip
    video.add_argument(
        "--temporal", type=unit_interval, default=0.0, metavar="T",
        help="0..1: how much of the previous frame to keep where nothing moved (less flicker)",
    )  # fmt: skip

    info = commands.add_parser("info", help="describe the running gateway: model, layers, limits")
    info.add_argument("--gateway", default=default_gateway(), metavar="HOST:PORT")
    info.add_argument(
        "--token", default=default_token(), help="the gateway's token (STYLEBLEND_TOKEN)"
    )

    export = commands.add_parser("export", help="export a feature model to ONNX")
    export.add_argument(
        "--model", default="vgg19", help="vgg19, vgg19-torchvision, efficientnet-lite0"
    )
    export.add_argument("--weights", type=Path, help="a weight file instead of the packaged one")
    export.add_argument("--model-dir", type=Path, help="folder of exports (STYLEBLEND_MODEL_DIR)")
    export.add_argument("--force", action="store_true", help="export again even if up to date")
    return parser


def run(args: argparse.Namespace) -> int:
    """Runs the command, importing its module only now."""
    if args.command == "video":
        from clients.cli import video

        return video.video(args)
    if args.command in ("blend", "info"):
        from clients.cli import remote

        return remote.run(args)
    from clients.cli import graph

    return graph.up(args) if args.command == "up" else graph.export(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "blend":
        if bool(args.sources) == bool(args.recipe):
            raise SystemExit("styleblend blend: give --source ... or --recipe FILE (not both)")
        if not (args.fast or args.universal) and (args.strength is not None or args.refine):
            raise SystemExit(
                "styleblend blend: --strength and --refine go with --fast MODEL or --universal"
            )
        if args.levels and not args.universal:
            raise SystemExit("styleblend blend: --levels goes with --universal")
    try:
        return run(args)
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
