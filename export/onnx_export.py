"""Export a feature model to a folder: model.onnx, weights.pt and manifest.json.

The features service runs model.onnx with ONNX Runtime; reconstruction rebuilds the same network
in PyTorch from weights.pt; the manifest ties them together with the weights' hash.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import Tensor, nn

from export.models import (
    LOSS_DEFAULTS,
    FeatureNet,
    build_feature_net,
    empty_feature_net,
    model_spec,
)
from export.weights import read_state_dict, state_dict_sha256
from services.common.manifest import MANIFEST_FILE, MIN_SIDE_PX, Manifest

log = logging.getLogger(__name__)

# The dynamo exporter's own opset; older ones would go through ONNX's version converter.
OPSET = 18
# Bump when the export's layout or graph changes, so ensure_model redoes older exports.
EXPORT_FORMAT = "1"
# ONNX Runtime must reproduce PyTorch to this relative error, ‖onnx − torch‖ / ‖torch‖.
MAX_RELATIVE_ERROR = 1e-4
# Sizes the export is checked at: batch 1 and 2, even and odd, non-square.
CHECK_SHAPES = ((1, 3, 64, 64), (2, 3, 97, 80))


class ExportCheckFailed(RuntimeError):
    """ONNX Runtime and PyTorch disagree on an exported model."""


class TapOutputs(nn.Module):
    """A feature net with fixed taps, returning them as a tuple: ONNX outputs in order."""

    def __init__(self, net: FeatureNet, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.net = net
        self.layers = layers

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        found = self.net(image, self.layers)
        return tuple(found[name] for name in self.layers)


def relative_error(got: Tensor | np.ndarray, want: Tensor | np.ndarray) -> float:
    """‖got − want‖ / ‖want‖ in float64, on `got`'s device: the measure the export holds ONNX
    to, and the tests and benchmarks one computation to another. (The losses' relative_error,
    in services.reconstruction.objective, is the squared ratio.)"""
    got64 = torch.as_tensor(got).detach().double()
    want64 = torch.as_tensor(want).detach().to(got64.device, torch.float64)
    return float((got64 - want64).norm() / want64.norm().clamp_min(1e-30))


def _step(model_id: str, number: int, words: str) -> None:
    log.info("export %s [%d/4] %s", model_id, number, words)


def write_onnx(net: FeatureNet, path: Path, opset: int = OPSET) -> None:
    """Every tap of `net` as a named output of one graph with dynamic batch, height and width."""
    wrapper = TapOutputs(net, net.layer_names).eval()
    dim = torch.export.Dim
    dynamic_shapes = {
        "image": {
            0: dim("batch", min=1),
            2: dim("height", min=MIN_SIDE_PX),
            3: dim("width", min=MIN_SIDE_PX),
        }
    }
    # Batch 2 and unequal sides, so the tracer cannot specialise batch to 1 or tie H to W.
    sample = torch.rand(2, 3, 64, 96)
    torch.onnx.export(
        wrapper,
        (sample,),
        str(path),
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=["image"],
        output_names=list(net.layer_names),
        opset_version=opset,
        external_data=False,  # one self-contained file; the largest (VGG19) is about 80 MB
        verbose=False,
    )


def onnx_session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_onnx(net: FeatureNet, path: Path) -> float:
    """The worst relative error of any tap over CHECK_SHAPES; raises ExportCheckFailed if big."""
    session = onnx_session(path)
    names = [output.name for output in session.get_outputs()]
    if tuple(names) != net.layer_names:
        raise ExportCheckFailed(f"{path}: outputs {names} != layers {list(net.layer_names)}")
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in CHECK_SHAPES:
        image = torch.rand(shape, generator=generator)
        with torch.no_grad():
            want = net(image, net.layer_names)
        got = session.run(None, {"image": image.numpy()})
        for name, array in zip(names, got, strict=True):
            error = relative_error(array, want[name].numpy())
            if error > MAX_RELATIVE_ERROR:
                raise ExportCheckFailed(
                    f"{path}: {name} at {list(shape)} differs from PyTorch by relative error "
                    f"{error:.2e} > {MAX_RELATIVE_ERROR:.0e}"
                )
            worst = max(worst, error)
    return worst


def make_manifest(
    model_id: str, net: FeatureNet, weights_source: str, weights_sha256: str, opset: int
) -> Manifest:
    spec = model_spec(model_id)
    return Manifest(
        model=model_id,
        architecture=spec.architecture,
        weights_source=weights_source,
        weights_sha256=weights_sha256,
        licence=spec.licence,
        normalisation=spec.normalisation,
        layers=net.layers,
        default_style_layers=spec.default_style_layers,
        default_content_layers=spec.default_content_layers,
        loss_defaults=LOSS_DEFAULTS[model_id],
        opset=opset,
        extra={"export_format": EXPORT_FORMAT, "torch": torch.__version__},
    )


def _replace_folder(staging: Path, folder: Path) -> None:
    """Move a finished export into place, so readers never see half of one."""
    if not folder.exists():
        staging.rename(folder)
        return
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old)


def export_model(
    model_id: str, out_root: Path, weights_file: Path | None = None, opset: int = OPSET
) -> Path:
    """Export `model_id` to `out_root/<model_id>/` and return that folder."""
    model_spec(model_id)  # an unknown id fails before any work
    started = time.perf_counter()
    _step(model_id, 1, "loading weights")
    net, weights_source = build_feature_net(model_id, weights_file)
    state = net.state_dict()
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model_id}.", dir=out_root))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the export from services run as others
    try:
        manifest = make_manifest(model_id, net, weights_source, state_dict_sha256(state), opset)
        torch.save(state, staging / manifest.weights_file)
        _step(model_id, 2, f"exporting ONNX (opset {opset}, {len(net.layers)} outputs)")
        write_onnx(net, staging / manifest.onnx_file, opset)
        _step(model_id, 3, "checking ONNX Runtime against PyTorch")
        worst = check_onnx(net, staging / manifest.onnx_file)
        _step(model_id, 4, f"writing manifest (worst relative error {worst:.1e})")
        manifest.save(staging)
        _replace_folder(staging, out_root / model_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("export %s done in %.1f s", model_id, time.perf_counter() - started)
    return out_root / model_id


def stale_reason(model_id: str, folder: Path, weights_file: Path | None = None) -> str | None:
    """Why the export in `folder` must be redone, or None if it is current."""
    spec = model_spec(model_id)
    if not (folder / MANIFEST_FILE).is_file():
        return f"no {MANIFEST_FILE}"
    try:
        manifest = Manifest.load(folder)
    except (ValueError, KeyError, TypeError) as error:
        return f"{MANIFEST_FILE} is unreadable ({error})"
    for name in (manifest.onnx_file, manifest.weights_file):
        if not (folder / name).is_file():
            return f"{name} is missing"
    net = empty_feature_net(spec.architecture, spec.normalisation)
    want = make_manifest(model_id, net, manifest.weights_source, manifest.weights_sha256, OPSET)
    if manifest.extra.get("export_format") != EXPORT_FORMAT:
        return f"export format {manifest.extra.get('export_format')} != {EXPORT_FORMAT}"
    for field in (
        "architecture",
        "normalisation",
        "layers",
        "default_style_layers",
        "default_content_layers",
        "loss_defaults",
        "licence",
        "opset",
    ):
        if getattr(manifest, field) != getattr(want, field):
            return f"the manifest's {field} is out of date"
    if state_dict_sha256(read_state_dict(folder / manifest.weights_file)) != (
        manifest.weights_sha256
    ):
        return f"{manifest.weights_file} does not match the manifest's hash"
    if weights_file is not None:
        given, _ = build_feature_net(model_id, weights_file)
        if state_dict_sha256(given.state_dict()) != manifest.weights_sha256:
            return f"{weights_file} holds other weights than the export"
    return None


def ensure_model(model_id: str, out_root: Path, weights_file: Path | None = None) -> Path:
    """The folder of a current export of `model_id`, exporting only if needed."""
    folder = out_root / model_id
    reason = stale_reason(model_id, folder, weights_file)
    if reason is None:
        log.info("export %s is up to date in %s", model_id, folder)
        return folder
    log.info("export %s needed: %s", model_id, reason)
    return export_model(model_id, out_root, weights_file)
