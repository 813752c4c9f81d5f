"""The Gradio app: Chat and Image tabs, a status line, and the scripting API (/chat, /render, /status).

The only module that imports gradio. Handlers call `Studio`; ClairError becomes a message in the tab
(or `gr.Error` for API callers) here at the edge, and nothing else reaches the browser. GPU events
share one Gradio `concurrency_id` on top of the arbiter, which does the real arbitration.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from clair.errors import ClairError
from clair.image import RenderParams
from clair.studio import Studio, Token, Waiting

log = logging.getLogger("clair.ui")
GPU = "gpu"  # the concurrency_id every GPU event shares

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
    def chat_ui(message: str, history: list, model: str, system: str, request: gr.Request):
        """UI chat: shows the queue while held, then streams; errors appear in the conversation."""
        history = list(history or [])
        if not message or not message.strip():
            yield history, message
            return
        history.append({"role": "user", "content": message})
        history.append({"role": "assistant", "content": "…"})
        yield history, ""
        stop = studio.cancel_event(f"chat:{request.session_hash}")
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

    def chat_api(message: str, history: list[dict]) -> Iterator[str]:
        """Stream the growing reply to `message`, given `history` as [{role, content}] with string content."""
        reply = ""
        try:
            for event in studio.chat(message, history):
                if isinstance(event, Token):
                    reply += event.text
                    yield reply
        except ClairError as exc:
            raise gr.Error(str(exc)) from None
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
        key = f"render:{request.session_hash}" if request is not None else f"render:{threading.get_ident()}"
        cancel = studio.cancel_event(key)
        try:
            params = RenderParams(
                prompt, negative_prompt, int(steps), float(guidance), int(width), int(height), int(seed)
            )
            path, info = studio.render(params, on_progress=lambda text, frac: progress(frac, desc=text), cancel=cancel)
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            raise gr.Error(_unexpected(exc), print_exception=False) from None
        return path, info

    def render_summary(info: dict | None) -> str:
        if not info:
            return ""
        swap = f" · evicted {', '.join(info['evicted'])} in {info['evict_s']:.1f} s" if info.get("evicted") else ""
        return (
            f"Seed **{info['seed']}** · {info['width']}×{info['height']} · {info['steps']} steps · "
            f"waited {info['wait_s']:.1f} s{swap} · rendered in {info['render_s']:.1f} s · "
            f"saved as `{Path(info['path']).name}`"
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
        gr.api(chat_api, api_name="chat", concurrency_id=GPU, concurrency_limit=cfg.queue_slots)
        gr.api(status, api_name="status", queue=False)
        gr.Markdown("# Clair\nChat and images on one GPU, without running out of memory.")
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
            concurrency_id=GPU,
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
            concurrency_id=GPU,
            concurrency_limit=cfg.queue_slots,
        )
        rendered.then(render_summary, inputs=info, outputs=summary, api_visibility="private")
        rendered.then(gallery, outputs=recent, api_visibility="private").then(
            image_notice, outputs=image_notice_md, api_visibility="private"
        )
        # A render is a plain function: Gradio cannot interrupt it, so the flag is checked at every step.
        cancel.click(cancel_render, api_visibility="private", queue=False, cancels=[rendered])

    demo.queue(default_concurrency_limit=cfg.queue_slots, max_size=256)
    return demo
