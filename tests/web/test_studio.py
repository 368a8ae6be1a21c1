"""The studio in a real browser: Debian's Chromium driven by Playwright, against the real graph."""

from __future__ import annotations

import base64
import io
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from bench.ports import free_port
from services.gateway.web import start_web
from tests.conftest import Graph, address, start_gateway
from tests.web.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}")

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, FilePayload, Page

expect = sync_api.expect
WAIT_MS = 30_000  # a step of the optimisation at 64 px takes well under a second


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserContext]:
    with (
        tempfile.TemporaryDirectory(prefix="chromium-") as profile,
        sync_api.sync_playwright() as pw,
    ):
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 860},
        )
        yield context
        context.close()


@dataclass
class Studio:
    page: Page
    sent: list[dict[str, object]]  # the JSON frames the page sent on its session socket
    errors: list[str]  # uncaught errors in the page's script

    def open(self, url: str) -> None:
        self.page.goto(url)
        expect(self.page.get_by_test_id("model-info")).to_contain_text("vgg19")

    def add_sample(self, name: str, index: int) -> None:
        self.page.get_by_test_id(f"sample-{name}").click()
        expect(self.page.get_by_test_id(f"source-{index}")).to_contain_text(name)

    def set_weight(self, slider: str, value: float) -> None:
        """Move a slider with the keyboard, as a person can: Home/End, then arrow steps of 0.05."""
        handle = self.page.get_by_test_id(slider)
        handle.focus()
        handle.press("End" if value > 0.5 else "Home")
        steps = round(abs((1.0 if value > 0.5 else 0.0) - value) / 0.05)
        for _ in range(steps):
            handle.press("ArrowLeft" if value > 0.5 else "ArrowRight")
        expect(handle).to_have_value(f"{value:g}")

    def attribute(self, test_id: str, name: str) -> int:
        return int(self.page.get_by_test_id(test_id).get_attribute(name) or 0)

    def wait_for_preview(self, from_iteration: int) -> tuple[int, str]:
        """The first preview the page shows at or after an iteration: (iteration, its data URL)."""
        self.page.wait_for_function(
            """(from) => {
                const view = document.querySelector('[data-testid="preview"]');
                return view.dataset.kind === "preview" && Number(view.dataset.iteration) >= from;
            }""",
            arg=from_iteration,
            timeout=WAIT_MS,
        )
        view = self.page.get_by_test_id("preview")
        return int(view.get_attribute("data-iteration") or 0), view.get_attribute("src") or ""

    def wait_until_in_effect(self, update_id: int) -> int:
        """Wait until progress says an update is in effect; returns the iteration it took effect."""
        status = self.page.get_by_test_id("update-status")
        expect(status).to_have_attribute("data-update-id", str(update_id), timeout=WAIT_MS)
        expect(status).to_contain_text(f"Update #{update_id} in effect since iteration")
        return self.attribute("update-status", "data-update-iteration")

    def updates(self) -> dict[int, dict[str, object]]:
        found = {}
        for frame in self.sent:
            update = frame.get("update")
            if isinstance(update, dict):
                found[int(update["updateId"])] = update
        return found


@pytest.fixture
def studio(browser: BrowserContext) -> Iterator[Studio]:
    page = browser.new_page()
    studio = Studio(page, [], [])
    page.on("pageerror", lambda error: studio.errors.append(str(error)))
    page.on(
        "websocket",
        lambda socket: socket.on(
            "framesent", lambda payload: studio.sent.append(json.loads(payload))
        ),
    )
    yield studio
    page.close()
    assert studio.errors == []


def stroke_map(update: dict[str, object], index: int) -> np.ndarray:
    """The style map an update carries for one source, as a greyscale array."""
    sources = update["sources"]
    assert isinstance(sources, list)
    (change,) = [s for s in sources if s.get("index", 0) == index]
    png = base64.b64decode(change["styleMap"]["data"])
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"))


def test_a_session_follows_the_sliders_and_the_brush(studio: Studio, studio_url: str) -> None:
    page = studio.page
    studio.open(studio_url)
    studio.add_sample("astronaut", 0)
    studio.add_sample("starry_night", 1)
    studio.set_weight("content-0", 1.0)
    studio.set_weight("style-0", 0.0)
    studio.set_weight("style-1", 1.0)
    studio.set_weight("content-1", 0.0)
    page.get_by_test_id("size").fill("64")
    page.get_by_test_id("iterations").fill("400")
    page.get_by_test_id("start").click()

    before, before_image = studio.wait_for_preview(1)
    assert before_image.startswith("data:image/jpeg;base64,")

    # Each key press on a slider mid-run sends an update; the gateway coalesces them, and the
    # last one takes effect.
    studio.set_weight("style-1", 0.5)
    slider_update = studio.attribute("update-status", "data-sent-id")
    assert sorted(studio.updates()) == list(range(1, slider_update + 1))
    took_effect = studio.wait_until_in_effect(slider_update)
    assert took_effect > before
    assert studio.updates()[slider_update]["sources"] == [
        {"index": 1, "styleWeight": 0.5, "contentWeight": 0}
    ]
    after, after_image = studio.wait_for_preview(took_effect)
    assert after > before and after_image != before_image

    # A brush stroke for the style source, left to right across the upper third.
    page.get_by_test_id("brush-1").check()
    box = page.get_by_test_id("canvas").bounding_box()
    assert box is not None
    y = box["y"] + box["height"] / 3
    page.mouse.move(box["x"] + 10, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 10, y, steps=12)
    page.mouse.up()
    stroke_update = slider_update + 1
    expect(page.get_by_test_id("update-status")).to_have_attribute(
        "data-sent-id", str(stroke_update)
    )
    studio.wait_until_in_effect(stroke_update)
    painted = stroke_map(studio.updates()[stroke_update], 1)
    height = painted.shape[0]
    assert painted.shape == (256, 256)  # the astronaut is square, and so is the canvas
    assert painted[height // 3, 20:-20].min() > 200  # white along the stroke
    assert painted[-20:].max() < 50  # black where nothing was painted

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "web-studio-running.png", full_page=True)

    page.get_by_test_id("finish").click()
    result = page.get_by_test_id("result")
    expect(result).to_be_visible(timeout=WAIT_MS)
    assert page.get_by_test_id("preview").get_attribute("data-kind") == "result"
    expect(page.get_by_test_id("result-stats")).to_contain_text("finished early")
    expect(page.get_by_test_id("start")).to_be_enabled()
    size = result.evaluate("image => [image.naturalWidth, image.naturalHeight]")
    assert size == [64, 64]
    with page.expect_download() as download:
        page.get_by_test_id("download").click()
    saved = download.value.path()
    assert Image.open(saved).format == "PNG"
    assert {"finish": {}} in studio.sent
    page.screenshot(path=ARTIFACTS / "web-studio.png", full_page=True)


def test_a_refused_blend_is_explained_in_words(studio: Studio, studio_url: str) -> None:
    page = studio.page
    studio.open(studio_url)
    studio.add_sample("chelsea", 0)
    studio.add_sample("the_scream", 1)
    page.get_by_test_id("size").fill("4096")  # the graph under test allows 512
    page.get_by_test_id("start").click()
    message = page.get_by_test_id("message")
    expect(message).to_be_visible(timeout=WAIT_MS)
    expect(message).to_contain_text("max_side_px 4096 is over the limit of 512")
    expect(message).to_contain_text("RESOURCE_EXHAUSTED")
    expect(page.get_by_test_id("start")).to_be_enabled()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "web-studio-error.png", full_page=True)


def test_a_file_that_is_not_an_image_is_refused_in_words(studio: Studio, studio_url: str) -> None:
    page = studio.page
    studio.open(studio_url)
    notes: FilePayload = {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"}
    page.get_by_test_id("upload").set_input_files(notes)
    message = page.get_by_test_id("message")
    expect(message).to_contain_text("notes was refused")
    expect(message).to_contain_text("INVALID_ARGUMENT")
    expect(page.get_by_test_id("sources")).to_be_empty()


def test_the_fast_network_answers_and_follows_the_strength_slider(
    studio: Studio, studio_url: str
) -> None:
    page = studio.page
    studio.open(studio_url)
    studio.add_sample("chelsea", 0)
    studio.add_sample("starry_night", 1)
    studio.set_weight("content-0", 1.0)
    studio.set_weight("style-0", 0.0)
    studio.set_weight("style-1", 1.0)
    studio.set_weight("content-1", 0.0)
    page.get_by_test_id("size").fill("64")
    mode = page.get_by_test_id("mode")
    mode.select_option(label="Fast network test-model (starry, scream, matisse): instant")
    page.get_by_test_id("start").click()
    _, first = studio.wait_for_preview(0)
    assert first.startswith("data:image/png;base64,")

    studio.set_weight("strength", 0.5)
    last = studio.attribute("update-status", "data-sent-id")
    status = page.get_by_test_id("update-status")
    expect(status).to_contain_text(f"Update #{last} in effect", timeout=WAIT_MS)
    assert studio.updates()[last]["fastStrength"] == 0.5
    assert page.get_by_test_id("preview").get_attribute("src") != first

    page.get_by_test_id("finish").click()
    expect(page.get_by_test_id("result-stats")).to_contain_text("made by the fast network")
    assert not studio.errors


def test_a_painting_of_ones_own_is_blended_at_once_by_the_universal_method(
    studio: Studio, studio_url: str
) -> None:
    page = studio.page
    studio.open(studio_url)
    mode = page.get_by_test_id("mode")
    # With decoders loaded, a blend starts with the universal image and refines from it.
    assert json.loads(mode.input_value()) == {"universal": {"refine": True}}
    studio.add_sample("chelsea", 0)
    rng = np.random.default_rng(3)
    strokes = np.full((96, 96, 3), 230, np.uint8)
    for row in rng.integers(0, 90, 14):
        strokes[row : row + 5, :] = (200, 30, 30)  # a painting no network was trained on
    buffer = io.BytesIO()
    Image.fromarray(strokes).save(buffer, format="PNG")
    painting: FilePayload = {"name": "red-strokes.png", "mimeType": "image/png",
                             "buffer": buffer.getvalue()}  # fmt: skip
    page.get_by_test_id("upload").set_input_files(painting)
    expect(page.get_by_test_id("source-1")).to_contain_text("red-strokes")
    studio.set_weight("content-0", 1.0)
    studio.set_weight("style-0", 0.0)
    studio.set_weight("style-1", 1.0)
    studio.set_weight("content-1", 0.0)
    page.get_by_test_id("size").fill("64")
    mode.select_option(label="Universal (any images): instant")
    page.get_by_test_id("start").click()
    _, first = studio.wait_for_preview(0)
    assert first.startswith("data:image/png;base64,")
    expect(page.get_by_test_id("iteration")).to_contain_text("Universal image for update #0")

    studio.set_weight("strength", 0.5)
    last = studio.attribute("update-status", "data-sent-id")
    status = page.get_by_test_id("update-status")
    expect(status).to_contain_text(f"Update #{last} in effect", timeout=WAIT_MS)
    assert studio.updates()[last]["universalStrength"] == 0.5
    assert page.get_by_test_id("preview").get_attribute("src") != first

    page.get_by_test_id("finish").click()
    expect(page.get_by_test_id("result-stats")).to_contain_text(
        "made in one pass by the universal decoders"
    )
    assert not studio.errors


def test_the_studio_waits_for_a_gateway_still_starting(studio: Studio, graph: Graph) -> None:
    # `styleblend up` serves the page before the graph answers; a person who opens it then
    # should not have to reload once the gateway is up.
    port = free_port()
    web = start_web("127.0.0.1", 0, f"127.0.0.1:{port}")
    gateway = None
    try:
        page = studio.page
        page.goto(f"http://127.0.0.1:{web.port}/")
        message = page.get_by_test_id("message")
        expect(message).to_contain_text("not answering yet", timeout=WAIT_MS)
        expect(page.get_by_test_id("model-info")).to_have_text("The gateway is not answering.")
        upstreams = {name: address(getattr(graph, name))
                     for name in ("features", "blending", "reconstruction")}  # fmt: skip
        gateway, _ = start_gateway(upstreams, port=port)
        expect(page.get_by_test_id("model-info")).to_contain_text("vgg19", timeout=WAIT_MS)
        expect(message).to_be_hidden()
        assert not studio.errors
    finally:
        if gateway is not None:
            gateway.stop(0)
        web.stop()


def test_the_blend_panels_fields_stay_inside_it(studio: Studio, studio_url: str) -> None:
    # The longest method name ("… instant, then refined") once widened its select, and every
    # field with it, past the panel's right edge.
    page = studio.page
    studio.open(studio_url)
    panel = page.locator(".panel", has=page.get_by_test_id("mode")).bounding_box()
    assert panel is not None
    for test_id in ("mode", "strength", "size", "iterations", "optimizer", "color", "start"):
        box = page.get_by_test_id(test_id).bounding_box()
        assert box is not None, test_id
        assert panel["x"] <= box["x"] and box["x"] + box["width"] <= panel["x"] + panel["width"], (
            f"{test_id}: {box} is not inside the panel {panel}"
        )
