"""A real browser against `python app.py --demo`: what a person sees and clicks, not the API.

Debian's chromium (`apt-get install chromium`) driven by the Python playwright package; Playwright's own
browser download is never used. Skipped when either is missing. Screenshots of the Chat and Image tabs are
saved in the test's tmp dir and copied to /tmp/clair-screens/ for a human to look at.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.ollama_standin import OllamaStandin
from tests.support import App, free_port, wait_until

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
SCREENS = Path("/tmp/clair-screens")
# The README's screenshots: written there when CLAIR_UPDATE_SCREENSHOTS=1 (then committed).
README_SCREENS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
MODEL = "llama3.1:8b"

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (pip install -r requirements-dev.txt)"
)
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
expect = sync_api.expect


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def standin():
    s = OllamaStandin({MODEL: 4.9}, load_delay=0.2, unload_delay=0.3, token_delay=0.01).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("clair")


@pytest.fixture(scope="module")
def app(app_dir, standin):
    a = App(app_dir, {"OLLAMA_HOST": standin.host, "CLAIR_CHAT_BACKEND": "ollama"}, args=("--demo",))
    yield a
    a.stop()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(15_000)
    page.goto(url)
    expect(page.locator("#gpu-status")).to_contain_text("GPU", timeout=20_000)
    return page


def screenshot(page, tmp_path: Path, name: str, readme: bool = False) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    SCREENS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENS / path.name)
    if readme and os.environ.get("CLAIR_UPDATE_SCREENSHOTS") == "1":
        README_SCREENS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, README_SCREENS / path.name)


def send_chat(page, text: str):
    """Type a message, press Enter; return the locator of the assistant's reply to it."""
    before = page.get_by_test_id("bot").count()
    box = page.get_by_placeholder("Message… (Enter to send)")
    box.fill(text)
    box.press("Enter")
    expect(page.get_by_test_id("user").last).to_have_text(text)
    expect(page.get_by_test_id("bot")).to_have_count(before + 1)
    return page.get_by_test_id("bot").last


def idle(page, timeout: float = 30_000) -> None:
    """Wait until no event is running: Gradio marks the outputs' status trackers `generating` meanwhile."""
    expect(page.locator("[data-testid='status-tracker'].generating")).to_have_count(0, timeout=timeout)


def settle(locator) -> None:
    """Let the element's fade-in finish (Svelte 5 transitions use the Web Animations API). CSS animations are
    left out: a toast's 10 s countdown bar is one, and the toast is gone when it ends."""
    locator.evaluate(
        "el => Promise.all(el.getAnimations({subtree: true})"
        ".filter(a => !(a instanceof CSSAnimation)).map(a => a.finished))"
    )


def no_traceback(page) -> None:
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and 'File "' not in body, body[-2000:]


def test_page_chat_and_image_with_the_ollama_standin(app, app_dir, standin, browser, tmp_path):
    page = open_page(browser, app.url)
    try:
        # 1. The page: the demo banner says the weights are random; the GPU is free.
        expect(page.locator("#demo-banner")).to_be_visible()
        expect(page.locator("#demo-banner")).to_contain_text("random weights")
        expect(page.locator("#gpu-status")).to_contain_text("GPU free")
        expect(page.locator("#chat-notice")).to_contain_text("Chat engine: Ollama at")

        # 2. Chat: the reply streams in; the second turn carries the first one to Ollama.
        standin.reset_logs()
        expect(send_chat(page, "hello clair")).to_have_text("You said: hello clair", timeout=30_000)
        idle(page)
        expect(send_chat(page, "and again")).to_have_text("You said: and again", timeout=30_000)
        last = [r for r in standin.requests_to("/api/chat") if r.messages][-1]
        users = [m["content"] for m in last.messages if m["role"] == "user"]
        assert users == ["hello clair", "and again"], last.messages
        assert all(isinstance(m["content"], str) for m in last.messages), last.messages
        assert {"role": "assistant", "content": "You said: hello clair"} in last.messages
        idle(page)
        expect(page.locator("#gpu-status")).to_contain_text("GPU free", timeout=10_000)
        no_traceback(page)
        screenshot(page, tmp_path, "chat", readme=True)

        # 3. Image: a small render shows up in Result, its parameters in the JSON, on disk and in the gallery.
        page.get_by_role("tab", name="Image").click()
        expect(page.locator("#image-notice")).to_contain_text("Images are saved in")
        for name, value in (("Width", "256"), ("Height", "192"), ("Steps", "4")):
            field = page.get_by_label(f"number input for {name}")
            field.fill(value)
            field.press("Tab")
        page.get_by_label("Seed (-1 = random)").fill("1234")
        page.get_by_label("Prompt", exact=True).fill("a red lighthouse at dusk")
        page.get_by_role("button", name="Generate").click()

        result = page.locator(".block", has=page.get_by_text("Result", exact=True))
        expect(result.locator("img")).to_be_visible(timeout=60_000)
        summary = page.locator("#render-summary")
        expect(summary).to_contain_text("Seed 1234 · 256×192 · 4 steps", timeout=10_000)
        page.get_by_role("button", name=re.compile("Parameters and timings")).click()
        info = page.locator(".block", has=page.get_by_text("Parameters and timings", exact=True))
        for key, value in (("seed", 1234), ("width", 256), ("height", 192), ("steps", 4)):
            expect(info).to_contain_text(re.compile(rf'"{key}":\s*{value}\b'), timeout=10_000)
        pngs = sorted((app_dir / "outputs").rglob("*.png"))
        assert pngs, f"no PNG under {app_dir / 'outputs'}"
        assert any(p.name in summary.inner_text() for p in pngs), summary.inner_text()
        gallery = page.locator(".block", has=page.get_by_text("Recent images", exact=True))
        expect(gallery.locator("img").first).to_be_visible(timeout=10_000)
        expect(page.locator("#gpu-status")).to_contain_text("GPU free", timeout=15_000)
        idle(page)
        screenshot(page, tmp_path, "image", readme=True)

        # The GPU panel: the Status tab shows the ledger, the last hand-over and the eject control.
        page.get_by_role("tab", name="Status").click()
        panel = page.locator("#gpu-panel")
        expect(panel).to_contain_text("image", timeout=15_000)
        expect(page.get_by_role("button", name="Unload")).to_be_visible()
        idle(page)
        screenshot(page, tmp_path, "status", readme=True)
        page.get_by_role("tab", name="Image").click()

        # 4. Bad input: a readable error toast, no stack trace.
        page.get_by_label("Prompt", exact=True).fill("")
        page.get_by_role("button", name="Generate").click()
        # Checked before queueing (a validator): the message shows, and the last result stays on screen.
        message = page.get_by_text("Write a prompt first").first
        expect(message).to_be_visible(timeout=10_000)
        settle(message)
        expect(result.locator("img")).to_be_visible()
        no_traceback(page)
        screenshot(page, tmp_path, "image-error")
    finally:
        page.close()


def test_without_ollama_chat_falls_back_to_the_in_process_model(browser, tmp_path):
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    app = App(tmp_path, {"OLLAMA_HOST": closed, "CLAIR_CHAT_BACKEND": "auto"}, args=("--demo",))
    page = None
    try:
        page = open_page(browser, app.url)
        # In demo mode the notice names the demo's model; "Ollama is not reachable" would only alarm.
        expect(page.locator("#chat-notice")).to_contain_text("tiny in-process model")
        expect(page.locator("#chat-notice")).not_to_contain_text("Ollama is not reachable")
        reply = send_chat(page, "anyone home?")
        # Random weights: some text, whatever it is, once the "…" placeholder and any wait notice are gone.
        # (The first reply loads the in-process model: several seconds of "…".)
        expect(reply).not_to_have_text(re.compile(r"^\s*(…|⏳[\s\S]*)?\s*$"), timeout=60_000)
        idle(page)
        text = reply.inner_text().strip()
        assert text and text != "…" and not text.startswith(("⚠️", "⏳")), text
        expect(page.locator("#gpu-status")).to_contain_text("GPU free", timeout=10_000)  # released after the reply
        no_traceback(page)
        screenshot(page, tmp_path, "chat-in-process")
    finally:
        if page is not None:
            page.close()
        app.stop()


def test_cancel_stops_a_render_and_frees_the_gpu(browser, app):
    """A person clicks Cancel during a long render: it stops at the next step and the GPU is free again."""
    page = open_page(browser, app.url)
    try:
        page.get_by_role("tab", name="Image").click()
        for name, value in (("Width", "1024"), ("Height", "1024"), ("Steps", "150")):
            field = page.get_by_label(f"number input for {name}")
            field.fill(value)
            field.press("Tab")
        page.get_by_label("Prompt", exact=True).fill("a very slow render")
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("#gpu-status")).to_contain_text("rendering", timeout=30_000)
        expect(page.get_by_role("button", name="Cancel")).to_be_enabled()  # lit while the render runs
        page.get_by_role("button", name="Cancel").click()
        expect(page.locator("#gpu-status")).to_contain_text("GPU free", timeout=30_000)
        # Said in words, not a red "Error" badge; the button goes dark; the log records it.
        expect(page.locator("#render-summary")).to_contain_text("Cancelled", timeout=10_000)
        expect(page.get_by_text("Error", exact=True)).to_have_count(0)
        expect(page.get_by_role("button", name="Cancel")).to_be_disabled()
        log_text = app.log.read_text()
        assert "render cancel asked" in log_text and "render cancelled" in log_text
        st = app.status()
        assert st["holder"] is None and st["waiting"] == []
        # The next render goes through at once: nothing stayed locked.
        _, info = app.render(seed=99)
        # A GPU left locked would make it wait CLAIR_QUEUE_TIMEOUT_S (900 s); a loaded machine takes seconds.
        assert info["seed"] == 99 and info["wait_s"] < 60
        no_traceback(page)
    finally:
        page.close()


IMAGINED = ("a red lighthouse on a cliff at dusk, oil painting, warm light", "blurry, people, text")


def png_with_settings(chunks: dict[str, str]) -> bytes:
    """A small PNG holding the given text chunks, as Clair or AUTOMATIC1111 write them."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value, zip=key == "parameters")  # the A1111 line compressed: an iTXt/zTXt path too
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (40, 90, 200)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def drop_file(page, target: str, name: str, data: bytes) -> None:
    """A synthetic drag-and-drop of a file onto `target`, as the browser delivers a real one."""
    page.evaluate(
        """([sel, name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: "image/png"}));
            const el = document.querySelector(sel);
            el.dispatchEvent(new DragEvent("dragover", {dataTransfer: dt, bubbles: true, cancelable: true}));
            el.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        [target, name, base64.b64encode(data).decode()],
    )


def set_number(page, name: str, value: str) -> None:
    field = page.get_by_label(f"number input for {name}")
    field.fill(value)
    field.press("Tab")


def test_imagine_gallery_settings_png_drop_and_a_phone(app, app_dir, standin, browser, tmp_path):
    """Imagine fills an SDXL prompt from the chat model and renders it in the Image tab with one click; the
    gallery's "Use these settings" and a dropped PNG fill the fields; both tabs fit a 390 px phone."""
    from clair.service.studio import IMAGINE_SYSTEM

    def answer(body):
        system = next((m["content"] for m in body.get("messages", []) if m["role"] == "system"), "")
        if system == IMAGINE_SYSTEM:
            return f"Sure!\nPROMPT: {IMAGINED[0]}\nNEGATIVE: {IMAGINED[1]}"
        last = [m["content"] for m in body.get("messages", []) if m["role"] == "user"][-1]
        return f"You said: {last}"

    standin.reply_fn = answer
    page = open_page(browser, app.url)
    try:
        # Small renders: the fields keep their values across the tabs.
        page.get_by_role("tab", name="Image").click()
        for name, value in (("Width", "256"), ("Height", "192"), ("Steps", "3")):
            set_number(page, name, value)
        expect(page.locator("#aspect input")).to_have_value("Custom")
        page.get_by_role("tab", name="Chat").click()

        # 1. Imagine: the chat model's answer, parsed into two editable fields.
        expect(send_chat(page, "a lighthouse, please")).to_have_text("You said: a lighthouse, please", timeout=30_000)
        idle(page)
        expect(page.get_by_role("button", name="Stop")).to_be_disabled()  # lit only while something runs
        # The conversation is kept on the server (plain text), listed under "Past conversations".
        wait_until(lambda: any("a lighthouse, please" in p.read_text() for p in (app_dir / "chats-demo").rglob("*.json")))
        page.locator("#past input").click()
        expect(page.get_by_role("option", name=re.compile("a lighthouse, please"))).to_be_visible()
        page.keyboard.press("Escape")

        # Regenerate sends the last message again in place; Edit last takes it back into the box.
        asked = len([r for r in standin.requests_to("/api/chat") if r.messages])
        page.get_by_role("button", name="↻ Regenerate").click()
        wait_until(lambda: len([r for r in standin.requests_to("/api/chat") if r.messages]) == asked + 1)
        idle(page)
        expect(page.get_by_test_id("bot")).to_have_count(1)
        expect(page.get_by_test_id("bot").last).to_have_text("You said: a lighthouse, please")
        again = [r for r in standin.requests_to("/api/chat") if r.messages][-1]
        assert [m["content"] for m in again.messages if m["role"] == "user"] == ["a lighthouse, please"]
        page.get_by_role("button", name="✎ Edit last").click()
        expect(page.get_by_placeholder("Message… (Enter to send)")).to_have_value("a lighthouse, please")
        expect(page.get_by_test_id("bot")).to_have_count(0)
        page.get_by_role("button", name="Imagine", exact=True).click()
        prompt_box = page.get_by_label("Imagined prompt")
        expect(prompt_box).to_have_value(IMAGINED[0], timeout=30_000)
        expect(page.get_by_label("Imagined negative prompt")).to_have_value(IMAGINED[1])
        # Brought into view, not opened off-screen below the conversation.
        for field in (prompt_box, page.get_by_role("button", name="Render it in the Image tab")):
            expect(field).to_be_in_viewport()
        sent = [r for r in standin.requests_to("/api/chat") if r.messages][-1]
        assert sent.messages[0] == {"role": "system", "content": IMAGINE_SYSTEM}
        assert "a lighthouse, please" in sent.messages[-1]["content"]
        idle(page)
        screenshot(page, tmp_path, "imagine", readme=True)

        # The user edits the prompt, then one click renders it in the Image tab.
        edited = IMAGINED[0] + ", seagulls"
        prompt_box.fill(edited)
        page.get_by_role("button", name="Render it in the Image tab").click()
        expect(page.get_by_role("tab", name="Image")).to_have_attribute("aria-selected", "true")
        expect(page.get_by_label("Prompt", exact=True)).to_have_value(edited)
        result = page.locator(".block", has=page.get_by_text("Result", exact=True))
        expect(result.locator("img")).to_be_visible(timeout=60_000)
        expect(page.locator("#render-summary")).to_contain_text("256×192 · 3 steps", timeout=15_000)
        expect(page.get_by_role("button", name="Cancel")).to_be_disabled(timeout=10_000)
        newest = max((app_dir / "outputs").glob("*.png"), key=lambda p: p.stat().st_mtime)
        from clair.engines.image import read_metadata

        meta = read_metadata(newest)
        assert (meta["prompt"], meta["negative_prompt"]) == (edited, IMAGINED[1])
        idle(page)

        # 2. The gallery: select the newest image, see its settings, "Use these settings" fills the fields.
        page.get_by_label("Prompt", exact=True).fill("something else")
        page.get_by_label("Seed (-1 = random)").fill("5")
        gallery = page.locator("#gallery")
        gallery.locator("button.thumbnail-item, .thumbnail-item").first.click()
        picked = page.locator("#picked")
        expect(picked).to_contain_text(f"Seed {meta['seed']}", timeout=10_000)
        expect(picked).to_contain_text("seagulls")
        page.get_by_role("button", name="Use these settings").click()
        expect(page.get_by_label("Prompt", exact=True)).to_have_value(edited)
        expect(page.get_by_label("Negative prompt", exact=True)).to_have_value(IMAGINED[1])
        expect(page.get_by_label("Seed (-1 = random)")).to_have_value(str(meta["seed"]))
        expect(page.get_by_label("number input for Width")).to_have_value("256")
        settle(picked)
        screenshot(page, tmp_path, "gallery", readme=True)

        # "Reuse seed": the last render's seed, from the server's record.
        page.get_by_label("Seed (-1 = random)").fill("-1")
        page.get_by_role("button", name="♻ Reuse seed").click()
        expect(page.get_by_label("Seed (-1 = random)")).to_have_value(str(meta["seed"]))

        # An aspect preset sets width and height.
        page.locator("#aspect input").click()
        page.get_by_role("option", name="16:9 wide · 1344×768").click()
        expect(page.get_by_label("number input for Width")).to_have_value("1344")
        expect(page.get_by_label("number input for Height")).to_have_value("768")

        # 3. Drop a Clair PNG on the Image tab: read in the browser (no upload), the fields filled.
        uploads = []
        page.on("request", lambda r: uploads.append(r.url) if "upload" in r.url else None)
        clair = {"prompt": "dropped prompt", "negative_prompt": "no rain", "steps": 5, "guidance": 4.5,
                 "width": 320, "height": 448, "seed": 4242, "model": "tiny"}
        drop_file(page, "#image-tab", "clair.png", png_with_settings({"clair": json.dumps(clair)}))
        expect(page.get_by_label("Prompt", exact=True)).to_have_value("dropped prompt")
        expect(page.get_by_label("Negative prompt", exact=True)).to_have_value("no rain")
        expect(page.get_by_label("Seed (-1 = random)")).to_have_value("4242")
        for name, value in (("Width", "320"), ("Height", "448"), ("Steps", "5"), ("Guidance", "4.5")):
            expect(page.get_by_label(f"number input for {name}")).to_have_value(value)
        expect(page.locator("#drop-note")).to_contain_text("seed 4242")
        # An AUTOMATIC1111 PNG (its `parameters` line only, compressed) works too.
        a1111 = "a fox in snow\nNegative prompt: cartoon\nSteps: 7, Sampler: Euler, CFG scale: 6, Seed: 77, Size: 384x256"
        drop_file(page, "#image-tab", "a1111.png", png_with_settings({"parameters": a1111}))
        expect(page.get_by_label("Prompt", exact=True)).to_have_value("a fox in snow")
        expect(page.get_by_label("Seed (-1 = random)")).to_have_value("77")
        expect(page.get_by_label("number input for Width")).to_have_value("384")
        assert not uploads, uploads
        # The dropped settings render as they are.
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("#render-summary")).to_contain_text("Seed 77 · 384×256 · 7 steps", timeout=60_000)
        idle(page)
        no_traceback(page)

        # The scripting API's /imagine: idea -> [prompt, negative prompt].
        assert app.client.predict("a lighthouse", [], api_name="/imagine") == list(IMAGINED)
    finally:
        standin.reply_fn = None
        page.close()

    # 4. A phone: 390 px wide. Nothing scrolls sideways; both tabs' controls are on screen.
    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True)
    phone.set_default_timeout(15_000)
    try:
        phone.goto(app.url)
        expect(phone.locator("#gpu-status")).to_contain_text("GPU", timeout=20_000)
        for tab, controls in (("Chat", ("Send", "Imagine")), ("Image", ("Generate", "Cancel"))):
            phone.get_by_role("tab", name=tab).click()
            for name in controls:
                box = phone.get_by_role("button", name=name).bounding_box()
                assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 + 1, (name, box)
            wide = phone.evaluate("document.documentElement.scrollWidth")
            assert wide <= 391, f"the {tab} tab scrolls sideways on a phone ({wide} px)"
            screenshot(phone, tmp_path, f"phone-{tab.lower()}", readme=True)
    finally:
        phone.close()


def test_a_size_message_leaves_the_width_box_visible(browser, tmp_path):
    """A render too large for the VRAM budget is refused on the Width field; the message must not hide the
    box the person is about to correct (Gradio puts it at the block's top right, over the number box)."""
    app = App(tmp_path, {"CLAIR_CHAT_BACKEND": "local", "CLAIR_VRAM_BUDGET_GB": "8", "CLAIR_PRELOAD": "0"}, args=("--demo",))
    page = None
    try:
        page = open_page(browser, app.url)
        page.get_by_role("tab", name="Image").click()
        for name, value in (("Width", "2048"), ("Height", "2048")):
            set_number(page, name, value)
        page.get_by_label("Prompt", exact=True).fill("too large")
        # Read at once when it shows (Gradio clears such messages again after a moment): its size, and whether
        # the Width and Height boxes are still on top where they are. The check runs in the page on every DOM
        # change and every 10 ms from before the click, and keeps the first reading: polling from the test
        # (requestAnimationFrame) missed the message on a loaded CI machine.
        page.evaluate(
            """() => {
                const check = () => {
                    if (window.__seen) return;
                    const m = document.querySelector('#width .validation-error');
                    if (!m || !m.textContent.includes('render needs about')) return;
                    const r = m.getBoundingClientRect();
                    if (r.height < 10 || r.width < 100) return;
                    const covered = ['#width', '#height'].filter(id => {
                        const box = document.querySelector(id + ' input[type=number]');
                        box.scrollIntoView({block: 'center'});  // below the fold on a short screen: scroll as a person would
                        const b = box.getBoundingClientRect();
                        const top = document.elementFromPoint(b.x + b.width / 2, b.y + b.height / 2);
                        return !(top === box || box.contains(top));
                    });
                    window.__seen = {covered};
                };
                new MutationObserver(check).observe(document.body, {subtree: true, childList: true, characterData: true});
                setInterval(check, 10);
            }"""
        )
        page.get_by_role("button", name="Generate").click()
        seen = page.wait_for_function("() => window.__seen || null", timeout=15_000, polling=50).json_value()
        assert seen["covered"] == [], f"the message covers {seen['covered']}"
        page.screenshot(path=str(tmp_path / "image-size-refused.png"))  # not full_page: a resize clears the message
        no_traceback(page)
    finally:
        if page is not None:
            page.close()
        app.stop()


def zlib_bomb_png(keyword: str, inflated: int) -> bytes:
    """A small PNG with one zTXt chunk that inflates to `inflated` bytes of zeros (a decompression bomb)."""
    import struct
    import zlib

    z = zlib.compressobj(9)
    block = b"\0" * (1 << 20)
    stream = b"".join(z.compress(block) for _ in range(inflated >> 20)) + z.flush()
    data = keyword.encode("latin-1") + b"\0\0" + stream
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    png = png_with_settings({"parameters": "a kept prompt\nSteps: 5, Seed: 7, Size: 64x64"})
    return png[:-12] + chunk + png[-12:]  # before IEND


def test_png_reader_inflates_text_chunks_within_a_limit(browser):
    """assets/drop.js reads dropped PNGs in the browser: a 256 MiB zTXt bomb (a 256 KB file) is skipped,
    the other chunks are still read."""
    png = zlib_bomb_png("bomb", 256 << 20)
    assert len(png) < 1 << 20
    page = browser.new_page()
    try:
        page.set_content("<html><body></body></html>")
        page.add_script_tag(path=str(Path(__file__).resolve().parent.parent / "assets" / "drop.js"))
        found = page.evaluate(
            """async (b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const chunks = await window.__clairPngText(bytes.buffer);
                return Object.fromEntries(Object.entries(chunks).map(([k, v]) => [k, v.length]));
            }""",
            base64.b64encode(png).decode("ascii"),
        )
    finally:
        page.close()
    assert "bomb" not in found and found.get("parameters", 0) > 10, found


def test_clearing_the_chat_starts_a_new_conversation_and_keeps_the_saved_one(app, app_dir, browser):
    """Gradio's trash icon on the conversation: the next message starts a new saved conversation; the one
    before stays under Past conversations, whole (it was overwritten before)."""
    page = open_page(browser, app.url)
    chats = app_dir / "chats-demo"

    def saved() -> dict[str, list[str]]:
        out = {}
        for path in chats.rglob("*.json"):
            try:
                record = json.loads(path.read_text())
            except ValueError:  # being replaced this instant
                continue
            out[path.stem] = [m["content"] for m in record["messages"] if m["role"] == "user"]
        return out

    try:
        expect(send_chat(page, "the first conversation")).to_have_text(
            "You said: the first conversation", timeout=30_000
        )
        idle(page)
        wait_until(lambda: any(v == ["the first conversation"] for v in saved().values()))
        first = next(k for k, v in saved().items() if v == ["the first conversation"])

        page.locator("#chatbot").get_by_role("button", name="Clear").click()
        expect(page.get_by_test_id("bot")).to_have_count(0)
        expect(send_chat(page, "a fresh start")).to_have_text("You said: a fresh start", timeout=30_000)
        idle(page)
        wait_until(lambda: any(v == ["a fresh start"] for v in saved().values()))
        kept = saved()
        assert kept[first] == ["the first conversation"], kept  # not overwritten
        assert sum(v == ["a fresh start"] for v in kept.values()) == 1, kept
        page.locator("#past input").click()
        for title in ("the first conversation", "a fresh start"):
            expect(page.get_by_role("option", name=re.compile(title))).to_be_visible()
        page.keyboard.press("Escape")
        no_traceback(page)
    finally:
        page.close()


def test_a_laptop_screen_shows_generate_and_the_result_and_the_timeline_labels(app, browser, tmp_path):
    """1366x900, the demo's banner and notices included: the Image tab's Generate button and its result are
    above the fold; the Status tab's timeline labels are beside its bars, not under them."""
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    page.set_default_timeout(15_000)
    try:
        page.goto(app.url)
        expect(page.locator("#gpu-status")).to_contain_text("GPU", timeout=20_000)
        expect(page.locator("#demo-banner")).to_be_visible()
        page.get_by_role("tab", name="Image").click()
        expect(page.locator("#image-notice")).to_contain_text("Images are saved in")
        generate = page.get_by_role("button", name="Generate").bounding_box()
        result = page.locator("#result").bounding_box()
        assert generate and generate["y"] + generate["height"] <= 900, generate
        assert result and result["y"] + 200 <= 900, result  # the result's top part at least
        screenshot(page, tmp_path, "image-1366")
        # The size boxes take an out-of-range value alike, and say their range.
        for name in ("Width", "Height"):
            expect(page.locator(f"#{name.lower()}")).to_contain_text("64 to 2048, in steps of 8")
            set_number(page, name, "4096")
            expect(page.get_by_label(f"number input for {name}")).to_have_value("2048")

        page.get_by_role("tab", name="Status").click()
        labels = page.locator(".clair-timeline-labels").first
        expect(labels).to_contain_text("render")
        drawing = page.locator("svg.clair-timeline").first.bounding_box()
        for word in ("render", "chat"):
            box = labels.get_by_text(word, exact=True).bounding_box()
            assert box and box["x"] + box["width"] <= drawing["x"], (word, box, drawing)
            assert box["height"] >= 10  # drawn at its size, not squashed
    finally:
        page.close()


def test_a_demo_without_ollama_and_a_user_added_while_it_runs(browser, tmp_path):
    """The demo without Ollama offers no Ollama models to unload; a user added while Clair runs brings a login,
    and after it the page has its Log out button."""
    import subprocess
    import sys

    from tests.support import ROOT

    closed = f"127.0.0.1:{free_port()}"
    app = App(tmp_path, {"OLLAMA_HOST": closed, "CLAIR_CHAT_BACKEND": "auto", "CLAIR_PRELOAD": "0"}, args=("--demo",))
    page = None
    try:
        page = open_page(browser, app.url)
        page.get_by_role("tab", name="Status").click()
        page.locator("#eject-choice input").click()
        expect(page.get_by_role("option", name="The image model")).to_be_visible()
        expect(page.get_by_role("option", name="Ollama's models")).to_have_count(0)
        page.keyboard.press("Escape")
        expect(page.locator("#logout")).to_be_hidden()  # nobody to log out yet
        page.close()

        env = {k: v for k, v in os.environ.items() if not k.startswith("CLAIR_")}
        env["CLAIR_OUTPUT_DIR"] = str(tmp_path / "outputs")
        added = subprocess.run(
            [sys.executable, str(ROOT / "app.py"), "adduser", "ann", "--demo"], input="a long enough secret\n",
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )
        assert added.returncode == 0, added.stderr
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(15_000)
        page.goto(app.url)
        # Clair's login page, not Gradio's stock one: its name in the tab and on the page, and how to get an account.
        expect(page).to_have_title("Clair")
        expect(page.locator("#clair-login")).to_contain_text("Clair")
        expect(page.locator("#clair-login")).to_contain_text("No account yet? Ask whoever runs Clair")
        expect(page.locator("#clair-login")).to_contain_text("clair adduser YOUR-NAME")
        page.get_by_label("username").fill("ann")
        page.get_by_label("password").fill("a long enough secret")
        page.get_by_role("button", name="Login").click()
        expect(page.locator("#gpu-status")).to_contain_text("GPU", timeout=20_000)
        expect(page.get_by_role("button", name="Log out")).to_be_visible()
    finally:
        if page is not None:
            page.close()
        app.stop()
