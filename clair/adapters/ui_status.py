"""The GPU panel (issue 9; clair/service/panel.py): the status line atop both tabs, the Status tab and its Unload,
the page's header (logo, the LAN link, Log out, the demo banner), and the scripting API's /status.

`StatusHandlers` holds the Studio; `header` and `status_tab` are the layout; `wire_status` the events.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from clair.adapters.ui_common import DEMO_BANNER, _guard, logo_html, owner_of
from clair.edge.web import LOGOUT_JS, has_users, lan_note, lan_qr
from clair.service import panel
from clair.service.studio import Studio


class StatusHandlers:
    """The panel's and the header's handlers, each taking what Gradio sends; the Studio here."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self.cfg = studio.cfg
        self.jobs = studio.jobs  # shared with the API (clair/adapters/gateway.py, clair/adapters/openai_api.py): the same caps

    @_guard
    def status(self, request: gr.Request = None) -> dict:  # type: ignore[assignment]
        """The arbiter's state: holder, waiting, residents and the VRAM ledger, last hand-over timings
        (other users' jobs without their name or address, clair.service.panel.private_status)."""
        st = panel.private_status(self.studio.status(), owner_of(request))
        st["jobs"] = {"total": self.jobs.total, "max_queue": self.jobs.max_total, "max_per_user": self.jobs.max_per_user}
        return st

    @_guard
    def status_line(self, request: gr.Request = None) -> str:  # type: ignore[assignment]
        return panel.compact_html(panel.panel_data(self.studio, viewer=owner_of(request)))  # others' jobs: no names

    @_guard
    def panel_full(self, request: gr.Request = None) -> str:  # type: ignore[assignment]
        return panel.panel_html(panel.panel_data(self.studio, viewer=owner_of(request)))

    @_guard
    def eject(self, tenant: str | None) -> str:
        """Unload an idle model by hand (any logged-in user may: one household). Busy ones stay."""
        if not isinstance(tenant, str) or not tenant:
            return "Choose a model to unload."
        return self.studio.eject(tenant)

    def account_row_now(self):
        """Log out shows whenever there are users now (added while Clair runs too: their login came with them)."""
        users_now = has_users(self.cfg)
        return gr.Row(visible=bool(lan_note(self.cfg) or users_now)), gr.Button(visible=users_now)

    @_guard
    def eject_choices(self):
        """What may be unloaded (Studio.ejectable: the demo without Ollama offers none of Ollama's models)."""
        names = self.studio.ejectable()
        return gr.Dropdown(choices=[(name, t) for t, name in names.items()], value=None)


def header(cfg) -> SimpleNamespace:
    """The page's top: logo, the LAN link and its QR code, Log out, the demo banner, the GPU status line."""
    c = SimpleNamespace()
    gr.HTML(logo_html(), elem_id="clair-header-block")
    lan, users_exist = lan_note(cfg), has_users(cfg)
    # Built even without users: one added while Clair runs brings a login, and then this page needs its Log
    # out button (shown per page load, `account_row` below).
    with gr.Row(visible=bool(lan or users_exist), elem_id="account-row") as c.account_row:
        gr.Markdown(lan, elem_id="lan-link")
        if lan:
            gr.HTML(lan_qr(cfg), elem_id="lan-qr", scale=0, min_width=130)
        # Browser-only: POST /logout ends this session (clair/edge/web.py); no server handler here.
        c.logout = gr.Button("Log out", size="sm", scale=0, min_width=96, visible=users_exist, elem_id="logout")
        c.logout.click(None, js=LOGOUT_JS)
    if cfg.demo:
        gr.Markdown(DEMO_BANNER, elem_id="demo-banner")
    c.status_md = gr.HTML(elem_id="gpu-status")  # GPU panel: the compact line atop both tabs
    return c


def status_tab(studio: Studio) -> SimpleNamespace:
    """The Status tab's components (built inside the page's `gr.Tabs`)."""
    c = SimpleNamespace()
    with gr.Tab("Status", id="status"):
        c.panel_view = gr.HTML(elem_id="gpu-panel")
        with gr.Row():
            c.eject_choice = gr.Dropdown(
                label="Unload a model from the GPU",
                elem_id="eject-choice",
                choices=[(name, t) for t, name in studio.ejectable().items()],
                value=None,
                scale=3,
            )
            c.eject_btn = gr.Button("Unload", scale=1)
        c.eject_msg = gr.Markdown(elem_id="eject-message")
    return c


def wire_status(h: StatusHandlers, top: SimpleNamespace, c: SimpleNamespace) -> None:
    """The panel's refresh (every 1.5 s) and Unload."""
    timer = gr.Timer(1.5)
    timer.tick(h.status_line, outputs=top.status_md, api_visibility="private", queue=False)
    timer.tick(h.panel_full, outputs=c.panel_view, api_visibility="private", queue=False)
    c.eject_btn.click(h.eject, inputs=c.eject_choice, outputs=c.eject_msg, api_visibility="private", queue=False).then(
        h.panel_full, outputs=c.panel_view, api_visibility="private", queue=False
    )
