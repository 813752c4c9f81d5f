"""What the UI's tabs share: who is asking, the front door's job for a request, turning errors into Clair's
messages (`_guard`), the page's theme and assets, and the small texts more than one tab shows.

The UI is split per tab (clair/adapters/ui_chat.py, clair/adapters/ui_image.py, clair/adapters/ui_status.py), each with its handlers
(a class holding the Studio), its layout and its wiring; clair/adapters/ui.py puts them on one page. Every tab
module imports this one, and none of them imports clair/adapters/ui.py, so the UI has no import cycle.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from clair.base.errors import ClairError
from clair.base.helpers import client_key
from clair.service import limits
from clair.service.front import Job
from clair.service.studio import Studio, Waiting

log = logging.getLogger("clair.adapters.ui")
# Chats and renders have concurrency ids of their own: with one shared id, renders that filled its slots made
# chats wait in Gradio's FIFO whatever CLAIR_CHAT_PRIORITY said. Gradio only lets requests in; their order on
# the GPU is the arbiter's (which runs renders one at a time anyway).
CHAT, RENDER = "chat", "render"


def close_off_loop(gen_fn):
    """Make a streaming handler's clean-up run on a thread of its own, never on Gradio's event loop.

    When a job is cancelled, its client goes away, or it ends, Gradio closes the handler's generator from
    the event loop (`utils.SyncToAsyncIterator.aclose()` calls `iterator.close()` there, from
    `Queue.reset_iterators`, with `app.lock` held; a dropped generator is finalised there too). The handler's
    `finally` blocks (release the lease, read Ollama's /api/ps, wait for generate() to stop) would then
    freeze every client. Here the outer generator, which Gradio closes, only hands the inner one to a thread.
    """

    @functools.wraps(gen_fn)
    def wrapper(*args, **kwargs):
        inner = gen_fn(*args, **kwargs)
        try:
            while True:
                try:
                    item = next(inner)
                except StopIteration:
                    return
                yield item
        finally:
            if inspect.getgeneratorstate(inner) != inspect.GEN_CLOSED:
                threading.Thread(target=_close, args=(inner,), name="clair-cleanup", daemon=True).start()

    return wrapper


def _close(gen) -> None:
    try:
        gen.close()
    except Exception:
        log.exception("closing a handler failed")

DEMO_BANNER = (
    "**Demo mode:** tiny models with random weights, so images are noise and replies gibberish (expected); "
    "everything else is real. For real models: `clair` with a GPU and [Ollama](https://ollama.com/download)."
)



def _assets() -> Path:
    """The checkout's assets/ beside the package; once installed (`pip install .`), <prefix>/share/clair/assets
    (pyproject.toml's data-files)."""
    import sys
    import sysconfig

    for folder in (
        Path(__file__).resolve().parents[2] / "assets",
        Path(sysconfig.get_path("data")) / "share" / "clair" / "assets",
        Path(sys.prefix) / "share" / "clair" / "assets",
    ):
        if (folder / "clair.css").is_file():
            return folder
    raise RuntimeError(
        "Clair's page assets (clair.css, drop.js, logo.svg, favicon.svg) are missing: run Clair from its checkout "
        "(`python app.py`) or install it with `pip install .`, which copies them to <prefix>/share/clair/assets."
    )


ASSETS = _assets()

# SDXL's trained resolutions (about one megapixel each), as Fooocus and AUTOMATIC1111 offer them.
ASPECTS: dict[str, tuple[int, int]] = {
    "1:1 square · 1024×1024": (1024, 1024),
    "9:7 · 1152×896": (1152, 896),
    "7:9 · 896×1152": (896, 1152),
    "3:2 landscape · 1216×832": (1216, 832),
    "2:3 portrait · 832×1216": (832, 1216),
    "16:9 wide · 1344×768": (1344, 768),
    "9:16 tall · 768×1344": (768, 1344),
    "21:9 cinema · 1536×640": (1536, 640),
    "9:21 · 640×1536": (640, 1536),
}
CUSTOM = "Custom"
# What the A1111 `parameters` chunk and Clair's `clair` chunk hold, read in the browser when a PNG is dropped on
# the Image tab (Clair takes no uploads: the file never leaves the browser).
DROP_JS = (ASSETS / "drop.js").read_text(encoding="utf-8") if (ASSETS / "drop.js").is_file() else ""
HEAD = f"<script>{DROP_JS}</script>" if DROP_JS else ""


def theme() -> gr.themes.Base:
    """Clair's colours: a deep blue primary (the logo's), warm amber for what needs attention."""
    blue = gr.themes.Color(
        c50="#eef3fc", c100="#d9e4f8", c200="#b5c9f0", c300="#86a6e5", c400="#5a82d6",
        c500="#2b59c3", c600="#2449a3", c700="#1e3c86", c800="#19316b", c900="#142756", c950="#0c1836",
    )
    return gr.themes.Soft(primary_hue=blue, secondary_hue="amber", neutral_hue="slate", radius_size="md").set(
        button_primary_background_fill="*primary_500",
        button_primary_background_fill_hover="*primary_600",
        button_primary_text_color="white",
    )


def logo_html() -> str:
    """The header: the logo (Clair's own file, inlined) and the name."""
    svg = (ASSETS / "logo.svg").read_text(encoding="utf-8") if (ASSETS / "logo.svg").is_file() else ""
    return (
        f'<div id="clair-header">{svg}<div><h1>Clair</h1>'
        "<p>Chat and images on one GPU, without running out of memory.</p></div></div>"
    )


def login_message() -> str:
    """The login page's words (Gradio's `auth_message`, HTML shown above the form; Gradio's stock page says only
    "Login"): whose page this is, and how to get an account. Styled inline: the page's CSS is not loaded yet."""
    svg = (ASSETS / "logo.svg").read_text(encoding="utf-8") if (ASSETS / "logo.svg").is_file() else ""
    return (
        '<span id="clair-login" style="display:block;max-width:28em">'
        f'<span style="display:flex;align-items:center;gap:0.75em;margin:0.25em 0 0.75em">{svg}'
        '<span><strong style="font-size:1.5em;line-height:1.1">Clair</strong><br>'
        "<span style=\"opacity:0.75\">Your household's chat and image studio, sharing one GPU.</span></span></span>"
        "No account yet? Ask whoever runs Clair to make you one: they run <code>clair adduser YOUR-NAME</code> "
        "on the machine Clair runs on.</span>"
    )


def _waiting_text(w: Waiting) -> str:
    if not w.position:
        return f"⏳ {w.reason}…"
    return f"⏳ {w.reason}. Your message will be sent in about {max(1, round(w.eta_s))} s (position {w.position})."


def _is_notice(message: dict) -> bool:
    """Clair's own notes in the conversation (errors, queue notices) are not sent to the model."""
    return message["role"] == "assistant" and message["content"].startswith(("⚠️", "⏳"))


def client_id(request: gr.Request | None) -> str:
    """Who is asking, for the per-user job cap: the logged-in user when Gradio's auth is on, else the
    client's address (behind a reverse proxy that is the proxy's: then all share one cap)."""
    if request is None:
        return "local"
    name = getattr(request, "username", None)
    if name:
        return f"user:{name}"
    client = getattr(request, "client", None)
    return f"address:{client_key(getattr(client, 'host', None) or 'unknown')}"  # as the API ports count it


def owner_of(request: gr.Request | None) -> str | None:
    """The user to record as an image's owner; None without user accounts (one household)."""
    name = getattr(request, "username", None) if request is not None else None
    return name if isinstance(name, str) and name else None


@contextlib.contextmanager
def _job(studio: Studio, request: gr.Request | None, kind: str) -> Iterator[Job]:
    """The front door's job for a Gradio request (clair/service/front.py): the caps, the Stop/Cancel flag of this
    page (`<kind>:<session>`), the owner. Past a cap: gr.Error with the retry time, and nothing else done."""
    cancel_key = f"{kind}:{request.session_hash}" if request is not None and request.session_hash else None
    job = studio.job(client_id(request), owner=owner_of(request), cancel_key=cancel_key)
    try:
        job.__enter__()
    except ClairError as exc:
        raise gr.Error(str(exc), print_exception=False) from None
    try:
        yield job
    finally:
        job.__exit__(None, None, None)


def _guard(fn):
    """Every error a plain handler raises reaches the client as Clair's own message (unexpected ones with
    an error id, details in the log). Not for generators: they convert their errors themselves."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            raise gr.Error(limits.unexpected(log, exc, fn.__name__), print_exception=False) from None

    return wrapper


def _bounds_checked_by_clair(*components: gr.components.Component) -> None:
    """Pass these inputs to the handler as sent. Gradio refuses a slider or number outside its bounds with
    its own message before any handler, which an API client sees only as a bare HTTP 400;
    `RenderParams.validated` checks the same bounds (the settings) and says which setting sets them."""
    for c in components:
        c.preprocess = lambda payload: payload  # type: ignore[method-assign]


# The GPU events' Gradio concurrency: every job a cap allows, plus a few slots so that requests past a cap
# reach a handler at once and are refused there, instead of waiting in Gradio's queue (where no cap sees them).
REFUSAL_SLOTS = 4


# Run once the box is drawn (it becomes visible in the same update), for at most ~1 s of frames.
SHOW_IMAGINED_JS = """() => {
    let frames = 0;
    const show = () => {
        const button = document.querySelector('#render-it');
        if (button && button.offsetParent !== null) button.scrollIntoView({block: 'end'});
        else if (frames++ < 60) requestAnimationFrame(show);
    };
    show();
}"""

# What a render unloaded to make room, in words (the arbiter's tenant names are code).
UNLOADED = {"ollama": "Ollama's chat model", "image": "the image model", "local-chat": "the in-process chat model"}


def summary_text(info: dict) -> str:
    """The line under a finished render: seed, size, the wait and the swaps, pauses, an out-of-memory fallback."""
    gone = ", ".join(UNLOADED.get(t, t) for t in info.get("evicted") or ())
    swap = f" · unloaded {gone} first ({info['evict_s']:.1f} s)" if gone else ""
    if info.get("preemptions"):
        n = info["preemptions"]
        swap += f" · paused {n} time{'s' if n > 1 else ''} for chats ({info['paused_s']:.1f} s)"
    healed = {"vae-tiling": "VAE tiling", "cpu-offload": "model CPU offload"}.get(info.get("fallback") or "")
    note = f"\n\n⚠️ The GPU ran out of memory; rendered again with **{healed}**." if healed else ""
    return (
        f"Seed **{info['seed']}** · {info['width']}×{info['height']} · {info['steps']} steps · "
        f"waited {info['wait_s']:.1f} s{swap} · rendered in {info['render_s']:.1f} s · "
        f"saved as `{Path(info['path']).name}`{note}"
    )


def _aspect_of(w: int, h: int) -> str:
    return next((name for name, size in ASPECTS.items() if size == (w, h)), CUSTOM)
