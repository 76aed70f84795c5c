"""The web page in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.conftest import ARTIFACTS, HANG_S, LONG
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
    page.wait_for_function("new Set(window.lengths.filter(n => n > 0)).size >= 3", timeout=HANG_S * 1000)
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
    painted = page.evaluate("""() => {
        const canvas = document.getElementById('boxes');
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let count = 0;
        for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) count++;
        return count;
    }""")
    assert painted > 20, f"the canvas holds {painted} painted pixels"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"web-page-moondream2-{shape}.png"), full_page=True)
    page.close()


def test_errors_are_shown_as_readable_messages(api, browser, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    page = browser.new_page()
    page.goto(api.url + "/")
    expect(page.locator("#model option")).to_have_count(4)
    page.set_input_files("#file", str(broken))
    page.fill("#prompt", "What is this?")
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("not a recognised image", timeout=30_000)
    page.close()


def test_page_has_no_external_resources(api):
    import httpx

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
