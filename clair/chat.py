"""Chat engines: Ollama over HTTP (the official client) and a Hugging Face model in Clair's own process.

Both implement `ChatBackend`. They stream text, stop when asked, and can leave the GPU (`evict`);
they never decide *when* to use the GPU: callers hold an arbiter lease around `stream()`.
Constructors touch neither the GPU nor the network.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
import ollama

from clair.config import Config
from clair.errors import Cancelled, ChatUnavailable, EvictionFailed, expected_load_failure, load_failure
from clair.loadgate import LoadGate, source_fingerprint

log = logging.getLogger("clair.chat")
GiB = 1024**3


def flatten_history(history: Sequence[Any] | None) -> list[dict[str, str]]:
    """Turn Gradio chat history into Ollama messages: [{role, content: str}].

    Gradio 6 hands a Chatbot's content over as a list of blocks ([{"type": "text", "text": ...}]);
    the API and Ollama want plain strings (docs/facts.md, "Gradio and systemd details"). Non-text blocks (files) are
    named, empty messages are dropped, unknown roles are refused.
    """
    out: list[dict[str, str]] = []
    for item in history or []:
        if isinstance(item, dict):
            role, content = item.get("role"), item.get("content")
        else:
            role, content = getattr(item, "role", None), getattr(item, "content", None)
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"history entries need a role of system, user or assistant, not {role!r}")
        text = _text_of(content)
        if text.strip():
            out.append({"role": role, "content": text})
    return out


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        if "text" in content:
            return str(content["text"])
        if content.get("type") == "file" or "path" in content or "file" in content:
            f = content.get("file") or content
            name = f.get("orig_name") or f.get("path") if isinstance(f, dict) else str(f)
            return f"[file: {Path(str(name)).name}]"
        return ""
    if isinstance(content, (list, tuple)):
        return "".join(_text_of(c) for c in content)
    return str(content)


class ChatBackend(Protocol):
    name: str
    tenant: str  # the arbiter tenant this engine occupies

    def problem(self) -> str | None:
        """None when the engine can answer, else what is wrong and what to do."""

    def models(self) -> list[str]: ...

    def footprint(self, model: str) -> tuple[int, int]:
        """(bytes while answering, bytes while idle) on the GPU."""

    def stream(self, model: str, messages: list[dict[str, str]], stop: threading.Event) -> Iterator[str]: ...

    def evict(self) -> None: ...


# --------------------------------------------------------------------------------------------------
# Ollama
# --------------------------------------------------------------------------------------------------


class OllamaChat:
    """Chat through an Ollama server. The `ollama` tenant is everything Ollama has loaded."""

    name = "ollama"
    tenant = "ollama"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.url = cfg.ollama_url
        # A number is httpx's per-read timeout: the longest silence while Ollama loads or streams.
        # Ollama's own default is none at all, which is how chats hang forever (docs/facts.md, "Ollama").
        self.client = ollama.Client(host=self.url, timeout=cfg.ollama_timeout_s)
        self._probe = ollama.Client(host=self.url, timeout=3)
        self._sizes: dict[str, int] = {}
        self.last_evicted: list[str] = []

    # -- health ----------------------------------------------------------------------------------
    def unreachable(self) -> str:
        return (
            f"Ollama is not reachable at {self.url}. Start it (`ollama serve`, or `sudo systemctl start ollama`), "
            "or point OLLAMA_HOST at it."
        )

    def problem(self, model: str | None = None) -> str | None:
        model = model or self.cfg.chat_model
        try:
            names = self._list()
        except Exception as exc:
            log.debug("ollama probe failed: %s", exc)
            return self.unreachable()
        if not names:
            return f"Ollama has no models yet. Install one: `ollama pull {model}`."
        if model not in names and f"{model}:latest" not in names:
            return f"Model {model} is not installed in Ollama. Run `ollama pull {model}` or pick another model."
        return None

    def _list(self) -> list[str]:
        resp = self._probe.list()
        self._sizes = {m.model: int(m.size or 0) for m in resp.models if m.model}
        return list(self._sizes)

    def models(self) -> list[str]:
        try:
            return self._list()
        except Exception:
            return []

    def loaded(self) -> list[Any]:
        """Ollama's /api/ps entries; [] when it is down."""
        try:
            return list(self._probe.ps().models)
        except Exception:
            return []

    def resident_bytes(self) -> int:
        """What Ollama holds on the GPU now (size_vram of every loaded model)."""
        return sum(int(m.size_vram or 0) for m in self.loaded())

    def footprint(self, model: str) -> tuple[int, int]:
        loaded = {m.model: int(m.size_vram or m.size or 0) for m in self.loaded()}
        if model in loaded:
            return loaded[model], loaded[model]
        if model not in self._sizes:
            self.models()
        disk = self._sizes.get(model, int(4.9 * GiB))  # unknown: assume an 8B Q4 model
        est = estimate_loaded_bytes(disk, self.cfg.chat_num_ctx)
        return est, est

    # -- use -------------------------------------------------------------------------------------
    def stream(self, model: str, messages: list[dict[str, str]], stop: threading.Event) -> Iterator[str]:
        try:
            chunks = self.client.chat(
                model=model,
                messages=messages,
                stream=True,
                keep_alive=self.cfg.keep_alive_value,
                options={"num_ctx": self.cfg.chat_num_ctx, "num_predict": self.cfg.max_new_tokens},
            )
            try:
                for chunk in chunks:
                    if stop.is_set():
                        break
                    text = chunk.message.content or ""
                    if text:
                        yield text
            finally:
                chunks.close()  # aborts the HTTP stream: Ollama stops generating for us
        except ollama.ResponseError as exc:
            raise ChatUnavailable(self._explain(exc, model)) from None
        except ConnectionError:
            raise ChatUnavailable(self.unreachable()) from None
        except httpx.TimeoutException:
            raise ChatUnavailable(
                f"Ollama did not answer for {self.cfg.ollama_timeout_s:.0f} s. It may be overloaded or stuck: "
                "check `journalctl -u ollama`, or raise CLAIR_OLLAMA_TIMEOUT_S for very large models."
            ) from None
        except httpx.HTTPError as exc:
            raise ChatUnavailable(f"Lost the connection to Ollama at {self.url}: {exc}") from None

    def _explain(self, exc: ollama.ResponseError, model: str) -> str:
        if exc.status_code == 404:
            return f"Model {model} is not installed in Ollama. Run `ollama pull {model}` or pick another model."
        if exc.status_code == -1:
            return f"Ollama stopped in the middle of the reply: {exc.error}. Try again; if it repeats, check `journalctl -u ollama`."
        if exc.status_code == 503:
            return "Ollama's queue is full. Wait a moment and try again."
        return f"Ollama refused the request ({exc.status_code}): {exc.error}"

    def warm(self, model: str) -> None:
        """Load the model now (an empty chat) so the next message does not pay for the load."""
        # Same num_ctx as every chat: otherwise Ollama sizes the context from free VRAM (32k on a 24 GB
        # card), and the next chat, sent with the pinned num_ctx, would reload the model anyway.
        self.client.chat(
            model=model, messages=[], keep_alive=self.cfg.keep_alive_value, options={"num_ctx": self.cfg.chat_num_ctx}
        )

    def evict(self) -> None:
        """Unload everything Ollama holds, and return only once /api/ps is empty.

        The unload answer comes before the memory is free: the runner is only marked expired, killed
        after any running request ends, and listed by /api/ps until it has exited
        (docs/facts.md, "Ollama"). Rendering before that is how the seed ran out of memory.
        """
        try:
            models = [m.model for m in self._probe.ps().models]
        except ConnectionError:
            return  # Ollama is down: it holds no GPU memory
        self.last_evicted = models  # what the warm-up brings back after the render
        for name in models:
            try:
                self._probe.chat(model=name, messages=[], keep_alive=0)
            except ollama.ResponseError as exc:
                if exc.status_code != 404:
                    raise
        deadline = time.monotonic() + self.cfg.evict_timeout_s
        delay = 0.02
        while True:
            try:
                left = [m.model for m in self._probe.ps().models]
            except ConnectionError:
                return
            except httpx.TimeoutException:
                left = ["(ps blocked during unload)"]  # newer servers block /api/ps while unloading
            if not left:
                return
            if time.monotonic() > deadline:
                raise EvictionFailed(
                    f"Ollama still holds {', '.join(left)} after {self.cfg.evict_timeout_s:.0f} s, so the render "
                    "was stopped before it could run out of memory. Check `ollama ps`; a stuck request may "
                    "be keeping the model busy."
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def estimate_loaded_bytes(disk_bytes: int, num_ctx: int) -> int:
    """VRAM an Ollama model takes once loaded: weights plus KV cache for the pinned context.

    An 8B Q4_K_M is 4.9 GB on disk and ~5.2 GB loaded at a small context; its KV cache is ~0.5 GiB at
    4k and ~4 GiB at 32k (docs/facts.md, "Ollama"). The KV cache is scaled by model size.
    """
    kv_per_token = 128 * 1024 * (disk_bytes / (4.9 * 1e9))
    return int(disk_bytes * 1.06 + kv_per_token * num_ctx)


# --------------------------------------------------------------------------------------------------
# In-process (transformers)
# --------------------------------------------------------------------------------------------------


def token_streamer(tok: Any, **kwargs: Any):
    """A TextIteratorStreamer that hands over new text after every token.

    transformers' streamer holds text back until a space or newline, so a model that writes few spaces (or
    random bytes) arrives in one burst at the end. This one emits whatever the token added, except an
    incomplete UTF-8 sequence (decoded as a trailing U+FFFD), which waits for its remaining bytes.
    Built on demand so importing this module does not import transformers.
    """
    from transformers import TextIteratorStreamer

    class TokenStreamer(TextIteratorStreamer):
        def put(self, value):
            if len(value.shape) > 1 and value.shape[0] > 1:
                raise ValueError("TokenStreamer only supports batch size 1")
            if len(value.shape) > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):
                return  # a multi-byte character is still incomplete; end() flushes whatever is left
            printable = text[self.print_len :]
            if text.endswith("\n"):  # start a fresh cache per line, as the parent does
                self.token_cache, self.print_len = [], 0
            else:
                self.print_len += len(printable)
            self.on_finalized_text(printable)

    return TokenStreamer(tok, **kwargs)


class LocalChat:
    """A causal LM from the Hugging Face hub, a local folder, or `tiny` (random weights), in-process."""

    name = "local"
    tenant = "local-chat"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model_id = cfg.local_chat_model
        self._lock = threading.Lock()  # guards loading, and one generate() at a time
        self._model = None
        self._tok = None
        self._swap = None
        # A failed load is remembered: requests get its reason at once until a re-check (see clair/loadgate.py).
        self.gate = LoadGate(lambda: source_fingerprint(self.model_id, "config.json"))

    @property
    def label(self) -> str:
        return "tiny (random weights)" if self.model_id == "tiny" else self.model_id

    def problem(self, model: str | None = None) -> str | None:
        """Why the model cannot be loaded, until a load succeeds (None when it loaded or was not tried yet)."""
        return self.gate.problem

    def blocked(self) -> str | None:
        """The known load failure while no new attempt is due (a due re-check runs in the background)."""
        if self._model is not None:
            return None
        return self.gate.blocked(recheck=self._load_now)

    def _load_now(self) -> None:
        tried = self.gate.failures
        with self._lock:
            if self._model is None and self.gate.failures > tried and self.gate.problem:
                # Another load (the preload, a re-check) failed while we waited for it: that is the answer.
                raise ChatUnavailable(self.gate.problem)
            self._load_locked()

    def models(self) -> list[str]:
        return [self.label]

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        """Load to host memory (raises ChatUnavailable with what to do). No GPU is touched."""
        if self._model is not None:
            return  # loaded: don't queue behind a reply that is streaming under the lock
        known = self.blocked()
        if known:
            raise ChatUnavailable(known)
        self._load_now()

    def _load_locked(self):
        if self._model is not None:
            return
        import torch

        from clair import gpu

        t0 = time.monotonic()
        try:
            if self.model_id == "tiny":
                from clair.tiny import build_tiny_chat

                model, tok = build_tiny_chat()
            else:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                # A folder that is missing would otherwise be reported as a malformed hub id.
                source = self.model_id
                local = Path(source).expanduser()
                if local.exists():
                    source = str(local)
                elif source.startswith(("/", "./", "../", "~")):
                    raise FileNotFoundError(f"the folder {local} does not exist")
                dtype = torch.float16 if gpu.cuda() else torch.float32
                tok = AutoTokenizer.from_pretrained(source)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except Exception as exc:
            problem = load_failure("in-process chat model", self.model_id, exc, "CLAIR_LOCAL_CHAT_MODEL")
            problem += " Or start Ollama: chat uses it whenever it answers."
            self.gate.failed(problem)
            if expected_load_failure(exc):  # offline, a missing folder: the reason is enough, the trace is noise
                log.warning("in-process chat model unavailable model=%s: %s", self.model_id, problem)
                log.debug("in-process chat model load failed model=%s", self.model_id, exc_info=True)
            else:
                log.exception("in-process chat model load failed model=%s", self.model_id)
            raise ChatUnavailable(problem) from None
        model.eval()
        self._swap = gpu.WeightSwap([model], self.cfg.pinned_offload)
        self._swap.prepare()
        self._model, self._tok = model, tok
        self.gate.succeeded()
        log.info(
            "local chat model loaded model=%s s=%.2f gib=%.2f",
            self.model_id,
            time.monotonic() - t0,
            self._swap.nbytes / GiB,
        )

    def footprint(self, model: str = "") -> tuple[int, int]:
        if self._swap is not None:
            need = self._swap.nbytes
        else:
            need = int(0.05 * GiB) if self.model_id == "tiny" else int(1.2 * GiB)  # prior: ~0.5B fp16
        return int(need * 1.15), need  # ~15% for the KV cache and activations while answering

    def stream(self, model: str, messages: list[dict[str, str]], stop: threading.Event) -> Iterator[str]:
        """Stream a reply. Yields "" (a heartbeat, no text) while another reply still has the model.

        The caller holds its GPU lease meanwhile, so the wait must stay cancellable (`stop`) and visibly alive.
        """
        known = self.blocked()
        if known:
            raise ChatUnavailable(known)
        # Another reply may be generating: one generate() at a time. Wait for it cancellably, never blocked.
        while not self._lock.acquire(timeout=0.25):
            if stop.is_set():
                raise Cancelled("Stopped while waiting for the chat model.")
            yield ""
        try:
            yield from self._stream_locked(messages, stop)
        finally:
            self._lock.release()

    def _stream_locked(self, messages: list[dict[str, str]], stop: threading.Event) -> Iterator[str]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        from clair import gpu

        self._load_locked()
        assert self._swap is not None
        self._swap.restore()
        model_, tok = self._model, self._tok
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: v.to(model_.device) for k, v in ids.items()}

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        # timeout: a dead generate() must not hang the reader forever.
        streamer = token_streamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=120)
        failure: list[BaseException] = []

        def run():
            try:
                model_.generate(
                    **ids,
                    streamer=streamer,
                    max_new_tokens=min(self.cfg.max_new_tokens, 256 if self.model_id == "tiny" else 4096),
                    do_sample=True,
                    temperature=0.8,
                    stopping_criteria=StoppingCriteriaList([_Stop()]),
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                )
            except BaseException as exc:  # surfaced to the reader below
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="local-chat-generate", daemon=True)
        worker.start()
        try:
            for text in streamer:
                if text:
                    yield text
                if stop.is_set():
                    break
        except queue.Empty:
            raise ChatUnavailable(
                "The in-process chat model produced nothing for 120 s and was stopped. Try again; if it "
                "repeats, the model may be too large for this machine (CLAIR_LOCAL_CHAT_MODEL)."
            ) from None
        finally:
            stop.set()
            self._join(worker)
            gpu.empty_cache()
        if failure:
            raise ChatUnavailable(f"The in-process chat model failed: {failure[0]}")

    # How often a generate() that ignores the stop flag is reported while we wait for it.
    STOP_WARN_S = 30.0

    def _join(self, worker: threading.Thread) -> None:
        """Wait until generate() has really stopped: it uses the GPU until then, so the caller's lease (released
        after this returns) must stay held. generate() checks the stop flag after every token; one that does not
        return is a hung GPU, reported here and by the watchdog (the lease shows no progress), never hidden."""
        t0 = time.monotonic()
        while True:
            worker.join(self.STOP_WARN_S)
            if not worker.is_alive():
                return
            log.warning(
                "the in-process chat model is still generating %.0f s after it was asked to stop; "
                "its GPU lease stays held until it does",
                time.monotonic() - t0,
            )

    def evict(self) -> None:
        if self._swap is not None:
            self._swap.evict()
