"""The web page in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import shutil
import time
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from fastapi_app.page_security import PAGE_CSP
from tests.conftest import ARTIFACTS, HANG_S, LONG, ROOT
from tests.fastapi_app.conftest import ApiProcess, api_env

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def assert_painted(page) -> None:
    """Something was drawn on the image: the canvas over it has painted pixels."""
    painted = page.evaluate("""() => {
        const canvas = document.getElementById('boxes');
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let count = 0;
        for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) count++;
        return count;
    }""")
    assert painted > 20, f"the canvas holds {painted} painted pixels"


def page_with_image(api, browser, path, data: bytes, model: str, options: int = 4):
    """The page, with ``model`` chosen (of ``options`` served) and ``data`` uploaded as an image."""
    path.write_bytes(data)
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(api.url + "/")
    expect(page.locator("#model option")).to_have_count(options)
    page.select_option("#model", model)
    page.set_input_files("#file", str(path))
    expect(page.locator("#preview")).to_be_visible()
    return page


def test_upload_ask_and_get_the_whole_answer(api, browser, tmp_path, png):
    page = page_with_image(api, browser, tmp_path / "photo.png", png, "qwen3-vl")
    page.fill("#prompt", "What is in this image?")
    page.click("#send")
    answer = page.locator("#log li.assistant").last
    expect(answer.locator(".meta")).to_contain_text("qwen3-vl", timeout=60_000)
    assert answer.inner_text().strip()
    expect(page.locator("#log li.user").last).to_contain_text("What is in this image?")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)
    page.close()


@pytest.fixture(scope="module")
def endless_api(long_triton, tmp_path_factory):
    """The service in front of ``long_triton``: an answer the page asks for never ends by itself."""
    env = api_env(tmp_path_factory, TRITON_GRPC_URL=long_triton.grpc_url, SERVED_MODELS="llava")
    env |= {"MAX_TOKENS_CAP": str(LONG), "MAX_NEW_TOKENS": str(LONG)}
    server = ApiProcess("api-endless", env).start()
    yield server
    server.stop()


def test_the_answer_streams_into_the_page_while_it_is_written(endless_api, browser, tmp_path, png, long_trace):
    """The answer cannot end by itself, so text that shows up and grows in the page came while it
    was being written, however fast or slow the machine; closing the page cancels the row."""
    page = page_with_image(endless_api, browser, tmp_path / "photo.png", png, "llava", options=1)
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const answers = document.querySelectorAll('#log li.assistant');
            if (answers.length) window.lengths.push(answers[answers.length - 1].textContent.length);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    mark = long_trace.mark()
    page.fill("#prompt", "What is in this image?")
    page.click("#send")
    page.wait_for_function("() => new Set(window.lengths.filter(n => n > 0)).size >= 3", timeout=HANG_S * 1000)
    page.close()
    [row] = long_trace.wait(mark)
    assert row["end"] == "cancelled" and row["tokens"] < LONG


@pytest.mark.parametrize(("prompt", "shape"), [("/detect red car", "boxes"), ("/point tree", "points")])
def test_moondream2_detect_and_point_are_drawn_on_the_image(api, browser, tmp_path, png, prompt, shape):
    page = page_with_image(api, browser, tmp_path / "photo.png", png, "moondream2")
    page.fill("#prompt", prompt)
    page.click("#send")
    answer = page.locator("#log li.assistant").last
    expect(answer.locator(".meta")).to_contain_text("moondream2", timeout=60_000)
    expect(answer).to_contain_text(shape if shape == "points" else "box")
    drawn = int(page.locator("#boxes").get_attribute("data-drawn"))
    assert drawn >= 1, "nothing was drawn"
    assert_painted(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"web-page-moondream2-{shape}.png"), full_page=True)
    page.close()


def test_a_failed_turn_shows_its_error_in_place_of_the_answer(api, browser, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    page = browser.new_page()
    page.goto(api.url + "/")
    expect(page.locator("#model option")).to_have_count(4)
    page.set_input_files("#file", str(broken))
    page.fill("#prompt", "What is this?")
    page.click("#send")
    failed = page.locator("#log li.assistant.failed")
    expect(failed).to_contain_text("not a recognised image", timeout=30_000)
    expect(page.locator("#log li.user")).to_contain_text("What is this?")
    expect(page.locator("#prompt")).to_have_value("What is this?")  # kept, to try again
    expect(page.locator("#send")).to_be_enabled()
    page.close()


def test_page_has_no_external_resources(api):
    html = httpx.get(api.url + "/").text + httpx.get(api.url + "/static/app.js").text
    assert "http://" not in html.replace("http://127.0.0.1", "") and "https://" not in html


def test_first_load_shows_the_models_and_no_broken_image(api, browser):
    """Before /v1/models answers (here: never), the picker lists the served models, and no
    image preview, broken icon or "Remove image" button shows before an image is chosen."""
    page = browser.new_page()
    page.route("**/v1/models", lambda route: None)  # the model list never arrives
    page.goto(api.url + "/")
    expect(page.locator("#model option")).to_have_count(4)
    assert page.locator("#model").input_value() in ("moondream2", "kosmos2", "llava", "qwen3-vl")
    for hidden in ("#preview-wrap", "#preview", "#clear-image"):
        expect(page.locator(hidden)).to_be_hidden()
    page.close()


MODELS = ("moondream2", "kosmos2", "llava", "qwen3-vl")
SAMPLE = ROOT / "docs/images/sample.jpg"  # the README's picture: the screenshots show it


def screenshot(page, name: str) -> None:
    """Into artifacts/ (the README's pictures in docs/images are copied from these)."""
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def answered(page, model: str):
    answer = page.locator("#log li.assistant").last
    expect(answer.locator(".meta")).to_contain_text(model, timeout=60_000)
    return answer


@pytest.mark.parametrize("model", MODELS)
def test_the_answer_shows_progress_while_waiting(api, browser, tmp_path, model):
    """The request is held back by the browser, so the waiting state is seen whatever the
    machine's speed; released, the answer replaces it."""
    page = page_with_image(api, browser, tmp_path / "sample.jpg", SAMPLE.read_bytes(), model)
    held = []
    page.route("**/api/chat", lambda route: held.append(route))
    page.fill("#prompt", "What is in this image?")
    page.click("#send")
    answer = page.locator("#log li.assistant").last
    expect(answer.locator(".status")).to_contain_text(f"waiting for {model}")
    deadline = time.monotonic() + HANG_S
    while not held:  # the held request reaches this process as an event: wait for it, however slow
        assert time.monotonic() < deadline, "the page sent no /api/chat request"
        page.wait_for_timeout(50)
    expect(answer).to_have_class("assistant pending")
    expect(page.locator("#send")).to_be_disabled()
    expect(page.locator("#send")).to_have_text("Answering…")
    if model == "llava":
        screenshot(page, "page-waiting")
    held[0].continue_()
    answered(page, model)
    expect(answer.locator(".status")).to_have_count(0)
    expect(answer).not_to_have_class("assistant pending")
    expect(page.locator("#send")).to_have_text("Send")
    page.close()


def test_kosmos2_draws_a_box_for_the_documented_prompt(api, browser, tmp_path):
    """The prompt the page's Kosmos-2 hint gives: the tiny checkpoint was taught a grounded
    caption for it, so its boxes go through the real model, extraction, stream and canvas."""
    page = page_with_image(api, browser, tmp_path / "sample.jpg", SAMPLE.read_bytes(), "kosmos2")
    hint = page.locator('.hint[data-model="kosmos2"]')
    expect(hint).to_be_visible()
    prompt = hint.locator("code").inner_text()
    page.fill("#prompt", prompt)
    page.click("#send")
    answered(page, "kosmos2")
    expect(page.locator("#boxes")).not_to_have_attribute("data-drawn", "0")
    assert int(page.locator("#boxes").get_attribute("data-drawn")) >= 1
    assert_painted(page)
    screenshot(page, "page-kosmos2-boxes")
    page.close()


def test_a_reload_keeps_the_answers_and_their_lines(api, browser, tmp_path, png):
    """A first visit asks for no session that cannot exist (no 404); after a reload the answer
    comes back with its "model · seconds · tokens" line, as it was shown."""
    (tmp_path / "photo.png").write_bytes(png)
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    refused = []
    page.on("response", lambda r: refused.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.goto(api.url + "/")
    expect(page.locator("#model option")).to_have_count(4)
    screenshot(page, "page-on-load")
    page.select_option("#model", "llava")
    page.set_input_files("#file", str(tmp_path / "photo.png"))
    page.fill("#prompt", "What is in this image?")
    page.click("#send")
    line = answered(page, "llava").locator(".meta").inner_text()
    text = page.locator("#log li.assistant").last.inner_text()
    assert "tokens" in line and " s · " in line
    page.reload()
    restored = page.locator("#log li.assistant")
    expect(restored).to_have_count(1)
    expect(restored.locator(".meta")).to_have_text(line)
    assert restored.inner_text() == text
    assert refused == []
    page.close()


def test_the_hints_follow_the_chosen_model(api, browser):
    page = browser.new_page()
    page.goto(api.url + "/")
    expect(page.locator("#model option")).to_have_count(4)
    for model in MODELS:
        page.select_option("#model", model)
        for hinted in ("moondream2", "kosmos2"):
            hint = page.locator(f'.hint[data-model="{hinted}"]')
            expect(hint).to_be_visible() if hinted == model else expect(hint).to_be_hidden()
    page.close()


def test_the_header_fits_a_phone_screen(api, browser):
    page = browser.new_page(viewport={"width": 360, "height": 740})
    page.goto(api.url + "/")
    expect(page.locator("#model option")).to_have_count(4)
    title, picker = page.locator("header h1").bounding_box(), page.locator("#model").bounding_box()
    line = page.evaluate("parseFloat(getComputedStyle(document.querySelector('header h1')).lineHeight) || 0")
    assert title["height"] < 1.5 * (line or 20), f"the title wraps: {title}"
    assert abs(title["y"] - picker["y"]) < title["height"], "the picker went to another line"
    assert page.evaluate("document.documentElement.scrollWidth") <= 360
    page.close()


def operations(url: str) -> int:
    document = httpx.get(url + "/openapi.json").json()
    return sum(1 for item in document["paths"].values() for method in item if method != "parameters")


def test_the_api_docs_render_offline_under_the_page_policy(api, browser):
    """/docs (Swagger UI) and /redoc load every script and style from the service: a request
    for anything elsewhere is refused by the browser and recorded, and Swagger UI runs under
    the chat page's Content-Security-Policy (a violation is a console error)."""
    origin = urlsplit(api.url).netloc
    page = browser.new_page()
    elsewhere, errors = [], []

    def refuse(route):
        elsewhere.append(route.request.url)
        route.abort()

    page.route(lambda url: urlsplit(url).netloc != origin, refuse)
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    reply = page.goto(api.url + "/docs")
    assert reply.headers["content-security-policy"] == PAGE_CSP
    expect(page.locator(".opblock")).to_have_count(operations(api.url), timeout=30_000)
    expect(page.locator(".opblock-summary-path").first).to_contain_text("/v1/")
    assert elsewhere == [] and errors == []
    screenshot(page, "api-docs")
    page.goto(api.url + "/redoc")
    expect(page.locator("h1").first).to_contain_text("vlm-serve", timeout=30_000)
    expect(page.locator("[data-section-id^='operation/']")).to_have_count(operations(api.url))
    assert [url for url in elsewhere if "redoc.ly" not in url] == []  # ReDoc's own logo, refused
    page.close()
