"""The feed-forward network on a CUDA GPU: frames per second by precision and launch mode.

    python -m bench.fast_gpu --model models/fast/demo --out report-dir

Times one stylisation at 512 and 1024 px (median of CUDA-event timings after warm-up) in
float32 NCHW, float32 channels_last with TF32, float16 channels_last, and float16 replayed from
a captured CUDA graph; checks each against float32 by relative error; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from export.fastnet import FastStyleNet
from export.train_fast import load


def timed(run: Callable[[], torch.Tensor], repeats: int = 50) -> float:
    """Median milliseconds of `run` by CUDA events, after a warm-up."""
    for _ in range(10):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graphed(
    net: FastStyleNet, image: torch.Tensor, weights: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """Capture one forward pass in a CUDA graph: a replay launches every kernel at once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            net(image, weights)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = net(image, weights)

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


def measure(net: FastStyleNet, side: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(side)
    image = torch.rand(1, 3, side, side, device="cuda")
    weights = torch.softmax(torch.randn(1, net.styles, device="cuda"), dim=1)
    results = {}
    with torch.no_grad():
        torch.backends.cudnn.allow_tf32 = False
        net32 = net.float().cuda().eval()
        want = net32(image, weights)
        results["float32 NCHW"] = {"ms": timed(lambda: net32(image, weights)), "error": 0.0}
        torch.backends.cudnn.allow_tf32 = True
        net_cl = net32.to(memory_format=torch.channels_last)
        image_cl = image.to(memory_format=torch.channels_last)
        got = net_cl(image_cl, weights)
        results["tf32 channels_last"] = {
            "ms": timed(lambda: net_cl(image_cl, weights)),
            "error": relative(got, want),
        }
        net16 = FastStyleNet(net.styles, net.layout).cuda().eval()
        net16.load_state_dict(net32.state_dict())
        net16 = net16.half().to(memory_format=torch.channels_last)
        image16, weights16 = image_cl.half(), weights.half()
        got = net16(image16, weights16)
        results["float16 channels_last"] = {
            "ms": timed(lambda: net16(image16, weights16)),
            "error": relative(got, want),
        }
    replay = graphed(net16, image16, weights16)
    got = replay()
    results["float16 CUDA graph"] = {"ms": timed(replay), "error": relative(got, want)}
    for row in results.values():
        row["fps"] = 1000 / row["ms"]
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a trained model folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    net, _, _ = load(args.model)
    sizes = {side: measure(net, side) for side in (512, 1024)}
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "sizes": sizes}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fast_gpu.json").write_text(json.dumps(report, indent=2))
    print(f"{report['gpu']}, torch {report['torch']}")
    for side, rows in sizes.items():
        for mode, row in rows.items():
            print(f"{side:5d} px  {mode:22s} {row['ms']:8.3f} ms {row['fps']:8.0f} fps  "
                  f"rel. error {row['error']:.1e}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
