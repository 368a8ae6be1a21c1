"""What each service's real process has loaded, read from its memory map: the gateway holds
neither PyTorch nor ONNX Runtime, the features service no PyTorch (issue 13's thin gateway)."""

from __future__ import annotations

from styleblend.v1 import styleblend_pb2 as pb

from tests.reliability.client import small_blend
from tests.reliability.processes import ProcessGraph

TORCH = "libtorch"  # libtorch.so, libtorch_cpu.so, libtorch_python.so, libtorch_cuda.so
ONNX_RUNTIME = "onnxruntime"  # onnxruntime_pybind11_state.so, libonnxruntime_providers_*.so


def mapped_files(pid: int) -> set[str]:
    """Every file the process has mapped: shared libraries and extension modules."""
    with open(f"/proc/{pid}/maps") as maps:
        return {fields[5] for line in maps if len(fields := line.split()) >= 6}


def loaded(graph: ProcessGraph, name: str, library: str) -> list[str]:
    return sorted(path for path in mapped_files(graph.processes[name].pid) if library in path)


def test_each_service_loads_only_its_own_runtime(processes: ProcessGraph) -> None:
    stub = processes.stub()
    # A whole blend first: a library imported lazily on a request's path counts too.
    events = [response.event for response in stub.Blend(small_blend(3), timeout=120)]
    assert events[-1].HasField("result")
    stub.UploadImage(pb.UploadImageRequest(data=events[-1].result.image), timeout=30)
    assert stub.GetInfo(pb.GetInfoRequest(), timeout=30).model == "vgg19"
    # The way of looking is checked where the libraries must be.
    assert loaded(processes, "reconstruction", TORCH)
    assert loaded(processes, "features", ONNX_RUNTIME)
    assert loaded(processes, "gateway", TORCH) == []
    assert loaded(processes, "gateway", ONNX_RUNTIME) == []
    assert loaded(processes, "features", TORCH) == []
    assert loaded(processes, "blending", TORCH) == []
    assert loaded(processes, "blending", ONNX_RUNTIME) == []
