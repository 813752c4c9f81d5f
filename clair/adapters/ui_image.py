"""The Image tab: its handlers (`ImageHandlers`, which hold the Studio and each page's last render), its
layout (`image_tab`) and its wiring (`wire_image`), plus the scripting API's /render.

No handler returns a path derived from what a client sent: Gradio serves every file a returned value
names, so a handler hands back only files Clair wrote in its output folder (`served`).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from clair.adapters.ui_chat import lit
from clair.adapters.ui_common import (
    ASPECTS,
    CUSTOM,
    RENDER,
    _aspect_of,
    _bounds_checked_by_clair,
    _guard,
    _job,
    client_id,
    log,
    owner_of,
    summary_text,
)
from clair.base.errors import Cancelled, ClairError
from clair.engines.image import RenderParams, read_metadata
from clair.service import limits
from clair.service.studio import Studio

# Which render field a message names, for the validator to put it under (index into the render inputs).
_FIELDS = [(1, "negative prompt"), (0, "prompt"), (2, "steps"), (3, "guidance"), (4, "width"), (5, "height")]


class ImageHandlers:
    """The Image tab's handlers, each taking what Gradio sends; the Studio and each page's last render here."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self.cfg = studio.cfg
        self.jobs = studio.jobs  # shared with the API (clair/adapters/gateway.py, clair/adapters/openai_api.py): the same caps
        self.last_render: OrderedDict[tuple[str, str], dict] = OrderedDict()  # (client, session) -> info
        self.last_render_lock = threading.Lock()
        self.demo: gr.Blocks | None = None  # the page, once built: `client_gone` reads its queue

    def served(self, path: str | Path) -> str:
        """A path Clair built itself, inside the output folder: the only files a handler hands back."""
        p = Path(path).resolve()
        if p.parent != self.studio.image.output_dir or p.suffix != ".png" or not p.is_file():
            raise RuntimeError(f"refusing to hand back a path outside the output folder: {p}")
        return str(p)

    async def render(
        self,
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
            params = RenderParams(prompt, negative_prompt, steps, guidance, width, height, seed).validated(self.cfg)
            self.studio.check_fits(params)
            with _job(self.studio, request, "render") as job:  # the front door: the caps, Cancel, the lease

                def on_progress(text: str, frac: float) -> None:
                    progress(frac, desc=text)
                    if request is not None and self.client_gone(request.session_hash):
                        log.info("render cancelled: the client went away client=%s", who)
                        job.stop.set()  # a closed tab or a dropped script frees the GPU at the next step

                path, info = await job.render(params, on_progress=on_progress)  # waits on the event loop, no thread
            path = self.served(path)
            info = json.loads(json.dumps(info))  # plain JSON, built here
        except Cancelled:
            # Not an error: the person asked for it. The result and its info stay as they were.
            log.info("render cancelled client=%s", who)
            with self.last_render_lock:
                self.last_render[(who, session)] = {"cancelled": True}
            gr.Info("Cancelled.")
            return gr.skip(), gr.skip()
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            raise gr.Error(limits.unexpected(log, exc, "render"), print_exception=False) from None
        with self.last_render_lock:
            self.last_render[(who, session)] = info
            while len(self.last_render) > 256:
                self.last_render.popitem(last=False)
        return path, info

    def client_gone(self, session_hash: str | None) -> bool:
        """Has Gradio seen this page's event stream close? (It marks the session's running jobs not alive:
        gradio/queueing.py `Queue.clean_events`, called by the SSE route on disconnect.) A plain function
        cannot be interrupted by Gradio, so the render checks this at every step."""
        queue = getattr(self.demo, "_queue", None)
        if queue is None or not session_hash:
            return False
        for job_set in list(getattr(queue, "active_jobs", None) or []):
            for job in list(job_set or []):
                if getattr(job, "session_hash", None) == session_hash and not getattr(job, "alive", True):
                    return True
        return False

    @_guard
    def render_summary(self, request: gr.Request) -> str:
        """The last render's summary for this client and page, from the server's own record."""
        with self.last_render_lock:
            info = self.last_render.get((client_id(request), request.session_hash))
        if info and info.get("cancelled"):
            return "**Cancelled.** Nothing was saved; the GPU is free for the next render."
        return summary_text(info) if info else ""

    @_guard
    def last_seed(self, request: gr.Request):
        """"Reuse seed": the seed of this page's last render, from the server's own record."""
        with self.last_render_lock:
            info = self.last_render.get((client_id(request), request.session_hash))
        if not info or "seed" not in info:
            gr.Info("Render an image first: its seed is then reused.")
            return gr.skip()
        return int(info["seed"])

    # `progress`: Gradio builds the validator's BlockFunction with the handler's `tracks_progress`
    # (gradio/queueing.py, create_validator_fn), and with the handler async it hands the validator the
    # progress tracker too; without the parameter the call fails and the message never shows (test_browser).
    def validate_render(self, prompt, negative_prompt, steps, guidance, width, height, seed, request: gr.Request, progress=None):
        """Checked when the render is queued (HTTP 422 at /queue/join for API clients), so a mistake does
        not wipe the last result. The handler checks all of it again; this only answers sooner."""
        problem, at = None, 6
        try:
            params = RenderParams(prompt, negative_prompt, steps, guidance, width, height, seed).validated(self.cfg)
            self.studio.check_fits(params)
            which = self.jobs.would_refuse(client_id(request))
            if which is not None:
                problem, at = self.jobs.busy_message(which), 0
        except ClairError as exc:
            problem = str(exc)
            at = next((i for i, name in _FIELDS if name in problem.lower()), 6)
            if "render needs about" in problem:
                at = 4  # the size (assets/clair.css keeps a message on a slider off its number box)
        except Exception as exc:
            problem, at = limits.unexpected(log, exc, "render check"), 0
        return [gr.validate(problem is None or i != at, problem or "") for i in range(7)]

    @_guard
    def render_running(self, request: gr.Request):
        """Cancel is lit only while this page has a render waiting or running."""
        return gr.Button(interactive=self.studio.running(f"render:{request.session_hash}"))

    @_guard
    def cancel_render(self, request: gr.Request):
        if self.studio.cancel(f"render:{request.session_hash}"):
            log.info("render cancel asked client=%s", client_id(request))
            gr.Info("Cancelling: the render stops at its next step.")
        else:
            gr.Info("Nothing is rendering.")
        return gr.Button(interactive=False)

    @_guard
    def image_notice(self) -> str:
        problem = self.studio.image.problem()
        if problem:
            return f"⚠️ {problem}"
        text = (
            f"Image model: {self.studio.image.label}. {self.studio.image.vae_line()} Images are saved in "
            f"{self.studio.image.output_dir}. Drop a Clair PNG here to read its settings back."
        )
        if not self.studio.status()["cuda"]:
            gib = 1024**3
            idle = self.studio.image.footprint(1024, 1024)[1] / gib
            at = ", ".join(f"{w}² {self.studio.image.footprint(w, w)[0] / gib:.1f} GB" for w in (512, 1024, 2048))
            text += (
                f" No GPU here, so memory figures are what SDXL is known to need, not measured: {idle:.1f} GB "
                f"loaded; while rendering {at}."
            )
        return text

    @_guard
    def gallery(self, request: gr.Request):
        """The newest images from the server's own listing: the user's own, unless shared or no accounts.
        The list also goes into the page's server-side state: a selection is an index into it, never a path."""
        owner = None if self.cfg.shared_gallery else owner_of(request)
        paths = [self.served(p) for p in self.studio.image.recent(self.cfg.gallery_size, owner=owner)]
        return paths, paths

    def _settings_of(self, listed: list, index) -> dict | None:
        """The parameters in the `clair` chunk of the image at `index` of the server's own list."""
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(listed, list):
            return None
        if not 0 <= index < len(listed):
            return None
        try:
            meta = read_metadata(self.served(listed[index]))
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
    def gallery_select(self, listed: list, evt: gr.SelectData):
        """Show the selected image's parameters (read by the server from its own file)."""
        settings = self._settings_of(listed, evt.index if evt is not None else None)
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
    def use_settings(self, settings):
        """Fill the fields from the selected image's settings (kept server-side in the page's state)."""
        if not isinstance(settings, dict):
            return [gr.skip()] * 8
        return (
            settings["prompt"], settings["negative_prompt"], settings["steps"], settings["guidance"],
            settings["width"], settings["height"], settings["seed"], _aspect_of(settings["width"], settings["height"]),
        )

    @_guard
    def use_seed(self, settings):
        return settings["seed"] if isinstance(settings, dict) else gr.skip()

    @_guard
    def pick_aspect(self, choice):
        """An aspect preset sets width and height (a name from Clair's own table; anything else changes nothing)."""
        size = ASPECTS.get(choice) if isinstance(choice, str) else None
        if size is None:
            return gr.skip(), gr.skip()
        return min(size[0], self.cfg.max_side), min(size[1], self.cfg.max_side)

    @_guard
    def size_moved(self, w, h):
        """Free width and height: the preset follows them (a preset size, else Custom)."""
        try:
            return _aspect_of(int(w), int(h))
        except (TypeError, ValueError):
            return CUSTOM

    @_guard
    def to_image_tab(self, prompt_text, negative_text):
        """Render it: the imagined prompt goes into the Image tab's fields (checked plain text), which opens."""
        p = limits.check_prompt(prompt_text, self.cfg)
        n = limits.check_prompt(negative_text or "", self.cfg, "negative prompt")
        return p, n, gr.Tabs(selected="image")


def image_tab(cfg) -> SimpleNamespace:
    """The Image tab's components (built inside the page's `gr.Tabs`)."""
    c = SimpleNamespace()
    with gr.Tab("Image", id="image", elem_id="image-tab"):
        c.image_notice_md = gr.Markdown(elem_id="image-notice")
        with gr.Row(elem_id="image-row"):
            with gr.Column(scale=2, min_width=300):
                _settings(cfg, c)
            with gr.Column(scale=3, min_width=300):
                c.result = gr.Image(
                    label="Result", format="png", type="filepath", interactive=False, height=480, elem_id="result"
                )
                c.summary = gr.Markdown(elem_id="render-summary")
                with gr.Accordion("Parameters and timings", open=False):
                    c.info = gr.JSON(label="Render info", show_label=False)
        c.listed = gr.State([])  # server-side: the paths the gallery shows, in order
        c.chosen = gr.State(None)  # server-side: the selected image's settings
        c.recent = gr.Gallery(
            label="Recent images", columns=6, height=260, fit_columns=False, object_fit="contain", elem_id="gallery"
        )
        c.picked = gr.Markdown("Select an image to see its settings.", elem_id="picked")
        with gr.Row(visible=False) as c.picked_actions:
            c.use = gr.Button("Use these settings", size="sm", elem_id="use-settings")
            c.use_its_seed = gr.Button("Use its seed", size="sm")
    return c


def _settings(cfg, c: SimpleNamespace) -> None:
    """The left column: the prompts, Generate and Cancel, and the render's settings."""
    c.prompt = gr.Textbox(label="Prompt", lines=3, max_length=cfg.max_prompt_chars, elem_id="prompt")
    c.negative = gr.Textbox(label="Negative prompt", lines=2, max_length=cfg.max_prompt_chars, elem_id="negative")
    # Under the prompts, not under every setting: on a laptop screen (1366x900) the button
    # stays above the fold next to the result.
    with gr.Row():
        c.generate = gr.Button("Generate", variant="primary", elem_id="generate")
        c.cancel = gr.Button("Cancel", interactive=False)
    with gr.Row():
        c.steps = gr.Slider(
            1, cfg.max_steps, value=min(8 if cfg.demo else 30, cfg.max_steps), step=1,
            label="Steps", elem_id="steps", min_width=140,
        )
        c.guidance = gr.Slider(
            cfg.min_guidance,
            cfg.max_guidance,
            value=min(max(7.0, cfg.min_guidance), cfg.max_guidance),
            step=0.5,
            label="Guidance",
            elem_id="guidance",
            min_width=140,
        )
    size0 = min(1024, cfg.max_side)
    c.aspect = gr.Dropdown(
        label="Aspect (SDXL sizes)", choices=[*ASPECTS, CUSTOM],
        value=_aspect_of(size0, size0), elem_id="aspect",
    )
    with gr.Row():
        # Both boxes bring a typed value into range the same way (on leaving the box); the
        # range is written under them, so a 4096 that becomes 2048 is no surprise.
        side_info = f"64 to {cfg.max_side}, in steps of 8"
        c.width = gr.Slider(
            64, cfg.max_side, value=size0, step=8, label="Width", elem_id="width", min_width=140,
            info=side_info,
        )
        c.height = gr.Slider(
            64, cfg.max_side, value=size0, step=8, label="Height", elem_id="height", min_width=140,
            info=side_info,
        )
    with gr.Row(equal_height=True):
        c.seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", minimum=-1, elem_id="seed", scale=3)
        c.reuse = gr.Button("♻ Reuse seed", size="sm", scale=1, min_width=110, elem_id="reuse-seed")
        c.fresh_seed = gr.Button("Random seed", size="sm", scale=1, min_width=90)


def wire_image(h: ImageHandlers, c: SimpleNamespace, chat: SimpleNamespace, tabs: gr.Tabs, gpu_slots: int) -> None:
    """The Image tab's events, and the Chat tab's "Render it" (`chat`: its components), which renders here."""
    _bounds_checked_by_clair(c.steps, c.guidance, c.width, c.height, c.seed)
    render_inputs = [c.prompt, c.negative, c.steps, c.guidance, c.width, c.height, c.seed]
    rendered = c.generate.click(
        h.render,
        inputs=render_inputs,
        outputs=[c.result, c.info],
        api_name="render",
        validator=h.validate_render,
        concurrency_id=RENDER,
        concurrency_limit=gpu_slots,
    )
    # Imagine's second half: the fields filled, the Image tab opened, the render started (one click).
    from_chat = chat.render_it.click(
        h.to_image_tab, inputs=[chat.im_prompt, chat.im_negative], outputs=[c.prompt, c.negative, tabs],
        api_visibility="private", queue=False,
    ).success(
        h.render, inputs=render_inputs, outputs=[c.result, c.info], api_visibility="private",
        concurrency_id=RENDER, concurrency_limit=gpu_slots,
    )
    for trigger in (c.generate.click, chat.render_it.click):
        trigger(lit(True), outputs=c.cancel, api_visibility="private", queue=False)
    # Cancel is dark again once this page's render has ended: checked on the server every second (a
    # `.then` after an event with a validator runs once the validator passes, not when the render ends).
    gr.Timer(1.0).tick(h.render_running, outputs=c.cancel, api_visibility="private", queue=False)
    for ev in (rendered, from_chat):
        ev.then(h.render_summary, outputs=c.summary, api_visibility="private")
        ev.then(h.gallery, outputs=[c.recent, c.listed], api_visibility="private").then(
            h.image_notice, outputs=c.image_notice_md, api_visibility="private"
        )
    # A render is a plain function: it stops at the next step when the flag is set, and ends as "Cancelled"
    # (no `cancels=` here: Gradio would end it as an error with no words).
    c.cancel.click(h.cancel_render, outputs=c.cancel, api_visibility="private", queue=False)
    c.reuse.click(h.last_seed, outputs=c.seed, api_visibility="private", queue=False)
    c.fresh_seed.click(lambda: -1, outputs=c.seed, api_visibility="private", queue=False)
    c.aspect.input(h.pick_aspect, inputs=c.aspect, outputs=[c.width, c.height], api_visibility="private", queue=False)
    for side in (c.width, c.height):
        side.release(h.size_moved, inputs=[c.width, c.height], outputs=c.aspect, api_visibility="private", queue=False)
    c.recent.select(
        h.gallery_select, inputs=c.listed, outputs=[c.picked, c.chosen, c.picked_actions],
        api_visibility="private", queue=False,
    )
    c.use.click(h.use_settings, inputs=c.chosen, outputs=[*render_inputs, c.aspect], api_visibility="private", queue=False)
    c.use_its_seed.click(h.use_seed, inputs=c.chosen, outputs=c.seed, api_visibility="private", queue=False)
