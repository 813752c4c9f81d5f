"""The Chat tab: its handlers (`ChatHandlers`, which hold the Studio and the conversation store), its layout
(`chat_tab`) and its wiring (`wire_chat`), plus the scripting API's /chat and /imagine.

Rule (docs/design.md, "Nothing a client sends is handed back"): no handler returns a structure that came
from the client. Gradio postprocesses what a handler returns and serves every file it names.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import gradio as gr

from clair.adapters.ui_common import (
    CHAT,
    SHOW_IMAGINED_JS,
    _guard,
    _is_notice,
    _job,
    _waiting_text,
    client_id,
    log,
    owner_of,
)
from clair.base.errors import ClairError
from clair.service import limits
from clair.service.conversations import ConversationStore, valid_id
from clair.service.studio import Studio, Token, Waiting, parse_imagined


class ChatHandlers:
    """The Chat tab's handlers, each taking what Gradio sends; the Studio and the saved conversations here."""

    def __init__(self, studio: Studio):
        self.studio = studio
        self.cfg = studio.cfg
        self.jobs = studio.jobs  # shared with the API (clair/adapters/gateway.py, clair/adapters/openai_api.py): the same caps
        self.conversations = ConversationStore(studio.cfg)

    async def chat_ui(self, message: str, history: list, model: str, system: str, request: gr.Request):
        """UI chat: shows the queue while held, then streams; errors appear in the conversation.

        The conversation shown is rebuilt from plain text on the server; a history holding anything else
        is refused (gr.Error) and nothing is returned.
        """
        if isinstance(message, str) and not message.strip():
            yield gr.skip(), gr.skip(), gr.skip()
            return
        try:
            message, past, system, model = limits.check_chat(self.cfg, message, history, system, model)
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        with _job(self.studio, request, "chat") as job:  # the front door: the caps, Stop, the lease
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

    async def chat_api(self, message: str, history: list[dict], request: gr.Request) -> AsyncIterator[str]:
        """Stream the growing reply to `message`, given `history` as [{role, content}] with string content."""
        reply = ""
        try:
            message, past, _, _ = limits.check_chat(self.cfg, message, history)
            with _job(self.studio, request, "api-chat") as job:
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
    def fresh_chat(self, request: gr.Request):
        """An empty conversation (a past one may have grown past the history limits); stops a reply."""
        self.studio.cancel(f"chat:{request.session_hash}")
        return [], "", gr.Button(interactive=False)

    def validate_chat(self, message, history, model, system, request: gr.Request):
        """The UI chat's limits and caps, checked when it is queued: a refused message never enters Gradio's
        queue. The handler checks all of it again (and is the only check for /chat)."""
        problem, at = None, 0
        try:
            if isinstance(message, str) and not message.strip():
                return [gr.validate(True, "")] * 4  # nothing to send: the handler does nothing
            limits.check_chat(self.cfg, message, history, system, model)
            which = self.jobs.would_refuse(client_id(request))
            if which is not None:
                problem = self.jobs.busy_message(which)
        except ClairError as exc:
            problem = str(exc)
            low = problem.lower()
            at = 3 if "system prompt" in low else 1 if ("conversation" in low or "history" in low) else 0
        except Exception as exc:
            problem = limits.unexpected(log, exc, "chat check")
        return [gr.validate(problem is None or i != at, problem or "") for i in range(4)]

    @_guard
    def stop_chat(self, request: gr.Request):
        self.studio.cancel(f"chat:{request.session_hash}")

    @_guard
    def chat_notice(self) -> str:
        backend, problem = self.studio.chat_backend()
        if problem:
            return f"⚠️ {problem}"
        return backend.notice()

    @_guard
    def model_choices(self):
        models = self.studio.chat_models()
        current = self.studio.default_chat_model()
        if current not in models:
            models = [current, *models]
        return gr.Dropdown(choices=models, value=current)

    def _past_choices(self, request: gr.Request) -> list[tuple[str, str]]:
        when = lambda t: time.strftime("%d %b %H:%M", time.localtime(t))  # noqa: E731
        return [(f"{s.title} · {when(s.updated)}", s.id) for s in self.conversations.list(owner_of(request))]

    @_guard
    def past_list(self, request: gr.Request):
        return gr.Dropdown(choices=self._past_choices(request), value=None)

    @_guard
    def save_conversation(self, history, conv_id, request: gr.Request):
        """Keep this conversation (plain text only, Clair's notices left out) under the page's id."""
        try:
            new_id = self.conversations.save(owner_of(request), valid_id(conv_id), history)
        except ClairError:
            return gr.skip(), gr.skip()
        return new_id, gr.Dropdown(choices=self._past_choices(request), value=new_id)

    @_guard
    def open_conversation(self, conv_id, request: gr.Request):
        """A past conversation of this user's, rebuilt from its file as plain text."""
        if not conv_id:
            return gr.skip(), gr.skip()
        messages = self.conversations.load(owner_of(request), conv_id)
        if messages is None:
            raise gr.Error("That conversation is gone (or is not yours): pick another one.", print_exception=False)
        self.studio.cancel(f"chat:{request.session_hash}")
        return messages, valid_id(conv_id)

    @_guard
    def delete_conversation(self, conv_id, request: gr.Request):
        if valid_id(conv_id) and self.conversations.delete(owner_of(request), conv_id):
            gr.Info("Conversation deleted.")
        return [], None, gr.Dropdown(choices=self._past_choices(request), value=None)

    @_guard
    def take_back_last(self, history):
        """Regenerate / edit: the conversation without its last exchange, and that last message in the box."""
        past = [m for m in limits.plain_history(history, self.cfg) if m["role"] != "system"]
        while past and past[-1]["role"] == "assistant":
            past.pop()
        if not past:
            raise gr.Error("There is no message to send again yet.", print_exception=False)
        last = past.pop()
        return past, last["content"]

    def _idea(self, message, history) -> str:
        """The idea to imagine: the message box if something is typed, else the conversation's last user turn."""
        if isinstance(message, str) and message.strip():
            return message
        past = limits.plain_history(history, self.cfg)
        return next((m["content"] for m in reversed(past) if m["role"] == "user"), "")

    async def imagine_ui(self, message, history, model, request: gr.Request):
        """Imagine, in the Chat tab: the chat model writes an SDXL prompt and a negative prompt from the idea.
        Streams its progress; ends with both fields filled (with whatever came back) for the user to edit."""
        try:
            message = limits.check_message(message, self.cfg)
            past = limits.plain_history(history, self.cfg)
            idea = self._idea(message, past)
            model = limits.check_model_name(model)
            if not idea.strip():
                raise ClairError("Describe the image first: type the idea, or chat about it and then press Imagine.")
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        reply = ""
        with _job(self.studio, request, "chat") as job:  # the front door: the caps, Stop, the lease
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
                prompt_text, negative_text = parse_imagined(reply, idea, self.cfg.max_prompt_chars)
                yield (
                    "Edit the prompt if you like, then **Render it** (the Image tab opens).",
                    prompt_text, negative_text, gr.skip(), gr.Button(interactive=False),
                )
            except ClairError as exc:
                yield f"⚠️ {exc}", gr.skip(), gr.skip(), gr.skip(), gr.Button(interactive=False)
            except Exception as exc:
                yield f"⚠️ {limits.unexpected(log, exc, 'imagine')}", gr.skip(), gr.skip(), gr.skip(), gr.Button(interactive=False)

    async def imagine_api(self, idea: str, history: list[dict] | None = None, request: gr.Request = None) -> tuple[str, str]:  # type: ignore[assignment]
        """Turn an idea (and an optional chat history) into an SDXL prompt and negative prompt, with the chat model."""
        try:
            past = limits.plain_history(history, self.cfg)
            limits.check_message(idea, self.cfg, "idea")
            with _job(self.studio, request, "api-chat") as job:
                return await job.imagine_prompt(idea, past)
        except gr.Error:
            raise
        except ClairError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            raise gr.Error(limits.unexpected(log, exc, "imagine"), print_exception=False) from None



def chat_tab(cfg) -> SimpleNamespace:
    """The Chat tab's components (built inside the page's `gr.Tabs`)."""
    c = SimpleNamespace()
    with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
        c.chat_notice_md = gr.Markdown(elem_id="chat-notice")
        c.conv_id = gr.State(None)  # server-side: this page's conversation id
        with gr.Row(elem_id="chat-top"):
            c.model = gr.Dropdown(label="Model", choices=[], allow_custom_value=True, scale=3, min_width=160)
            c.refresh = gr.Button("↻ Models", size="sm", scale=0, min_width=96, elem_id="refresh-models")
            c.past = gr.Dropdown(
                label="Past conversations", choices=[], value=None, scale=3, min_width=160, elem_id="past"
            )
            c.delete = gr.Button("Delete chat", size="sm", scale=0, min_width=90, elem_id="delete-chat")
        with gr.Accordion("System prompt", open=False):
            c.system = gr.Textbox(value=cfg.system_prompt, lines=2, show_label=False, max_length=cfg.max_message_chars)
        c.chatbot = gr.Chatbot(label="Conversation", height=440, buttons=["copy"], elem_id="chatbot")
        with gr.Row(elem_id="chat-input"):
            c.message = gr.Textbox(
                placeholder="Message… (Enter to send)", show_label=False, scale=6, min_width=200,
                max_length=cfg.max_message_chars,
            )
            c.send = gr.Button("Send", variant="primary", scale=1, min_width=70)
            c.stop = gr.Button("Stop", variant="stop", scale=1, min_width=70, interactive=False)
        with gr.Row(elem_id="chat-actions"):
            c.new_chat = gr.Button("New chat", size="sm", min_width=90)
            c.regenerate = gr.Button("↻ Regenerate", size="sm", min_width=110)
            c.edit_last = gr.Button("✎ Edit last", size="sm", min_width=100)
            c.imagine = gr.Button("Imagine", size="sm", variant="secondary", min_width=100, elem_id="imagine")
        c.imagine_note = gr.Markdown(
            "**Imagine** turns the idea (the message box, or the conversation's last message) into an image "
            "prompt with the chat model.",
            elem_id="imagine-note",
        )
        with gr.Group(visible=False, elem_id="imagine-box") as c.imagine_box:
            c.im_prompt = gr.Textbox(label="Imagined prompt", lines=2, max_length=cfg.max_prompt_chars)
            c.im_negative = gr.Textbox(label="Imagined negative prompt", lines=1, max_length=cfg.max_prompt_chars)
            c.render_it = gr.Button("Render it in the Image tab", variant="primary", elem_id="render-it")
    return c


def lit(on: bool):
    """A handler that lights (or darkens) a button."""
    return lambda: gr.Button(interactive=on)


def wire_chat(h: ChatHandlers, c: SimpleNamespace, gpu_slots: int) -> None:
    """The Chat tab's events (the page's `demo.load`s are wired in clair/adapters/ui.py)."""
    c.refresh.click(h.model_choices, outputs=c.model, api_visibility="private").then(
        h.chat_notice, outputs=c.chat_notice_md, api_visibility="private"
    )
    chat_inputs = dict(
        fn=h.chat_ui,
        inputs=[c.message, c.chatbot, c.model, c.system],
        outputs=[c.chatbot, c.message, c.stop],
        api_visibility="private",
        concurrency_id=CHAT,
        concurrency_limit=gpu_slots,
        validator=h.validate_chat,
    )
    sent = [c.message.submit(**chat_inputs), c.send.click(**chat_inputs)]
    regen = c.regenerate.click(
        h.take_back_last, inputs=c.chatbot, outputs=[c.chatbot, c.message], api_visibility="private", queue=False
    ).success(**chat_inputs)
    sent.append(regen)
    c.edit_last.click(
        h.take_back_last, inputs=c.chatbot, outputs=[c.chatbot, c.message], api_visibility="private", queue=False
    )
    imagined = c.imagine.click(
        h.imagine_ui,
        inputs=[c.message, c.chatbot, c.model],
        outputs=[c.imagine_note, c.im_prompt, c.im_negative, c.imagine_box, c.stop],
        api_visibility="private",
        concurrency_id=CHAT,
        concurrency_limit=gpu_slots,
    )
    # The imagined prompt opens below the conversation, often off-screen: bring it into view.
    imagined.then(None, js=SHOW_IMAGINED_JS)
    # The flag stops a reply that is streaming or waiting for the GPU; `cancels` also drops one still
    # in Gradio's own queue.
    c.stop.click(h.stop_chat, api_visibility="private", queue=False, cancels=[*sent, imagined]).then(
        lit(False), outputs=c.stop, api_visibility="private", queue=False
    )
    fresh = dict(outputs=[c.chatbot, c.message, c.stop], api_visibility="private", queue=False, cancels=[*sent, imagined])
    forget = dict(outputs=[c.conv_id, c.past], api_visibility="private", queue=False)
    c.new_chat.click(h.fresh_chat, **fresh).then(lambda: (None, gr.Dropdown(value=None)), **forget)
    # Gradio's own trash icon on the conversation empties it in the browser; without this the page's id
    # stayed, and the next message saved the new conversation over the old one (issue 17). Clearing is a
    # new chat: the saved one stays under Past conversations.
    c.chatbot.clear(h.fresh_chat, **fresh).then(lambda: (None, gr.Dropdown(value=None)), **forget)
    for ev in sent:
        ev.then(h.chat_notice, outputs=c.chat_notice_md, api_visibility="private")
        ev.then(
            h.save_conversation, inputs=[c.chatbot, c.conv_id], outputs=[c.conv_id, c.past],
            api_visibility="private", queue=False,
        )
    c.past.input(h.open_conversation, inputs=c.past, outputs=[c.chatbot, c.conv_id], api_visibility="private", queue=False)
    c.delete.click(
        h.delete_conversation, inputs=c.conv_id, outputs=[c.chatbot, c.conv_id, c.past],
        api_visibility="private", queue=False,
    )
