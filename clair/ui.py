"""The Gradio app: Chat and Image tabs, a status line, and the scripting API (/chat, /render, /status).

The only module that imports gradio. Handlers call `Studio`; ClairError becomes a message in the tab
(or `gr.Error` for API callers) here at the edge, and nothing else reaches the browser. Chats and renders
have a Gradio `concurrency_id` each; the arbiter decides their order on the GPU.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from clair.errors import ClairError
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
    content = message.get("content") if isinstance(message, dict) else None
    text = content if isinstance(content, str) else ""
    if isinstance(content, list) and content and isinstance(content[0], dict):
        text = str(content[0].get("text", ""))
    return message.get("role") == "assistant" and text.startswith(("⚠️", "⏳"))


def _unexpected(exc: Exception) -> str:
    log.exception("unexpected error")
    return (
        f"Something went wrong inside Clair ({type(exc).__name__}). The details are in Clair's log; please try again."
    )


def build(studio: Studio) -> gr.Blocks:
    cfg = studio.cfg

    # ---------------------------------------------------------------- handlers
    @close_off_loop
    def chat_ui(message: str, history: list, model: str, system: str, request: gr.Request):
        """UI chat: shows the queue while held, then streams; errors appear in the conversation."""
        history = list(history or [])
        if not message or not message.strip():
            yield history, message
            return
        history.append({"role": "user", "content": message})
        history.append({"role": "assistant", "content": "…"})
        yield history, ""
        with studio.cancel_scope(f"chat:{request.session_hash}") as stop:
            yield from _chat_ui_stream(message, history, model, system, stop)

    def _chat_ui_stream(message: str, history: list, model: str, system: str, stop: threading.Event):
        reply = ""
        try:
            past = [m for m in history[:-2] if not _is_notice(m)]
            for event in studio.chat(message, past, model=model or None, system=system, stop=stop):
                if isinstance(event, Waiting):
                    history[-1] = {"role": "assistant", "content": _waiting_text(event)}
                else:
                    reply += event.text
                    history[-1] = {"role": "assistant", "content": reply}
                yield history, ""
        except ClairError as exc:
            history[-1] = {"role": "assistant", "content": (reply + "\n\n" if reply else "") + f"⚠️ {exc}"}
            yield history, ""
        except Exception as exc:
            history[-1] = {"role": "assistant", "content": f"⚠️ {_unexpected(exc)}"}
            yield history, ""

    @close_off_loop
    def chat_api(message: str, history: list[dict]) -> Iterator[str]:
        """Stream the growing reply to `message`, given `history` as [{role, content}] with string content."""
        reply = ""
        try:
            for event in studio.chat(message, history):
                if isinstance(event, Token):
                    reply += event.text
                    yield reply
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        if not reply:
            yield ""

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
        key = f"render:{request.session_hash}" if request is not None else "render:api"
        try:
            params = RenderParams(
                prompt, negative_prompt, int(steps), float(guidance), int(width), int(height), int(seed)
            )
            with studio.cancel_scope(key) as cancel:
                path, info = studio.render(
                    params, on_progress=lambda text, frac: progress(frac, desc=text), cancel=cancel
                )
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            raise gr.Error(_unexpected(exc), print_exception=False) from None
        return path, info

    def render_summary(info: dict | None) -> str:
        if not info:
            return ""
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

    def validate_render(prompt, negative_prompt, steps, guidance, width, height, seed):
        """Checked before the render is queued, so a mistake does not wipe the last result."""
        return [
            gr.validate(bool(prompt and prompt.strip()), "Write a prompt first: describe the image you want."),
            gr.validate(True, ""),
            gr.validate(True, ""),
            gr.validate(True, ""),
            gr.validate(int(width) % 8 == 0, "Width must be a multiple of 8 from 64 to 2048."),
            gr.validate(int(height) % 8 == 0, "Height must be a multiple of 8 from 64 to 2048."),
            gr.validate(True, ""),
        ]

    def cancel_render(request: gr.Request):
        if studio.cancel(f"render:{request.session_hash}"):
            gr.Info("Cancelling the render…")

    def status() -> dict:
        """The arbiter's state: holder, waiting, residents and the VRAM ledger, last hand-over timings."""
        return studio.status()

    def status_line() -> str:
        st = studio.status()
        names = {"ollama": "Ollama", "image": "image model", "local-chat": "chat model"}
        h = st["holders"]
        if not h:
            gpu_text = "**GPU free**"
        else:
            doing = {"chat": "chatting", "render": "rendering"}
            gpu_text = "**GPU: " + ", ".join(f"{doing[x['kind']]} ({x['held_s']:.0f} s)" for x in h) + "**"
        if any(w.get("paused") for w in st["waiting"]):
            gpu_text += " · a render is paused for a chat"
        if st["waiting"]:
            gpu_text += f" · {len(st['waiting'])} waiting"
        loaded = ", ".join(f"{names.get(r['tenant'], r['tenant'])} ≈{r['gb']:.1f} GB" for r in st["resident"])
        vram = f"VRAM budget {st['budget_gb']:g} GB" if st["budget_gb"] else "VRAM budget unknown: one model at a time"
        where = "" if st["cuda"] else " (no CUDA: declared sizes)"
        return f"{gpu_text} · loaded: {loaded or 'nothing'}{where} · {vram}"

    def chat_notice() -> str:
        backend, problem = studio.chat_backend()
        if problem:
            return f"⚠️ {problem}"
        if backend is studio.local:
            note = " Ollama is not reachable, so chat uses the in-process model." if cfg.chat_backend == "auto" else ""
            return f"Chat engine: in-process model {studio.local.label}.{note}"
        return f"Chat engine: Ollama at `{studio.ollama.url}`."

    def image_notice() -> str:
        problem = studio.image.problem()
        return (
            f"⚠️ {problem}"
            if problem
            else f"Image model: {studio.image.label}. {studio.image.vae_line()} Images are saved in {studio.image.output_dir}."
        )

    def model_choices():
        models = studio.chat_models()
        current = studio.default_chat_model()
        if current not in models:
            models = [current, *models]
        return gr.Dropdown(choices=models, value=current)

    def gallery():
        return [str(p) for p in studio.image.recent(cfg.gallery_size)]

    # ---------------------------------------------------------------- layout
    with gr.Blocks(title="Clair") as demo:
        # The scripting API first, so these names are theirs (later events get suffixed names).
        gr.api(chat_api, api_name="chat", concurrency_id=CHAT, concurrency_limit=cfg.queue_slots)
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
        status_md = gr.Markdown(elem_id="gpu-status")

        with gr.Tab("Chat", id="chat"):
            chat_notice_md = gr.Markdown(elem_id="chat-notice")
            with gr.Row():
                model = gr.Dropdown(label="Model", choices=[], allow_custom_value=True, scale=3)
                refresh = gr.Button("↻", size="sm", scale=0, min_width=48)
            with gr.Accordion("System prompt", open=False):
                system = gr.Textbox(value=cfg.system_prompt, lines=2, show_label=False)
            chatbot = gr.Chatbot(label="Conversation", height=480, buttons=["copy"])
            with gr.Row():
                message = gr.Textbox(placeholder="Message… (Enter to send)", show_label=False, scale=6)
                send = gr.Button("Send", variant="primary", scale=1)
                stop = gr.Button("Stop", variant="stop", scale=1)

        with gr.Tab("Image", id="image"):
            image_notice_md = gr.Markdown(elem_id="image-notice")
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", lines=3)
                    negative = gr.Textbox(label="Negative prompt", lines=2)
                    with gr.Row():
                        steps = gr.Slider(1, 150, value=8 if cfg.demo else 30, step=1, label="Steps")
                        guidance = gr.Slider(0, 30, value=7.0, step=0.5, label="Guidance")
                    with gr.Row():
                        width = gr.Slider(64, 2048, value=1024, step=8, label="Width")
                        height = gr.Slider(64, 2048, value=1024, step=8, label="Height")
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

        with gr.Tab("Status", id="status"):
            status_json = gr.JSON(label="Arbiter")

        # ------------------------------------------------------------ wiring
        timer = gr.Timer(2.0)
        timer.tick(status_line, outputs=status_md, api_visibility="private", queue=False)
        timer.tick(status, outputs=status_json, api_visibility="private", queue=False)
        slow = gr.Timer(10.0)
        slow.tick(chat_notice, outputs=chat_notice_md, api_visibility="private", queue=False)
        slow.tick(image_notice, outputs=image_notice_md, api_visibility="private", queue=False)

        # Filled on page load (a callable value= would publish an API endpoint for each of these).
        demo.load(model_choices, outputs=model, api_visibility="private")
        demo.load(status_line, outputs=status_md, api_visibility="private", queue=False)
        demo.load(chat_notice, outputs=chat_notice_md, api_visibility="private")
        demo.load(image_notice, outputs=image_notice_md, api_visibility="private", queue=False)
        demo.load(gallery, outputs=recent, api_visibility="private", queue=False)
        demo.load(status, outputs=status_json, api_visibility="private", queue=False)
        refresh.click(model_choices, outputs=model, api_visibility="private").then(
            chat_notice, outputs=chat_notice_md, api_visibility="private"
        )

        chat_inputs = dict(
            fn=chat_ui,
            inputs=[message, chatbot, model, system],
            outputs=[chatbot, message],
            api_visibility="private",
            concurrency_id=CHAT,
            concurrency_limit=cfg.queue_slots,
        )
        sent = [message.submit(**chat_inputs), send.click(**chat_inputs)]
        # The flag stops a reply that is streaming or waiting for the GPU; `cancels` also drops one still
        # in Gradio's own queue.
        stop.click(stop_chat, api_visibility="private", queue=False, cancels=sent)
        for ev in sent:
            ev.then(chat_notice, outputs=chat_notice_md, api_visibility="private")

        rendered = generate.click(
            render,
            inputs=[prompt, negative, steps, guidance, width, height, seed],
            outputs=[result, info],
            api_name="render",
            validator=validate_render,
            concurrency_id=RENDER,
            concurrency_limit=cfg.queue_slots,
        )
        rendered.then(render_summary, inputs=info, outputs=summary, api_visibility="private")
        rendered.then(gallery, outputs=recent, api_visibility="private").then(
            image_notice, outputs=image_notice_md, api_visibility="private"
        )
        # A render is a plain function: Gradio cannot interrupt it, so the flag is checked at every step.
        cancel.click(cancel_render, api_visibility="private", queue=False, cancels=[rendered])

    # Gradio runs at most `max_threads` jobs at once over all concurrency ids (Queue.active_jobs) and in as
    # many worker threads: room for every chat and render slot plus the small events, or chats would queue
    # behind renders there. Set before queue(), which sizes the job table from it.
    demo.max_threads = max(40, 2 * cfg.queue_slots + 16)
    demo.queue(default_concurrency_limit=cfg.queue_slots, max_size=256)
    return demo
