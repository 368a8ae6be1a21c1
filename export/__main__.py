"""python -m export --model ID [--weights FILE] [--out DIR] [--force]: export a feature model."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from export.models import MODELS
from export.onnx_export import ensure_model, export_model
from export.weights import MissingWeights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a feature model to ONNX with its weights and manifest.",
    )
    parser.add_argument("--model", default="vgg19", choices=sorted(MODELS), help="model id")
    parser.add_argument(
        "--weights", type=Path, help="weights file (vgg19-torchvision: vgg19-dcbb9e9d.pth)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("STYLEBLEND_MODEL_DIR", "models")),
        help="folder that holds one folder per model (default: $STYLEBLEND_MODEL_DIR or models)",
    )
    parser.add_argument("--force", action="store_true", help="export even if up to date")
    args = parser.parse_args(argv)
    # Our progress lines only; the ONNX optimiser logs hundreds of lines at INFO.
    progress = logging.getLogger("export")
    progress.setLevel(logging.INFO)
    progress.addHandler(logging.StreamHandler())
    try:
        if args.force:
            folder = export_model(args.model, args.out, args.weights)
        else:
            folder = ensure_model(args.model, args.out, args.weights)
    except (MissingWeights, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.model}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
