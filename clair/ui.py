"""The Gradio app: Chat and Image tabs, a status line, and the scripting API (/chat, /render, /status).

The only module that imports gradio. Handlers call `Studio`; ClairError becomes a message in the tab
(or `gr.Error` for API callers) here at the edge, and nothing else reaches the browser (an unexpected
error becomes a message with an error id; the details go to the log). Chats and renders have a
Gradio `concurrency_id` each; the arbiter decides their order on the GPU.

No handler returns a structure that came from the client, nor a path derived from one: Gradio serves
every file a returned value names (docs/design.md, "Nothing a client sends is handed back"). Limits and
the per-user and house caps on GPU jobs are checked here, before Studio takes a lease (clair/limits.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import gradio as gr

from clair import limits, panel
from clair.conversations import ConversationStore, valid_id
from clair.errors import Cancelled, ClairError
from clair.image import RenderParams, read_metadata
from clair.service import Job
from clair.studio import Studio, Token, Waiting, parse_imagined
from clair.web import LOGOUT_JS, has_users, lan_note, lan_qr

log = logging.getLogger("clair.ui")
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
        Path(__file__).resolve().parent.parent / "assets",
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
    return f"address:{getattr(client, 'host', None) or 'unknown'}"


def owner_of(request: gr.Request | None) -> str | None:
    """The user to record as an image's owner; None without user accounts (one household)."""
    name = getattr(request, "username", None) if request is not None else None
    return name if isinstance(name, str) and name else None


@contextlib.contextmanager
def _job(studio: Studio, request: gr.Request | None, kind: str) -> Iterator[Job]:
    """The front door's job for a Gradio request (clair/service.py): the caps, the Stop/Cancel flag of this
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


def build(studio: Studio) -> gr.Blocks:
    cfg = studio.cfg
    jobs = studio.jobs  # shared with the API (clair/gateway.py, clair/openai_api.py): the same caps
    last_render: OrderedDict[tuple[str, str], dict] = OrderedDict()  # (client, session) -> info, for the summary
    last_render_lock = threading.Lock()
    conversations = ConversationStore(cfg)

    def served(path: str | Path) -> str:
        """A path Clair built itself, inside the output folder: the only files a handler hands back."""
        p = Path(path).resolve()
        if p.parent != studio.image.output_dir or p.suffix != ".png" or not p.is_file():
            raise RuntimeError(f"refusing to hand back a path outside the output folder: {p}")
        return str(p)

    # ---------------------------------------------------------------- handlers
    # Rule (docs/design.md, "Nothing a client sends is handed back"): no handler returns a structure that
    # came from the client. Gradio postprocesses what a handler returns and serves every file it names.
    async def chat_ui(message: str, history: list, model: str, system: str, request: gr.Request):
        """UI chat: shows the queue while held, then streams; errors appear in the conversation.

        The conversation shown is rebuilt from plain text on the server; a history holding anything else
        is refused (gr.Error) and nothing is returned.
        """
        if isinstance(message, str) and not message.strip():
            yield gr.skip(), gr.skip(), gr.skip()
            return
        try:
            message, past, system, model = limits.check_chat(cfg, message, history, system, model)
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        with _job(studio, request, "chat") as job:  # the front door: the caps, Stop, the lease
            shown = [*past, {"role": "user", "content": message}, {"role": "assistant", "content": "…"}]
            yield shown, "", gr.Button(interactive=True)  # Stop is lit while the reply runs
            reply = ""
            try:
                context = [m for m in past if not _is_notice(m)]
                async with contextlib.aclosing(job.chat(message, context, model=model, system=system)) as events:  # closed here, not left to the GC
                    async for event in events:
                        if isinstance(event, Waiting):
                            shown[-1] = {"role": "assistant", "content": _waiting_text(event)}
                        else:
                            reply += event.text
                            shown[-1] = {"role": "assistant", "content": reply}
                        yield shown, "", gr.skip()
            except ClairError as exc:
                shown[-1] = {"role": "assistant", "content": (reply + "\n\n" if reply else "") + f"⚠️ {exc}"}
                yield shown, "", gr.skip()
            except Exception as exc:
                shown[-1] = {"role": "assistant", "content": f"⚠️ {limits.unexpected(log, exc, 'chat')}"}
                yield shown, "", gr.skip()
            yield shown, "", gr.Button(interactive=False)  # the whole conversation last: the final answer holds it

    async def chat_api(message: str, history: list[dict], request: gr.Request) -> AsyncIterator[str]:
        """Stream the growing reply to `message`, given `history` as [{role, content}] with string content."""
        reply = ""
        try:
            message, past, _, _ = limits.check_chat(cfg, message, history)
            with _job(studio, request, "api-chat") as job:
                async with contextlib.aclosing(job.chat(message, past)) as events:  # closed here, not left to the GC
                    async for event in events:
                        if isinstance(event, Token):
                            reply += event.text
                            yield reply
        except gr.Error:
            raise
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            raise gr.Error(limits.unexpected(log, exc, "chat"), print_exception=False) from None
        if not reply:
            yield ""

    @_guard
    def fresh_chat(request: gr.Request):
        """An empty conversation (a past one may have grown past the history limits); stops a reply."""
        studio.cancel(f"chat:{request.session_hash}")
        return [], "", gr.Button(interactive=False)

    def validate_chat(message, history, model, system, request: gr.Request):
        """The UI chat's limits and caps, checked when it is queued: a refused message never enters Gradio's
        queue. The handler checks all of it again (and is the only check for /chat)."""
        problem, at = None, 0
        try:
            if isinstance(message, str) and not message.strip():
                return [gr.validate(True, "")] * 4  # nothing to send: the handler does nothing
            limits.check_chat(cfg, message, history, system, model)
            which = jobs.would_refuse(client_id(request))
            if which is not None:
                problem = jobs.busy_message(which)
        except ClairError as exc:
            problem = str(exc)
            low = problem.lower()
            at = 3 if "system prompt" in low else 1 if ("conversation" in low or "history" in low) else 0
        except Exception as exc:
            problem = limits.unexpected(log, exc, "chat check")
        return [gr.validate(problem is None or i != at, problem or "") for i in range(4)]

    @_guard
    def stop_chat(request: gr.Request):
        studio.cancel(f"chat:{request.session_hash}")

    def render(
        prompt: str,
        negative_prompt: str = "",
        steps: int = 30,
        guidance: float = 7.0,
        width: int = 1024,
        height: int = 1024,
        seed: int = -1,
        request: gr.Request = None,  # type: ignore[assignment]
        progress=gr.Progress(),  # noqa: B008 - Gradio's documented way to receive a progress tracker
    ):
        session = request.session_hash if request is not None else None
        who = client_id(request)
        try:
            # Every limit before the cap, the cap before any load or lease.
            params = RenderParams(prompt, negative_prompt, steps, guidance, width, height, seed).validated(cfg)
            studio.check_fits(params)
            with _job(studio, request, "render") as job:  # the front door: the caps, Cancel, the lease

                def on_progress(text: str, frac: float) -> None:
                    progress(frac, desc=text)
                    if request is not None and client_gone(request.session_hash):
                        log.info("render cancelled: the client went away client=%s", who)
                        job.stop.set()  # a closed tab or a dropped script frees the GPU at the next step

                # Sync for now (a render waiting here holds a Gradio worker thread): with the handler async,
                # Gradio's progress tracker and validator misbehave in the browser (test_browser, cancel).
                path, info = studio.render(params, on_progress=on_progress, cancel=job.stop, owner=owner_of(request))
            path = served(path)
            info = json.loads(json.dumps(info))  # plain JSON, built here
        except Cancelled:
            # Not an error: the person asked for it. The result and its info stay as they were.
            log.info("render cancelled client=%s", who)
            with last_render_lock:
                last_render[(who, session)] = {"cancelled": True}
            gr.Info("Cancelled.")
            return gr.skip(), gr.skip()
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            raise gr.Error(limits.unexpected(log, exc, "render"), print_exception=False) from None
        with last_render_lock:
            last_render[(who, session)] = info
            while len(last_render) > 256:
                last_render.popitem(last=False)
        return path, info

    def client_gone(session_hash: str | None) -> bool:
        """Has Gradio seen this page's event stream close? (It marks the session's running jobs not alive:
        gradio/queueing.py `Queue.clean_events`, called by the SSE route on disconnect.) A plain function
        cannot be interrupted by Gradio, so the render checks this at every step."""
        queue = getattr(demo, "_queue", None)
        if queue is None or not session_hash:
            return False
        for job_set in list(getattr(queue, "active_jobs", None) or []):
            for job in list(job_set or []):
                if getattr(job, "session_hash", None) == session_hash and not getattr(job, "alive", True):
                    return True
        return False

    @_guard
    def render_summary(request: gr.Request) -> str:
        """The last render's summary for this client and page, from the server's own record."""
        with last_render_lock:
            info = last_render.get((client_id(request), request.session_hash))
        if info and info.get("cancelled"):
            return "**Cancelled.** Nothing was saved; the GPU is free for the next render."
        return summary_text(info) if info else ""

    @_guard
    def last_seed(request: gr.Request):
        """"Reuse seed": the seed of this page's last render, from the server's own record."""
        with last_render_lock:
            info = last_render.get((client_id(request), request.session_hash))
        if not info or "seed" not in info:
            gr.Info("Render an image first: its seed is then reused.")
            return gr.skip()
        return int(info["seed"])

    _FIELDS = [(1, "negative prompt"), (0, "prompt"), (2, "steps"), (3, "guidance"), (4, "width"), (5, "height")]

    def validate_render(prompt, negative_prompt, steps, guidance, width, height, seed, request: gr.Request):
        """Checked when the render is queued (HTTP 422 at /queue/join for API clients), so a mistake does
        not wipe the last result. The handler checks all of it again; this only answers sooner."""
        problem, at = None, 6
        try:
            params = RenderParams(prompt, negative_prompt, steps, guidance, width, height, seed).validated(cfg)
            studio.check_fits(params)
            which = jobs.would_refuse(client_id(request))
            if which is not None:
                problem, at = jobs.busy_message(which), 0
        except ClairError as exc:
            problem = str(exc)
            at = next((i for i, name in _FIELDS if name in problem.lower()), 6)
            if "render needs about" in problem:
                at = 4  # the size (assets/clair.css keeps a message on a slider off its number box)
        except Exception as exc:
            problem, at = limits.unexpected(log, exc, "render check"), 0
        return [gr.validate(problem is None or i != at, problem or "") for i in range(7)]

    @_guard
    def render_running(request: gr.Request):
        """Cancel is lit only while this page has a render waiting or running."""
        return gr.Button(interactive=studio.running(f"render:{request.session_hash}"))

    @_guard
    def cancel_render(request: gr.Request):
        if studio.cancel(f"render:{request.session_hash}"):
            log.info("render cancel asked client=%s", client_id(request))
            gr.Info("Cancelling: the render stops at its next step.")
        else:
            gr.Info("Nothing is rendering.")
        return gr.Button(interactive=False)

    @_guard
    def status(request: gr.Request = None) -> dict:  # type: ignore[assignment]
        """The arbiter's state: holder, waiting, residents and the VRAM ledger, last hand-over timings
        (other users' jobs without their name or address, clair.panel.private_status)."""
        st = panel.private_status(studio.status(), owner_of(request))
        st["jobs"] = {"total": jobs.total, "max_queue": jobs.max_total, "max_per_user": jobs.max_per_user}
        return st

    # ---- GPU panel (issue 9; clair/panel.py): the line atop both tabs, the Status tab, eject ----
    @_guard
    def status_line(request: gr.Request = None) -> str:  # type: ignore[assignment]
        return panel.compact_html(panel.panel_data(studio, viewer=owner_of(request)))  # others' jobs: no names

    @_guard
    def panel_full(request: gr.Request = None) -> str:  # type: ignore[assignment]
        return panel.panel_html(panel.panel_data(studio, viewer=owner_of(request)))

    @_guard
    def eject(tenant: str | None) -> str:
        """Unload an idle model by hand (any logged-in user may: one household). Busy ones stay."""
        if not isinstance(tenant, str) or not tenant:
            return "Choose a model to unload."
        return studio.eject(tenant)
    # ---- end GPU panel ----

    def account_row_now():
        """Log out shows whenever there are users now (added while Clair runs too: their login came with them)."""
        users_now = has_users(cfg)
        return gr.Row(visible=bool(lan_note(cfg) or users_now)), gr.Button(visible=users_now)

    @_guard
    def eject_choices():
        """What may be unloaded (Studio.ejectable: the demo without Ollama offers none of Ollama's models)."""
        names = studio.ejectable()
        return gr.Dropdown(choices=[(name, t) for t, name in names.items()], value=None)

    @_guard
    def chat_notice() -> str:
        backend, problem = studio.chat_backend()
        if problem:
            return f"⚠️ {problem}"
        return backend.notice()

    @_guard
    def image_notice() -> str:
        problem = studio.image.problem()
        if problem:
            return f"⚠️ {problem}"
        text = (
            f"Image model: {studio.image.label}. {studio.image.vae_line()} Images are saved in "
            f"{studio.image.output_dir}. Drop a Clair PNG here to read its settings back."
        )
        if not studio.status()["cuda"]:
            gib = 1024**3
            idle = studio.image.footprint(1024, 1024)[1] / gib
            at = ", ".join(f"{w}² {studio.image.footprint(w, w)[0] / gib:.1f} GB" for w in (512, 1024, 2048))
            text += (
                f" No GPU here, so memory figures are what SDXL is known to need, not measured: {idle:.1f} GB "
                f"loaded; while rendering {at}."
            )
        return text

    @_guard
    def model_choices():
        models = studio.chat_models()
        current = studio.default_chat_model()
        if current not in models:
            models = [current, *models]
        return gr.Dropdown(choices=models, value=current)

    @_guard
    def gallery(request: gr.Request):
        """The newest images from the server's own listing: the user's own, unless shared or no accounts.
        The list also goes into the page's server-side state: a selection is an index into it, never a path."""
        owner = None if cfg.shared_gallery else owner_of(request)
        paths = [served(p) for p in studio.image.recent(cfg.gallery_size, owner=owner)]
        return paths, paths

    def _settings_of(listed: list, index) -> dict | None:
        """The parameters in the `clair` chunk of the image at `index` of the server's own list."""
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(listed, list):
            return None
        if not 0 <= index < len(listed):
            return None
        try:
            meta = read_metadata(served(listed[index]))
            params = RenderParams(
                str(meta.get("prompt", "")),
                str(meta.get("negative_prompt", "")),
                int(meta.get("steps", 30)),
                float(meta.get("guidance", 7.0)),
                int(meta.get("width", 1024)),
                int(meta.get("height", 1024)),
                int(meta.get("seed", -1)),
            )
        except Exception as exc:
            log.info("no settings in a listed image index=%s error=%s", index, exc)
            return None
        out = {k: getattr(params, k) for k in ("prompt", "negative_prompt", "steps", "guidance", "width", "height", "seed")}
        out["model"] = str(meta.get("model", ""))[:200]
        return out

    @_guard
    def gallery_select(listed: list, evt: gr.SelectData):
        """Show the selected image's parameters (read by the server from its own file)."""
        settings = _settings_of(listed, evt.index if evt is not None else None)
        if settings is None:
            return "This image holds no Clair settings.", None, gr.Row(visible=False)
        neg = f"  \n**Negative:** {settings['negative_prompt']}" if settings["negative_prompt"] else ""
        text = (
            f"**Prompt:** {settings['prompt']}{neg}  \n"
            f"Seed **{settings['seed']}** · {settings['width']}×{settings['height']} · {settings['steps']} steps · "
            f"guidance {settings['guidance']:g}" + (f" · {settings['model']}" if settings["model"] else "")
        )
        return text, settings, gr.Row(visible=True)

    @_guard
    def use_settings(settings):
        """Fill the fields from the selected image's settings (kept server-side in the page's state)."""
        if not isinstance(settings, dict):
            return [gr.skip()] * 8
        return (
            settings["prompt"], settings["negative_prompt"], settings["steps"], settings["guidance"],
            settings["width"], settings["height"], settings["seed"], _aspect_of(settings["width"], settings["height"]),
        )

    @_guard
    def use_seed(settings):
        return settings["seed"] if isinstance(settings, dict) else gr.skip()

    def _aspect_of(w: int, h: int) -> str:
        return next((name for name, size in ASPECTS.items() if size == (w, h)), CUSTOM)

    @_guard
    def pick_aspect(choice):
        """An aspect preset sets width and height (a name from Clair's own table; anything else changes nothing)."""
        size = ASPECTS.get(choice) if isinstance(choice, str) else None
        if size is None:
            return gr.skip(), gr.skip()
        return min(size[0], cfg.max_side), min(size[1], cfg.max_side)

    @_guard
    def size_moved(w, h):
        """Free width and height: the preset follows them (a preset size, else Custom)."""
        try:
            return _aspect_of(int(w), int(h))
        except (TypeError, ValueError):
            return CUSTOM

    # ---------------------------------------------------------------- conversations
    def _past_choices(request: gr.Request) -> list[tuple[str, str]]:
        when = lambda t: time.strftime("%d %b %H:%M", time.localtime(t))  # noqa: E731
        return [(f"{s.title} · {when(s.updated)}", s.id) for s in conversations.list(owner_of(request))]

    @_guard
    def past_list(request: gr.Request):
        return gr.Dropdown(choices=_past_choices(request), value=None)

    @_guard
    def save_conversation(history, conv_id, request: gr.Request):
        """Keep this conversation (plain text only, Clair's notices left out) under the page's id."""
        try:
            new_id = conversations.save(owner_of(request), valid_id(conv_id), history)
        except ClairError:
            return gr.skip(), gr.skip()
        return new_id, gr.Dropdown(choices=_past_choices(request), value=new_id)

    @_guard
    def open_conversation(conv_id, request: gr.Request):
        """A past conversation of this user's, rebuilt from its file as plain text."""
        if not conv_id:
            return gr.skip(), gr.skip()
        messages = conversations.load(owner_of(request), conv_id)
        if messages is None:
            raise gr.Error("That conversation is gone (or is not yours): pick another one.", print_exception=False)
        studio.cancel(f"chat:{request.session_hash}")
        return messages, valid_id(conv_id)

    @_guard
    def delete_conversation(conv_id, request: gr.Request):
        if valid_id(conv_id) and conversations.delete(owner_of(request), conv_id):
            gr.Info("Conversation deleted.")
        return [], None, gr.Dropdown(choices=_past_choices(request), value=None)

    @_guard
    def take_back_last(history):
        """Regenerate / edit: the conversation without its last exchange, and that last message in the box."""
        past = [m for m in limits.plain_history(history, cfg) if m["role"] != "system"]
        while past and past[-1]["role"] == "assistant":
            past.pop()
        if not past:
            raise gr.Error("There is no message to send again yet.", print_exception=False)
        last = past.pop()
        return past, last["content"]

    # ---------------------------------------------------------------- imagine
    def _idea(message, history) -> str:
        """The idea to imagine: the message box if something is typed, else the conversation's last user turn."""
        if isinstance(message, str) and message.strip():
            return message
        past = limits.plain_history(history, cfg)
        return next((m["content"] for m in reversed(past) if m["role"] == "user"), "")

    async def imagine_ui(message, history, model, request: gr.Request):
        """Imagine, in the Chat tab: the chat model writes an SDXL prompt and a negative prompt from the idea.
        Streams its progress; ends with both fields filled (with whatever came back) for the user to edit."""
        try:
            message = limits.check_message(message, cfg)
            past = limits.plain_history(history, cfg)
            idea = _idea(message, past)
            model = limits.check_model_name(model)
            if not idea.strip():
                raise ClairError("Describe the image first: type the idea, or chat about it and then press Imagine.")
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        reply = ""
        with _job(studio, request, "chat") as job:  # the front door: the caps, Stop, the lease
            try:
                yield "⏳ Imagining…", gr.skip(), gr.skip(), gr.Group(visible=True), gr.Button(interactive=True)
                context = [m for m in past if not _is_notice(m)]
                if context and context[-1]["role"] == "user" and context[-1]["content"] == idea:
                    context = context[:-1]
                async with contextlib.aclosing(job.imagine(idea, context, model=model)) as events:  # closed here, not left to the GC
                    async for event in events:
                        if isinstance(event, Waiting):
                            yield _waiting_text(event), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                        else:
                            reply += event.text
                            yield f"✍️ {reply[-300:]}", gr.skip(), gr.skip(), gr.skip(), gr.skip()
                prompt_text, negative_text = parse_imagined(reply, idea, cfg.max_prompt_chars)
                yield (
                    "Edit the prompt if you like, then **Render it** (the Image tab opens).",
                    prompt_text, negative_text, gr.skip(), gr.Button(interactive=False),
                )
            except ClairError as exc:
                yield f"⚠️ {exc}", gr.skip(), gr.skip(), gr.skip(), gr.Button(interactive=False)
            except Exception as exc:
                yield f"⚠️ {limits.unexpected(log, exc, 'imagine')}", gr.skip(), gr.skip(), gr.skip(), gr.Button(interactive=False)

    async def imagine_api(idea: str, history: list[dict] | None = None, request: gr.Request = None) -> tuple[str, str]:  # type: ignore[assignment]
        """Turn an idea (and an optional chat history) into an SDXL prompt and negative prompt, with the chat model."""
        try:
            past = limits.plain_history(history, cfg)
            limits.check_message(idea, cfg, "idea")
            with _job(studio, request, "api-chat") as job:
                return await job.imagine_prompt(idea, past)
        except gr.Error:
            raise
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            raise gr.Error(limits.unexpected(log, exc, "imagine"), print_exception=False) from None

    @_guard
    def to_image_tab(prompt_text, negative_text):
        """Render it: the imagined prompt goes into the Image tab's fields (checked plain text), which opens."""
        p = limits.check_prompt(prompt_text, cfg)
        n = limits.check_prompt(negative_text or "", cfg, "negative prompt")
        return p, n, gr.Tabs(selected="image")

    # ---------------------------------------------------------------- layout
    gpu_slots = cfg.max_queue + REFUSAL_SLOTS
    with gr.Blocks(title="Clair") as demo:
        # The scripting API first, so these names are theirs (later events get suffixed names).
        gr.api(chat_api, api_name="chat", concurrency_id=CHAT, concurrency_limit=gpu_slots)
        gr.api(imagine_api, api_name="imagine", concurrency_id=CHAT, concurrency_limit=gpu_slots)
        gr.api(status, api_name="status", queue=False)
        gr.HTML(logo_html(), elem_id="clair-header-block")
        lan, users_exist = lan_note(cfg), has_users(cfg)
        # Built even without users: one added while Clair runs brings a login, and then this page needs its Log
        # out button (shown per page load, `account_row` below).
        with gr.Row(visible=bool(lan or users_exist), elem_id="account-row") as account_row:
            gr.Markdown(lan, elem_id="lan-link")
            if lan:
                gr.HTML(lan_qr(cfg), elem_id="lan-qr", scale=0, min_width=130)
            # Browser-only: POST /logout ends this session (clair/web.py); no server handler here.
            logout = gr.Button("Log out", size="sm", scale=0, min_width=96, visible=users_exist, elem_id="logout")
            logout.click(None, js=LOGOUT_JS)
        if cfg.demo:
            gr.Markdown(DEMO_BANNER, elem_id="demo-banner")
        status_md = gr.HTML(elem_id="gpu-status")  # GPU panel: the compact line atop both tabs

        with gr.Tabs(selected="chat") as tabs:
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                chat_notice_md = gr.Markdown(elem_id="chat-notice")
                conv_id = gr.State(None)  # server-side: this page's conversation id
                with gr.Row(elem_id="chat-top"):
                    model = gr.Dropdown(label="Model", choices=[], allow_custom_value=True, scale=3, min_width=160)
                    refresh = gr.Button("↻ Models", size="sm", scale=0, min_width=96, elem_id="refresh-models")
                    past = gr.Dropdown(
                        label="Past conversations", choices=[], value=None, scale=3, min_width=160, elem_id="past"
                    )
                    delete = gr.Button("Delete chat", size="sm", scale=0, min_width=90, elem_id="delete-chat")
                with gr.Accordion("System prompt", open=False):
                    system = gr.Textbox(value=cfg.system_prompt, lines=2, show_label=False, max_length=cfg.max_message_chars)
                chatbot = gr.Chatbot(label="Conversation", height=440, buttons=["copy"], elem_id="chatbot")
                with gr.Row(elem_id="chat-input"):
                    message = gr.Textbox(
                        placeholder="Message… (Enter to send)", show_label=False, scale=6, min_width=200,
                        max_length=cfg.max_message_chars,
                    )
                    send = gr.Button("Send", variant="primary", scale=1, min_width=70)
                    stop = gr.Button("Stop", variant="stop", scale=1, min_width=70, interactive=False)
                with gr.Row(elem_id="chat-actions"):
                    new_chat = gr.Button("New chat", size="sm", min_width=90)
                    regenerate = gr.Button("↻ Regenerate", size="sm", min_width=110)
                    edit_last = gr.Button("✎ Edit last", size="sm", min_width=100)
                    imagine = gr.Button("Imagine", size="sm", variant="secondary", min_width=100, elem_id="imagine")
                imagine_note = gr.Markdown(
                    "**Imagine** turns the idea (the message box, or the conversation's last message) into an image "
                    "prompt with the chat model.",
                    elem_id="imagine-note",
                )
                with gr.Group(visible=False, elem_id="imagine-box") as imagine_box:
                    im_prompt = gr.Textbox(label="Imagined prompt", lines=2, max_length=cfg.max_prompt_chars)
                    im_negative = gr.Textbox(label="Imagined negative prompt", lines=1, max_length=cfg.max_prompt_chars)
                    render_it = gr.Button("Render it in the Image tab", variant="primary", elem_id="render-it")

            with gr.Tab("Image", id="image", elem_id="image-tab"):
                image_notice_md = gr.Markdown(elem_id="image-notice")
                with gr.Row(elem_id="image-row"):
                    with gr.Column(scale=2, min_width=300):
                        prompt = gr.Textbox(label="Prompt", lines=3, max_length=cfg.max_prompt_chars, elem_id="prompt")
                        negative = gr.Textbox(
                            label="Negative prompt", lines=2, max_length=cfg.max_prompt_chars, elem_id="negative"
                        )
                        # Under the prompts, not under every setting: on a laptop screen (1366x900) the button
                        # stays above the fold next to the result.
                        with gr.Row():
                            generate = gr.Button("Generate", variant="primary", elem_id="generate")
                            cancel = gr.Button("Cancel", interactive=False)
                        with gr.Row():
                            steps = gr.Slider(
                                1, cfg.max_steps, value=min(8 if cfg.demo else 30, cfg.max_steps), step=1,
                                label="Steps", elem_id="steps", min_width=140,
                            )
                            guidance = gr.Slider(
                                cfg.min_guidance,
                                cfg.max_guidance,
                                value=min(max(7.0, cfg.min_guidance), cfg.max_guidance),
                                step=0.5,
                                label="Guidance",
                                elem_id="guidance",
                                min_width=140,
                            )
                        size0 = min(1024, cfg.max_side)
                        aspect = gr.Dropdown(
                            label="Aspect (SDXL sizes)", choices=[*ASPECTS, CUSTOM],
                            value=_aspect_of(size0, size0), elem_id="aspect",
                        )
                        with gr.Row():
                            # Both boxes bring a typed value into range the same way (on leaving the box); the
                            # range is written under them, so a 4096 that becomes 2048 is no surprise.
                            side_info = f"64 to {cfg.max_side}, in steps of 8"
                            width = gr.Slider(
                                64, cfg.max_side, value=size0, step=8, label="Width", elem_id="width", min_width=140,
                                info=side_info,
                            )
                            height = gr.Slider(
                                64, cfg.max_side, value=size0, step=8, label="Height", elem_id="height", min_width=140,
                                info=side_info,
                            )
                        with gr.Row(equal_height=True):
                            seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", minimum=-1, elem_id="seed", scale=3)
                            reuse = gr.Button("♻ Reuse seed", size="sm", scale=1, min_width=110, elem_id="reuse-seed")
                            fresh_seed = gr.Button("Random seed", size="sm", scale=1, min_width=90)
                    with gr.Column(scale=3, min_width=300):
                        result = gr.Image(
                            label="Result", format="png", type="filepath", interactive=False, height=480, elem_id="result"
                        )
                        summary = gr.Markdown(elem_id="render-summary")
                        with gr.Accordion("Parameters and timings", open=False):
                            info = gr.JSON(label="Render info", show_label=False)
                listed = gr.State([])  # server-side: the paths the gallery shows, in order
                chosen = gr.State(None)  # server-side: the selected image's settings
                recent = gr.Gallery(
                    label="Recent images", columns=6, height=260, fit_columns=False, object_fit="contain", elem_id="gallery"
                )
                picked = gr.Markdown("Select an image to see its settings.", elem_id="picked")
                with gr.Row(visible=False) as picked_actions:
                    use = gr.Button("Use these settings", size="sm", elem_id="use-settings")
                    use_its_seed = gr.Button("Use its seed", size="sm")

            # ---- GPU panel: the Status tab ----
            with gr.Tab("Status", id="status"):
                panel_view = gr.HTML(elem_id="gpu-panel")
                with gr.Row():
                    eject_choice = gr.Dropdown(
                        label="Unload a model from the GPU",
                        elem_id="eject-choice",
                        choices=[(name, t) for t, name in studio.ejectable().items()],
                        value=None,
                        scale=3,
                    )
                    eject_btn = gr.Button("Unload", scale=1)
                eject_msg = gr.Markdown(elem_id="eject-message")
            # ---- end GPU panel ----

        # ------------------------------------------------------------ wiring
        # ---- GPU panel wiring ----
        timer = gr.Timer(1.5)
        timer.tick(status_line, outputs=status_md, api_visibility="private", queue=False)
        timer.tick(panel_full, outputs=panel_view, api_visibility="private", queue=False)
        eject_btn.click(eject, inputs=eject_choice, outputs=eject_msg, api_visibility="private", queue=False).then(
            panel_full, outputs=panel_view, api_visibility="private", queue=False
        )
        # ---- end GPU panel wiring ----
        slow = gr.Timer(10.0)
        slow.tick(chat_notice, outputs=chat_notice_md, api_visibility="private", queue=False)
        slow.tick(image_notice, outputs=image_notice_md, api_visibility="private", queue=False)

        # Filled on page load (a callable value= would publish an API endpoint for each of these).
        demo.load(model_choices, outputs=model, api_visibility="private")
        demo.load(status_line, outputs=status_md, api_visibility="private", queue=False)
        demo.load(chat_notice, outputs=chat_notice_md, api_visibility="private")
        demo.load(image_notice, outputs=image_notice_md, api_visibility="private", queue=False)
        demo.load(gallery, outputs=[recent, listed], api_visibility="private", queue=False)
        demo.load(past_list, outputs=past, api_visibility="private", queue=False)
        demo.load(panel_full, outputs=panel_view, api_visibility="private", queue=False)  # GPU panel
        demo.load(account_row_now, outputs=[account_row, logout], api_visibility="private", queue=False)
        demo.load(eject_choices, outputs=eject_choice, api_visibility="private")
        refresh.click(model_choices, outputs=model, api_visibility="private").then(
            chat_notice, outputs=chat_notice_md, api_visibility="private"
        )

        def lit(on: bool):
            return lambda: gr.Button(interactive=on)

        chat_inputs = dict(
            fn=chat_ui,
            inputs=[message, chatbot, model, system],
            outputs=[chatbot, message, stop],
            api_visibility="private",
            concurrency_id=CHAT,
            concurrency_limit=gpu_slots,
            validator=validate_chat,
        )
        sent = [message.submit(**chat_inputs), send.click(**chat_inputs)]
        regen = regenerate.click(
            take_back_last, inputs=chatbot, outputs=[chatbot, message], api_visibility="private", queue=False
        ).success(**chat_inputs)
        sent.append(regen)
        edit_last.click(take_back_last, inputs=chatbot, outputs=[chatbot, message], api_visibility="private", queue=False)
        imagined = imagine.click(
            imagine_ui,
            inputs=[message, chatbot, model],
            outputs=[imagine_note, im_prompt, im_negative, imagine_box, stop],
            api_visibility="private",
            concurrency_id=CHAT,
            concurrency_limit=gpu_slots,
        )
        # The imagined prompt opens below the conversation, often off-screen: bring it into view.
        imagined.then(None, js=SHOW_IMAGINED_JS)
        # The flag stops a reply that is streaming or waiting for the GPU; `cancels` also drops one still
        # in Gradio's own queue.
        stop.click(stop_chat, api_visibility="private", queue=False, cancels=[*sent, imagined]).then(
            lit(False), outputs=stop, api_visibility="private", queue=False
        )
        new_chat.click(
            fresh_chat, outputs=[chatbot, message, stop], api_visibility="private", queue=False, cancels=[*sent, imagined]
        ).then(lambda: (None, gr.Dropdown(value=None)), outputs=[conv_id, past], api_visibility="private", queue=False)
        # Gradio's own trash icon on the conversation empties it in the browser; without this the page's id
        # stayed, and the next message saved the new conversation over the old one (issue 17). Clearing is a
        # new chat: the saved one stays under Past conversations.
        chatbot.clear(
            fresh_chat, outputs=[chatbot, message, stop], api_visibility="private", queue=False, cancels=[*sent, imagined]
        ).then(lambda: (None, gr.Dropdown(value=None)), outputs=[conv_id, past], api_visibility="private", queue=False)
        for ev in sent:
            ev.then(chat_notice, outputs=chat_notice_md, api_visibility="private")
            ev.then(save_conversation, inputs=[chatbot, conv_id], outputs=[conv_id, past], api_visibility="private", queue=False)
        past.input(open_conversation, inputs=past, outputs=[chatbot, conv_id], api_visibility="private", queue=False)
        delete.click(delete_conversation, inputs=conv_id, outputs=[chatbot, conv_id, past], api_visibility="private", queue=False)

        _bounds_checked_by_clair(steps, guidance, width, height, seed)
        render_inputs = [prompt, negative, steps, guidance, width, height, seed]
        rendered = generate.click(
            render,
            inputs=render_inputs,
            outputs=[result, info],
            api_name="render",
            validator=validate_render,
            concurrency_id=RENDER,
            concurrency_limit=gpu_slots,
        )
        # Imagine's second half: the fields filled, the Image tab opened, the render started (one click).
        from_chat = render_it.click(
            to_image_tab, inputs=[im_prompt, im_negative], outputs=[prompt, negative, tabs], api_visibility="private",
            queue=False,
        ).success(
            render, inputs=render_inputs, outputs=[result, info], api_visibility="private",
            concurrency_id=RENDER, concurrency_limit=gpu_slots,
        )
        for trigger in (generate.click, render_it.click):
            trigger(lit(True), outputs=cancel, api_visibility="private", queue=False)
        # Cancel is dark again once this page's render has ended: checked on the server every second (a
        # `.then` after an event with a validator runs once the validator passes, not when the render ends).
        gr.Timer(1.0).tick(render_running, outputs=cancel, api_visibility="private", queue=False)
        for ev in (rendered, from_chat):
            ev.then(render_summary, outputs=summary, api_visibility="private")
            ev.then(gallery, outputs=[recent, listed], api_visibility="private").then(
                image_notice, outputs=image_notice_md, api_visibility="private"
            )
        # A render is a plain function: it stops at the next step when the flag is set, and ends as "Cancelled"
        # (no `cancels=` here: Gradio would end it as an error with no words).
        cancel.click(cancel_render, outputs=cancel, api_visibility="private", queue=False)
        reuse.click(last_seed, outputs=seed, api_visibility="private", queue=False)
        fresh_seed.click(lambda: -1, outputs=seed, api_visibility="private", queue=False)
        aspect.input(pick_aspect, inputs=aspect, outputs=[width, height], api_visibility="private", queue=False)
        for side in (width, height):
            side.release(size_moved, inputs=[width, height], outputs=aspect, api_visibility="private", queue=False)
        recent.select(gallery_select, inputs=listed, outputs=[picked, chosen, picked_actions], api_visibility="private", queue=False)
        use.click(
            use_settings, inputs=chosen, outputs=[*render_inputs, aspect], api_visibility="private", queue=False
        )
        use_its_seed.click(use_seed, inputs=chosen, outputs=seed, api_visibility="private", queue=False)

    # Gradio runs at most `max_threads` jobs at once over all concurrency ids (Queue.active_jobs) and in as
    # many worker threads: room for every chat and render slot plus the small events, or chats would queue
    # behind renders there. Set before queue(), which sizes the job table from it.
    demo.max_threads = max(40, 2 * gpu_slots + 16)
    # Gradio's own queue holds only what the GPU slots cannot take yet: page loads and refusals pass quickly,
    # so it stays short; its limit is a backstop against floods, well above the caps (see docs/design.md).
    demo.queue(default_concurrency_limit=4, max_size=4 * cfg.max_queue)
    # mount_gradio_app never sets this, and Gradio's file checks are skipped until it is set: with it, an
    # input may only name files uploaded to Gradio, and an output only files under allowed_paths, the
    # working directory or the temp directory (gradio/processing_utils.py, _check_allowed).
    demo.has_launched = True
    return demo
