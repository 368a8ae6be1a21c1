from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from services.common import images
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.providers import TensorRTSettings, choose_providers, session_providers
from services.features.core import FeatureExtractor, cut_to, gram
from tests.conftest import sample


@pytest.fixture(scope="module")
def extractor(vgg19_dir: Path) -> FeatureExtractor:
    return FeatureExtractor(vgg19_dir, ["CPUExecutionProvider"], cache_bytes=64 * 1024 * 1024)


def test_gram_is_f_ft_over_hw() -> None:
    features = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)
    flat = features.reshape(3, 20).astype(np.float64)
    np.testing.assert_allclose(gram(features), flat @ flat.T / 20, rtol=1e-6)


def test_providers_follow_the_wanted_order_filtered_by_what_exists() -> None:
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(wanted, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    available = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(wanted, available) == available
    with pytest.raises(FailedPrecondition, match="offers \\['CPUExecutionProvider'\\]"):
        choose_providers(["CUDAExecutionProvider"], ["CPUExecutionProvider"])


def test_extract_matches_pytorch_and_caches(extractor: FeatureExtractor) -> None:
    from export.models import build_feature_net
    from services.common import images

    image = sample("style/the_scream.jpg")
    first = extractor.extract(image, 48, 64, ["relu1_1", "relu3_1"], ["relu4_2"])
    assert not first.cached
    assert first.grams["relu3_1"].shape == (256, 256)
    assert first.features["relu4_2"].shape == (512, 8, 6)

    net, _ = build_feature_net("vgg19")
    pixels = torch.as_tensor(images.to_canvas(image, 48, 64)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = net(pixels, ["relu3_1"])["relu3_1"][0].numpy()
    np.testing.assert_allclose(first.grams["relu3_1"], gram(expected), rtol=1e-3, atol=1e-3)

    passes = extractor.forward_passes
    again = extractor.extract(image, 48, 64, ["relu3_1"], ["relu4_2"])
    assert again.cached and extractor.forward_passes == passes
    np.testing.assert_array_equal(again.grams["relu3_1"], first.grams["relu3_1"])
    extractor.extract(image, 48, 64, ["relu5_1"], [])  # a new layer runs the model once
    assert extractor.forward_passes == passes + 1


def test_each_set_of_taps_runs_a_graph_cut_to_it(extractor: FeatureExtractor) -> None:
    session = extractor.session_for(["relu4_2", "relu1_1"])
    assert [output.name for output in session.get_outputs()] == ["relu1_1", "relu4_2"]
    model = onnx.load(str(extractor.model_path))
    cut = cut_to(model, extractor.manifest.input_name, ["relu4_2"])
    convolutions = [[node for node in m.graph.node if node.op_type == "Conv"] for m in (model, cut)]
    assert (len(convolutions[0]), len(convolutions[1])) == (16, 10)  # conv1_1 … conv4_2
    assert extractor.session_for(["relu1_1", "relu4_2", "relu1_1"]) is session  # kept, by set
    image = sample("content/coffee.jpg")
    whole = extractor.extract(image, 64, 64, ["relu1_1"], ["relu4_2", "relu5_4"])
    cut = extractor.session_for(["relu4_2"])
    pixels = images.to_canvas(image, 64, 64).transpose(2, 0, 1)[None]
    (alone,) = cut.run(["relu4_2"], {extractor.manifest.input_name: np.ascontiguousarray(pixels)})
    np.testing.assert_allclose(alone[0], whole.features["relu4_2"], rtol=1e-5, atol=1e-5)


def test_unknown_layers_and_tiny_sizes_are_refused(extractor: FeatureExtractor) -> None:
    image = sample("content/coffee.jpg")
    with pytest.raises(
        InvalidArgument, match="gram_layers: unknown layer\\(s\\) conv1_1; vgg19 has"
    ):
        extractor.extract(image, 64, 64, ["conv1_1"], [])
    with pytest.raises(InvalidArgument, match="size 16×64: each side must be at least 32"):
        extractor.extract(image, 16, 64, ["relu1_1"], [])
    with pytest.raises(InvalidArgument, match="not a readable image"):
        extractor.extract(b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 64, 64, ["relu1_1"], [])


def test_tensorrt_gets_fp16_an_engine_cache_and_a_profile_the_others_get_nothing() -> None:
    settings = TensorRTSettings(fp16=True, engine_cache=Path("cache"), sides=(32, 512, 2048))
    chosen = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    providers = session_providers(
        chosen, settings, lambda side: {"image": (1, 3, side, side), "style_weights": (1, 4)}
    )
    assert providers[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert isinstance(providers[0], tuple)
    name, options = providers[0]
    assert name == "TensorrtExecutionProvider"
    assert options == {
        "trt_fp16_enable": "True",
        "trt_profile_min_shapes": "image:1x3x32x32,style_weights:1x4",
        "trt_profile_opt_shapes": "image:1x3x512x512,style_weights:1x4",
        "trt_profile_max_shapes": "image:1x3x2048x2048,style_weights:1x4",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": "cache",
        "trt_timing_cache_enable": "True",
    }
    (plain,) = session_providers(chosen[:1], TensorRTSettings(fp16=False), lambda side: {})
    assert isinstance(plain, tuple)
    assert plain[1]["trt_fp16_enable"] == "False"
    assert "trt_engine_cache_path" not in plain[1]
