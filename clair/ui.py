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

import functools
import inspect
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from clair import limits, panel
from clair.errors import ClairError, GpuBusy
from clair.image import RenderParams
from clair.studio import Studio, Token, Waiting
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
    "**Demo mode:** the models here are tiny and have random weights, so images are noise and replies "
    "are gibberish. That is expected: everything else (the GPU traffic cop, queueing, saving) is real. "
    "For real models run `python app.py` with Ollama installed (`ollama pull llama3.1:8b`) and a GPU; "
    "the first render downloads RealVisXL (~7 GB)."
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


def summary_text(info: dict) -> str:
    """The line under a finished render: seed, size, the wait and the swaps, pauses, an out-of-memory fallback."""
    swap = f" · evicted {', '.join(info['evicted'])} in {info['evict_s']:.1f} s" if info.get("evicted") else ""
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

    def served(path: str | Path) -> str:
        """A path Clair built itself, inside the output folder: the only files a handler hands back."""
        p = Path(path).resolve()
        if p.parent != studio.image.output_dir or p.suffix != ".png" or not p.is_file():
            raise RuntimeError(f"refusing to hand back a path outside the output folder: {p}")
        return str(p)

    # ---------------------------------------------------------------- handlers
    # Rule (docs/design.md, "Nothing a client sends is handed back"): no handler returns a structure that
    # came from the client. Gradio postprocesses what a handler returns and serves every file it names.
    @close_off_loop
    def chat_ui(message: str, history: list, model: str, system: str, request: gr.Request):
        """UI chat: shows the queue while held, then streams; errors appear in the conversation.

        The conversation shown is rebuilt from plain text on the server; a history holding anything else
        is refused (gr.Error) and nothing is returned.
        """
        if isinstance(message, str) and not message.strip():
            yield gr.skip(), gr.skip()
            return
        try:
            message, past, system, model = limits.check_chat(cfg, message, history, system, model)
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        who = client_id(request)
        which = jobs.try_take(who)
        if which is not None:
            raise gr.Error(jobs.busy_message(which), print_exception=False)
        try:
            shown = [*past, {"role": "user", "content": message}, {"role": "assistant", "content": "…"}]
            yield shown, ""
            with studio.cancel_scope(f"chat:{request.session_hash}") as stop:
                reply = ""
                try:
                    context = [m for m in past if not _is_notice(m)]
                    for event in studio.chat(
                        message, context, model=model, system=system, stop=stop, owner=owner_of(request)
                    ):
                        if isinstance(event, Waiting):
                            shown[-1] = {"role": "assistant", "content": _waiting_text(event)}
                        else:
                            reply += event.text
                            shown[-1] = {"role": "assistant", "content": reply}
                        yield shown, ""
                except ClairError as exc:
                    shown[-1] = {"role": "assistant", "content": (reply + "\n\n" if reply else "") + f"⚠️ {exc}"}
                    yield shown, ""
                except Exception as exc:
                    shown[-1] = {"role": "assistant", "content": f"⚠️ {limits.unexpected(log, exc, 'chat')}"}
                    yield shown, ""
        finally:
            jobs.give_back(who)

    @close_off_loop
    def chat_api(message: str, history: list[dict], request: gr.Request) -> Iterator[str]:
        """Stream the growing reply to `message`, given `history` as [{role, content}] with string content."""
        who = client_id(request)
        taken = False
        reply = ""
        try:
            message, past, _, _ = limits.check_chat(cfg, message, history)
            which = jobs.try_take(who)
            if which is not None:
                raise GpuBusy(jobs.busy_message(which))
            taken = True
            for event in studio.chat(message, past):
                if isinstance(event, Token):
                    reply += event.text
                    yield reply
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            raise gr.Error(limits.unexpected(log, exc, "chat"), print_exception=False) from None
        finally:
            if taken:
                jobs.give_back(who)
        if not reply:
            yield ""

    @_guard
    def fresh_chat(request: gr.Request):
        """An empty conversation (a past one may have grown past the history limits); stops a reply."""
        studio.cancel(f"chat:{request.session_hash}")
        return [], ""

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
        session = request.session_hash if request is not None else str(threading.get_ident())
        who = client_id(request)
        try:
            # Every limit before the cap, the cap before any load or lease.
            params = RenderParams(prompt, negative_prompt, steps, guidance, width, height, seed).validated(cfg)
            studio.check_fits(params)
            with jobs.slot(who), studio.cancel_scope(f"render:{session}") as cancel:
                path, info = studio.render(
                    params,
                    on_progress=lambda text, frac: progress(frac, desc=text),
                    cancel=cancel,
                    owner=owner_of(request),
                )
            path = served(path)
            info = json.loads(json.dumps(info))  # plain JSON, built here
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            raise gr.Error(limits.unexpected(log, exc, "render"), print_exception=False) from None
        with last_render_lock:
            last_render[(who, session)] = info
            while len(last_render) > 256:
                last_render.popitem(last=False)
        return path, info

    @_guard
    def render_summary(request: gr.Request) -> str:
        """The last render's summary for this client and page, from the server's own record."""
        with last_render_lock:
            info = last_render.get((client_id(request), request.session_hash))
        return summary_text(info) if info else ""

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
                at = 4
        except Exception as exc:
            problem, at = limits.unexpected(log, exc, "render check"), 0
        return [gr.validate(problem is None or i != at, problem or "") for i in range(7)]

    @_guard
    def cancel_render(request: gr.Request):
        if studio.cancel(f"render:{request.session_hash}"):
            gr.Info("Cancelling the render…")

    @_guard
    def status() -> dict:
        """The arbiter's state: holder, waiting, residents and the VRAM ledger, last hand-over timings."""
        st = studio.status()
        st["jobs"] = {"total": jobs.total, "max_queue": jobs.max_total, "max_per_user": jobs.max_per_user}
        return st

    # ---- GPU panel (issue 9; clair/panel.py): the line atop both tabs, the Status tab, eject ----
    @_guard
    def status_line() -> str:
        return panel.compact_html(panel.panel_data(studio))

    @_guard
    def panel_full() -> str:
        return panel.panel_html(panel.panel_data(studio))

    @_guard
    def eject(tenant: str | None) -> str:
        """Unload an idle model by hand (any logged-in user may: one household). Busy ones stay."""
        if not isinstance(tenant, str) or not tenant:
            return "Choose a model to unload."
        return studio.eject(tenant)
    # ---- end GPU panel ----

    @_guard
    def chat_notice() -> str:
        backend, problem = studio.chat_backend()
        if problem:
            return f"⚠️ {problem}"
        if backend is studio.local:
            note = " Ollama is not reachable, so chat uses the in-process model." if cfg.chat_backend == "auto" else ""
            return f"Chat engine: in-process model {studio.local.label}.{note}"
        return f"Chat engine: Ollama at `{studio.ollama.url}`."

    @_guard
    def image_notice() -> str:
        problem = studio.image.problem()
        return (
            f"⚠️ {problem}"
            if problem
            else f"Image model: {studio.image.label}. {studio.image.vae_line()} Images are saved in {studio.image.output_dir}."
        )

    @_guard
    def model_choices():
        models = studio.chat_models()
        current = studio.default_chat_model()
        if current not in models:
            models = [current, *models]
        return gr.Dropdown(choices=models, value=current)

    @_guard
    def gallery(request: gr.Request):
        """The newest images from the server's own listing: the user's own, unless shared or no accounts."""
        owner = None if cfg.shared_gallery else owner_of(request)
        return [served(p) for p in studio.image.recent(cfg.gallery_size, owner=owner)]

    # ---------------------------------------------------------------- layout
    gpu_slots = cfg.max_queue + REFUSAL_SLOTS
    with gr.Blocks(title="Clair") as demo:
        # The scripting API first, so these names are theirs (later events get suffixed names).
        gr.api(chat_api, api_name="chat", concurrency_id=CHAT, concurrency_limit=gpu_slots)
        gr.api(status, api_name="status", queue=False)
        gr.Markdown("# Clair\nChat and images on one GPU, without running out of memory.")
        lan, users_exist = lan_note(cfg), has_users(cfg)
        if lan or users_exist:
            with gr.Row():
                gr.Markdown(lan, elem_id="lan-link")
                if lan:
                    gr.HTML(lan_qr(cfg), elem_id="lan-qr", scale=0, min_width=130)
                # Browser-only: POST /logout ends this session (clair/web.py); no server handler here.
                logout = gr.Button("Log out", size="sm", scale=0, min_width=96, visible=users_exist)
                logout.click(None, js=LOGOUT_JS)
        if cfg.demo:
            gr.Markdown(DEMO_BANNER, elem_id="demo-banner")
        status_md = gr.HTML(elem_id="gpu-status")  # GPU panel: the compact line atop both tabs

        with gr.Tab("Chat", id="chat"):
            chat_notice_md = gr.Markdown(elem_id="chat-notice")
            with gr.Row():
                model = gr.Dropdown(label="Model", choices=[], allow_custom_value=True, scale=3)
                refresh = gr.Button("↻", size="sm", scale=0, min_width=48)
            with gr.Accordion("System prompt", open=False):
                system = gr.Textbox(value=cfg.system_prompt, lines=2, show_label=False, max_length=cfg.max_message_chars)
            chatbot = gr.Chatbot(label="Conversation", height=480, buttons=["copy"])
            with gr.Row():
                message = gr.Textbox(
                    placeholder="Message… (Enter to send)", show_label=False, scale=6, max_length=cfg.max_message_chars
                )
                send = gr.Button("Send", variant="primary", scale=1)
                stop = gr.Button("Stop", variant="stop", scale=1)
                new_chat = gr.Button("New chat", scale=1)

        with gr.Tab("Image", id="image"):
            image_notice_md = gr.Markdown(elem_id="image-notice")
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", lines=3, max_length=cfg.max_prompt_chars)
                    negative = gr.Textbox(label="Negative prompt", lines=2, max_length=cfg.max_prompt_chars)
                    with gr.Row():
                        steps = gr.Slider(1, cfg.max_steps, value=min(8 if cfg.demo else 30, cfg.max_steps), step=1, label="Steps")
                        guidance = gr.Slider(
                            cfg.min_guidance,
                            cfg.max_guidance,
                            value=min(max(7.0, cfg.min_guidance), cfg.max_guidance),
                            step=0.5,
                            label="Guidance",
                        )
                    with gr.Row():
                        width = gr.Slider(64, cfg.max_side, value=min(1024, cfg.max_side), step=8, label="Width")
                        height = gr.Slider(64, cfg.max_side, value=min(1024, cfg.max_side), step=8, label="Height")
                    seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", minimum=-1)
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary")
                        cancel = gr.Button("Cancel")
                with gr.Column(scale=3):
                    result = gr.Image(label="Result", format="png", type="filepath", interactive=False, height=560)
                    summary = gr.Markdown(elem_id="render-summary")
                    with gr.Accordion("Parameters and timings", open=False):
                        info = gr.JSON(show_label=False)
            recent = gr.Gallery(label="Recent images", columns=6, height=260, fit_columns=False, object_fit="contain")

        # ---- GPU panel: the Status tab ----
        with gr.Tab("Status", id="status"):
            panel_view = gr.HTML(elem_id="gpu-panel")
            with gr.Row():
                eject_choice = gr.Dropdown(
                    label="Unload a model from the GPU",
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
        demo.load(gallery, outputs=recent, api_visibility="private", queue=False)
        demo.load(panel_full, outputs=panel_view, api_visibility="private", queue=False)  # GPU panel
        refresh.click(model_choices, outputs=model, api_visibility="private").then(
            chat_notice, outputs=chat_notice_md, api_visibility="private"
        )

        chat_inputs = dict(
            fn=chat_ui,
            inputs=[message, chatbot, model, system],
            outputs=[chatbot, message],
            api_visibility="private",
            concurrency_id=CHAT,
            concurrency_limit=gpu_slots,
            validator=validate_chat,
        )
        sent = [message.submit(**chat_inputs), send.click(**chat_inputs)]
        # The flag stops a reply that is streaming or waiting for the GPU; `cancels` also drops one still
        # in Gradio's own queue.
        stop.click(stop_chat, api_visibility="private", queue=False, cancels=sent)
        new_chat.click(fresh_chat, outputs=[chatbot, message], api_visibility="private", queue=False, cancels=sent)
        for ev in sent:
            ev.then(chat_notice, outputs=chat_notice_md, api_visibility="private")

        _bounds_checked_by_clair(steps, guidance, width, height, seed)
        rendered = generate.click(
            render,
            inputs=[prompt, negative, steps, guidance, width, height, seed],
            outputs=[result, info],
            api_name="render",
            validator=validate_render,
            concurrency_id=RENDER,
            concurrency_limit=gpu_slots,
        )
        rendered.then(render_summary, outputs=summary, api_visibility="private")
        rendered.then(gallery, outputs=recent, api_visibility="private").then(
            image_notice, outputs=image_notice_md, api_visibility="private"
        )
        # A render is a plain function: Gradio cannot interrupt it, so the flag is checked at every step.
        cancel.click(cancel_render, api_visibility="private", queue=False, cancels=[rendered])

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
