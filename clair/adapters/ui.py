"""The Gradio app: Chat and Image tabs, a status line, and the scripting API (/chat, /render, /status).

This module puts the page together (`build`): the handlers, then the layout, then the wiring. Each tab
lives in a module of its own (clair/adapters/ui_chat.py, clair/adapters/ui_image.py, clair/adapters/ui_status.py) with its handlers
(a class holding the Studio), its layout and its events; what they share is in clair/adapters/ui_common.py.

The only modules that import gradio (with ui_*.py). Handlers call `Studio`; ClairError becomes a message in the tab
(or `gr.Error` for API callers) here at the edge, and nothing else reaches the browser (an unexpected
error becomes a message with an error id; the details go to the log). Chats and renders have a
Gradio `concurrency_id` each; the arbiter decides their order on the GPU.

No handler returns a structure that came from the client, nor a path derived from one: Gradio serves
every file a returned value names (docs/design.md, "Nothing a client sends is handed back"). Limits and
the per-user and house caps on GPU jobs are checked here, before Studio takes a lease (clair/service/limits.py).
"""

from __future__ import annotations

import gradio as gr

from clair.adapters.ui_chat import ChatHandlers, chat_tab, wire_chat
from clair.adapters.ui_common import (  # noqa: F401 - re-exported: main.py and the tests use them from here
    ASSETS,
    CHAT,
    HEAD,
    REFUSAL_SLOTS,
    client_id,
    close_off_loop,
    login_message,
    owner_of,
    summary_text,
    theme,
)
from clair.adapters.ui_image import ImageHandlers, image_tab, wire_image
from clair.adapters.ui_status import StatusHandlers, header, status_tab, wire_status
from clair.service.studio import Studio


def build(studio: Studio) -> gr.Blocks:
    cfg = studio.cfg
    chat, image, status = ChatHandlers(studio), ImageHandlers(studio), StatusHandlers(studio)
    gpu_slots = cfg.max_queue + REFUSAL_SLOTS

    # ---------------------------------------------------------------- layout
    with gr.Blocks(title="Clair") as demo:
        # The scripting API first, so these names are theirs (later events get suffixed names).
        gr.api(chat.chat_api, api_name="chat", concurrency_id=CHAT, concurrency_limit=gpu_slots)
        gr.api(chat.imagine_api, api_name="imagine", concurrency_id=CHAT, concurrency_limit=gpu_slots)
        gr.api(status.status, api_name="status", queue=False)
        top = header(cfg)
        with gr.Tabs(selected="chat") as tabs:
            chat_c = chat_tab(cfg)
            image_c = image_tab(cfg)
            status_c = status_tab(studio)

        # ------------------------------------------------------------ wiring
        wire_status(status, top, status_c)
        slow = gr.Timer(10.0)
        slow.tick(chat.chat_notice, outputs=chat_c.chat_notice_md, api_visibility="private", queue=False)
        slow.tick(image.image_notice, outputs=image_c.image_notice_md, api_visibility="private", queue=False)
        # Filled on page load (a callable value= would publish an API endpoint for each of these).
        demo.load(chat.model_choices, outputs=chat_c.model, api_visibility="private")
        demo.load(status.status_line, outputs=top.status_md, api_visibility="private", queue=False)
        demo.load(chat.chat_notice, outputs=chat_c.chat_notice_md, api_visibility="private")
        demo.load(image.image_notice, outputs=image_c.image_notice_md, api_visibility="private", queue=False)
        demo.load(image.gallery, outputs=[image_c.recent, image_c.listed], api_visibility="private", queue=False)
        demo.load(chat.past_list, outputs=chat_c.past, api_visibility="private", queue=False)
        demo.load(status.panel_full, outputs=status_c.panel_view, api_visibility="private", queue=False)
        demo.load(status.account_row_now, outputs=[top.account_row, top.logout], api_visibility="private", queue=False)
        demo.load(status.eject_choices, outputs=status_c.eject_choice, api_visibility="private")
        wire_chat(chat, chat_c, gpu_slots)
        wire_image(image, image_c, chat_c, tabs, gpu_slots)
    image.demo = demo  # a render asks the page's queue whether its client went away

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
