"""The `styleblend` command as a person uses it."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from styleblend.v1 import styleblend_pb2, styleblend_pb2_grpc

from bench.ports import free_port
from clients.cli.main import main
from clients.cli.script import ScriptError, parse_script
from clients.cli.sources import parse_source
from services.common import images
from tests.conftest import ROOT, SAMPLES, Graph

ASTRONAUT = str(SAMPLES / "content" / "astronaut.jpg")
STARRY = str(SAMPLES / "style" / "starry_night.jpg")
SCREAM = str(SAMPLES / "style" / "the_scream.jpg")


def test_source_weights_are_parsed_and_checked() -> None:
    parsed = parse_source(f"{STARRY}:style=0.7")
    assert (parsed.path, parsed.style_weight, parsed.content_weight) == (Path(STARRY), 0.7, 0.0)
    assert parse_source(f"{ASTRONAUT}:content=1:style=0.1").style_weight == 0.1
    for text, message in [
        (f"{STARRY}", "give a weight"),
        (f"{STARRY}:style=-1", "style must be a finite number >= 0"),
        (f"{STARRY}:style=lots", "'lots' is not a number"),
        (f"{STARRY}:colour=1", "unknown option 'colour'"),
        (f"{STARRY}:style=1:mask=nowhere.png", "nowhere.png: no such file"),
        ("missing.jpg:style=1", "missing.jpg: no such file"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse_source(text)


def test_blend_writes_the_result_and_previews(graph: Graph, tmp_path: Path, capsys) -> None:
    out = tmp_path / "result.png"
    code = main(
        [
            "blend",
            "--source", f"{ASTRONAUT}:content=1",
            "--source", f"{STARRY}:style=1",
            "--size", "64", "--iterations", "12", "--preview-every", "5", "--seed", "2",
            "--previews", str(tmp_path / "previews"),
            "-o", str(out),
            "--gateway", graph.address,
        ]
    )  # fmt: skip
    assert code == 0
    assert Image.open(out).size == (64, 64)
    previews = sorted(p.name for p in (tmp_path / "previews").iterdir())
    assert previews == ["preview_00005.jpg", "preview_00010.jpg"]
    assert f"wrote {out} (64×64, 12 iterations" in capsys.readouterr().out


def test_without_a_gateway_it_says_how_to_start_one(tmp_path: Path, capsys) -> None:
    address = f"127.0.0.1:{free_port()}"
    code = main(["blend", "--source", f"{STARRY}:style=1", "-o", str(tmp_path / "x.png"),
                 "--gateway", address])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert f"no styleblend gateway is reachable at {address}" in err
    assert "styleblend up" in err and "Traceback" not in err


def test_server_errors_are_printed_not_raised(graph: Graph, tmp_path: Path, capsys) -> None:
    code = main(["blend", "--source", f"{STARRY}:style=1", "--size", "4096",
                 "-o", str(tmp_path / "x.png"), "--gateway", graph.address])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "error (RESOURCE_EXHAUSTED): max_side_px 4096 is over the limit of 512" in err
    assert not (tmp_path / "x.png").exists()


def test_info_names_the_model(graph: Graph, capsys) -> None:
    assert main(["info", "--gateway", graph.address]) == 0
    out = capsys.readouterr().out
    assert "model          vgg19" in out and "relu4_2" in out
    assert "extraction     at most 4096 px a side, 4,194,304 pixels" in out
    assert "fast           test-model: starry, scream, matisse" in out
    assert "universal      test-universal: decoders for relu2_1 relu1_1" in out


LOADED = """
import json, sys
from clients.cli.main import main
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit:  # --help
        pass
print(json.dumps([name for name in ("onnxruntime", "torch") if name in sys.modules]))
"""


def loaded_by(*commands: list[str]) -> list[str]:
    """ONNX Runtime and PyTorch, where running these commands in a fresh process loaded them."""
    done = subprocess.run(
        [sys.executable, "-c", LOADED, json.dumps(commands)],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return list(json.loads(done.stdout.splitlines()[-1]))


def test_info_and_blend_load_neither_onnx_runtime_nor_pytorch(tmp_path: Path) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    assert loaded_by(
        ["--help"],
        ["info", "--help"],
        ["info", "--gateway", nowhere],
        ["blend", "--source", f"{STARRY}:style=1", "-o", str(tmp_path / "x.png"),
         "--gateway", nowhere],
        ["video", "--help"],
    ) == []  # fmt: skip
    # The check sees them when a command does load them: `video` runs the network here.
    video = ["video", "in.mp4", "-o", str(tmp_path / "out.mp4"), "--style", "starry"]
    assert "onnxruntime" in loaded_by(video)


@pytest.mark.parametrize("single_process", [False, True], ids=["processes", "single-process"])
def test_up_serves_and_stops_on_sigterm(vgg19_dir: Path, single_process: bool) -> None:
    ports = {name: free_port() for name in ("gateway", "features", "blending", "reconstruction")}
    command = [sys.executable, "-m", "clients.cli.main", "up"]
    command += [f"--{name}-port={port}" for name, port in ports.items()]
    http_port = free_port()
    command += [f"--http-port={http_port}"]
    command += ["--single-process"] if single_process else []
    env = {**os.environ, "STYLEBLEND_MODEL_DIR": str(vgg19_dir.parent)}
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()  # blocks until the graph is up
        assert banner.startswith("styleblend is up"), banner
        studio = ""
        while "studio" not in studio:
            studio = process.stdout.readline()
        assert f"http://127.0.0.1:{http_port}/" in studio
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10) as page:
            assert page.status == 200 and b"styleblend" in page.read()
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['gateway']}")
        info = styleblend_pb2_grpc.StyleBlendStub(channel).GetInfo(
            styleblend_pb2.GetInfoRequest(), timeout=30
        )
        assert info.model == "vgg19"
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - started < 30
    finally:
        if process.poll() is None:
            process.kill()


def test_blend_can_start_from_a_given_image(graph: Graph, tmp_path: Path) -> None:
    out = tmp_path / "from-image.png"
    code = main(["blend", "--source", f"{STARRY}:style=1", "--init-image", ASTRONAUT,
                 "--size", "64", "--iterations", "1", "--style-loss-weight", "0",
                 "--tv-loss-weight", "0", "-o", str(out), "--gateway", graph.address])  # fmt: skip
    assert code == 0
    # With no loss to follow, one step leaves the start image as it was: the astronaut, cropped
    # to the canvas of the only source, Starry Night (512×320).
    result = np.asarray(Image.open(out), dtype=np.float32) / 255
    start = images.to_canvas((SAMPLES / "content" / "astronaut.jpg").read_bytes(), 64, 40)
    assert np.abs(result - start).max() < 2 / 255


def test_a_recipe_replays_to_the_same_image(graph: Graph, tmp_path: Path) -> None:
    mask = tmp_path / "left.png"
    left = np.zeros((64, 64, 3), np.uint8)
    left[:, :32] = 255
    Image.fromarray(left).save(mask)
    first = tmp_path / "first.png"
    arguments = ["--size", "64", "--iterations", "8", "--gateway", graph.address]
    code = main(["blend", "--source", f"{ASTRONAUT}:content=1",
                 "--source", f"{STARRY}:style=1:mask={mask}", "--preserve-color", "histogram",
                 "--scales", "2", "-o", str(first), *arguments])  # fmt: skip
    assert code == 0
    recipe = json.loads(Image.open(first).text["styleblend:recipe"])  # type: ignore[attr-defined]
    assert recipe["model"] == "vgg19"
    assert recipe["request"]["iterations_per_scale"] == [4, 4]
    assert recipe["request"]["sources"][1]["style_map"]["upload_id"] in recipe["paths"]
    again = tmp_path / "again.png"
    assert (
        main(["blend", "--recipe", str(first), "-o", str(again), "--gateway", graph.address]) == 0
    )
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))


def test_a_scripted_session_applies_its_changes_where_written(
    graph: Graph, tmp_path: Path, capsys
) -> None:
    script = tmp_path / "moves.txt"
    script.write_text(
        "# swap the styles halfway\nat 5: style 0,0,1\nat 5: tv-loss 0.5\nat 9: finish\n"
    )
    out = tmp_path / "scripted.png"
    code = main(["blend", "--source", f"{ASTRONAUT}:content=1", "--source", f"{STARRY}:style=1",
                 "--source", f"{SCREAM}:style=0", "--size", "64", "--iterations", "40",
                 "--script", str(script), "-o", str(out), "--gateway", graph.address])  # fmt: skip
    assert code == 0
    recipe = json.loads(Image.open(out).text["styleblend:recipe"])  # type: ignore[attr-defined]
    # Both lines of iteration 5 are in the recipe, where they took effect together.
    ids = [(u["at_iteration"], int(u["update_id"])) for u in recipe["updates"]]
    assert ids == [(5, 2), (5, 3)]
    assert recipe["updates"][1]["tv_loss_weight"] == 0.5
    done = int(re.search(r"(\d+) iterations in", capsys.readouterr().out)[1])  # type: ignore[index]
    assert 9 <= done < 40


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("at five: style 1", "moves.txt:1: expected `at N: command ...`"),
        ("at 3: paint 1", "moves.txt:1: unknown command 'paint'"),
        ("at 3: style 1,x", "moves.txt:1: 'x' is not a number"),
        ("\nat 0: finish", "moves.txt:2: iterations count from 1"),
        ("at 3: mask 1 missing.png", "moves.txt:1: missing.png: no such file"),
    ],
)
def test_script_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ScriptError, match=re.escape(message)):
        parse_script(text, "moves.txt", tmp_path)


def test_a_recipe_whose_images_moved_is_refused(graph: Graph, tmp_path: Path, capsys) -> None:
    style = tmp_path / "style.jpg"
    style.write_bytes((SAMPLES / "style" / "starry_night.jpg").read_bytes())
    out = tmp_path / "out.png"
    assert main(["blend", "--source", f"{style}:style=1", "--size", "64", "--iterations", "2",
                 "-o", str(out), "--gateway", graph.address]) == 0  # fmt: skip
    style.write_bytes(b"changed")
    assert (
        main(
            [
                "blend",
                "--recipe",
                str(out),
                "-o",
                str(tmp_path / "x.png"),
                "--gateway",
                graph.address,
            ]
        )
        == 1
    )
    assert "has changed since the recipe was made" in capsys.readouterr().err


def test_fast_blend_writes_the_network_image_and_replays(graph: Graph, tmp_path: Path) -> None:
    out, again = tmp_path / "fast.png", tmp_path / "again.png"
    code = main(["blend", "--source", f"{ASTRONAUT}:content=1", "--source", f"{STARRY}:style=1",
                 "--fast", "test-model", "--strength", "0.7", "--size", "64",
                 "--previews", str(tmp_path / "previews"), "-o", str(out),
                 "--gateway", graph.address])  # fmt: skip
    assert code == 0
    assert Image.open(out).size == (64, 64)
    assert [p.name for p in (tmp_path / "previews").iterdir()] == ["fast_00000.png"]
    assert main(["blend", "--recipe", str(out), "-o", str(again), "--gateway", graph.address]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_universal_blend_writes_the_one_pass_image_and_replays(
    graph: Graph, tmp_path: Path
) -> None:
    out, again = tmp_path / "universal.png", tmp_path / "again.png"
    code = main(["blend", "--source", f"{ASTRONAUT}:content=1", "--source", f"{STARRY}:style=1",
                 "--universal", "--levels", "relu1_1", "--strength", "0.7", "--size", "64",
                 "--previews", str(tmp_path / "previews"), "-o", str(out),
                 "--gateway", graph.address])  # fmt: skip
    assert code == 0
    assert Image.open(out).size == (64, 64)
    assert [p.name for p in (tmp_path / "previews").iterdir()] == ["universal_00000.png"]
    assert main(["blend", "--recipe", str(out), "-o", str(again), "--gateway", graph.address]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))


def test_universal_options_need_universal(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--levels goes with --universal"):
        main(["blend", "--source", f"{STARRY}:style=1", "--levels", "relu1_1",
              "-o", str(tmp_path / "x.png")])  # fmt: skip
    with pytest.raises(SystemExit):  # argparse: not both
        main(["blend", "--source", f"{STARRY}:style=1", "--fast", "m", "--universal",
              "-o", str(tmp_path / "x.png")])  # fmt: skip


def test_strength_without_fast_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--strength and --refine go with --fast MODEL or --univ"):
        main(["blend", "--source", f"{STARRY}:style=1", "--strength", "0.5",
              "-o", str(tmp_path / "x.png")])  # fmt: skip
