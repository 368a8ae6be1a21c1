"""The universal method's decoders (WCT, Li et al. 2017): VGG19's encoder mirrored back to pixels.

The decoder for `relu{N}_1` undoes VGG19 up to that layer: each convolution in reverse order,
nearest-neighbour upsampling where the encoder pooled, reflection-padded 3×3 convolutions and
ReLUs, ending on 3 RGB channels. `width` scales every hidden layer's channels, as the slimmed
decoders of Wang et al. (2020, Collaborative Distillation) do for speed; 1.0 is Li et al.'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from services.common.universalmodel import DECODER_INPUT, DECODER_OUTPUT

# VGG19's blocks: output channels and convolutions of each; a 2×2 pool between blocks.
VGG19_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))
LAYERS = tuple(f"relu{block}_1" for block in range(1, len(VGG19_BLOCKS) + 1))
MIN_CHANNELS = 8  # the slimmest hidden layer a width may leave


def level(layer: str) -> int:
    """relu4_1 -> 4: the VGG19 block whose first ReLU the decoder inverts."""
    if layer not in LAYERS:
        raise ValueError(f"no universal decoder for {layer!r}; choose from {list(LAYERS)}")
    return LAYERS.index(layer) + 1


def channels(layer: str) -> int:
    return VGG19_BLOCKS[level(layer) - 1][0]


def stride(layer: str) -> int:
    return 2 ** (level(layer) - 1)


def coarse_to_fine(layers: tuple[str, ...]) -> tuple[str, ...]:
    """Deepest first: the order the method applies its decoders."""
    return tuple(sorted(set(layers), key=level, reverse=True))


def _conv(channels_in: int, channels_out: int, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(channels_in, channels_out, 3)]
    return [*layers, nn.ReLU(inplace=True)] if relu else layers


class UniversalDecoder(nn.Module):
    """Activations at `layer` (B×C×h×w) to RGB pixels (B×3×(h·stride)×(w·stride)), unclamped.

    `image` clamps to [0, 1]; training uses the raw output so the pixel loss keeps its gradient
    where a pixel overshoots.
    """

    input_scale: Tensor

    def __init__(self, layer: str, width: float = 1.0) -> None:
        super().__init__()
        if not 0 < width <= 1:
            raise ValueError(f"width must be within (0, 1], got {width}")
        self.layer, self.width = layer, width
        top = level(layer)
        hidden = [max(MIN_CHANNELS, round(c * width)) for c, _ in VGG19_BLOCKS]
        modules: list[nn.Module] = []
        # The first convolution of block `top`, undone; then blocks top-1 … 1 in reverse.
        previous = channels(layer)
        for block in range(top - 1, 0, -1):
            modules += _conv(previous, hidden[block - 1])
            modules.append(nn.Upsample(scale_factor=2, mode="nearest"))
            for _ in range(VGG19_BLOCKS[block - 1][1] - 1):
                modules += _conv(hidden[block - 1], hidden[block - 1])
            previous = hidden[block - 1]
        modules += _conv(previous, 3, relu=False)
        self.net = nn.Sequential(*modules)
        self.register_buffer("input_scale", torch.ones(()))

    def initialise(self, features: Tensor, pixels: Tensor) -> None:
        """Scale the input to unit RMS (VGG's Caffe weights give hundreds at relu1_1) and start
        the output at the photos' mean colour. The scale is a buffer, not the first weights:
        Adam's steps do not shrink with a weight, so small weights would be thrown about."""
        self.input_scale.fill_(1 / float(features.pow(2).mean().sqrt().clamp_min(1e-6)))
        last = self.net[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        last.bias.copy_(pixels.mean(dim=(0, 2, 3)))

    @property
    def channels(self) -> int:
        return channels(self.layer)

    @property
    def stride(self) -> int:
        return stride(self.layer)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features * self.input_scale)

    def image(self, features: Tensor) -> Tensor:
        return self(features).clamp(0, 1)


class _Clamped(nn.Module):
    def __init__(self, decoder: UniversalDecoder) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, features: Tensor) -> Tensor:
        return self.decoder.image(features)


def export_onnx(decoder: UniversalDecoder, path: Path, opset: int) -> Path:
    """ONNX from `features` (1×C×h×w, h and w dynamic) to `image` in [0, 1]."""
    dim = torch.export.Dim
    # Reflection padding needs two pixels a side; unequal sides keep height and width apart.
    dynamic_shapes = {DECODER_INPUT: {2: dim("height", min=2), 3: dim("width", min=2)}}
    torch.onnx.export(
        _Clamped(decoder).eval(),
        (torch.rand(1, decoder.channels, 6, 10),),
        str(path),
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=[DECODER_INPUT],
        output_names=[DECODER_OUTPUT],
        opset_version=opset,
        external_data=False,  # one self-contained file
        verbose=False,
    )
    return path
