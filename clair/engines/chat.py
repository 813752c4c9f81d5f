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
from typing import TYPE_CHECKING, Any

import httpx
import ollama

from clair.arbiter.policy import parts_bytes
from clair.base.config import Config, ollama_locality
from clair.base.errors import Cancelled, ChatUnavailable, EvictionFailed, ToolsUnsupported, load_failure
from clair.engines.base import LOCAL_GPU, REMOTE, Engine, StateFile
from clair.engines.loadgate import LoadGate, source_fingerprint

if TYPE_CHECKING:
    from clair.arbiter import Arbiter, Lease

log = logging.getLogger("clair.engines.chat")
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


class ChatBackend(Engine):
    """A chat engine: the `Engine` protocol plus what chat needs (see clair/engines/base.py)."""

    def models(self) -> list[str]:
        raise NotImplementedError

    def default_model(self) -> str:
        raise NotImplementedError

    def stream(
        self, model: str, messages: list[dict], stop: threading.Event, tools: list | None = None, meta: dict | None = None
    ) -> Iterator[str]:
        """Yield the reply's text. `meta`, when given, is filled at the end: `usage` (prompt tokens, reply
        tokens) as the engine counts them, and `tool_calls` ([{name, arguments: dict}]) when `tools` were
        offered and the model called one."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Ollama
# --------------------------------------------------------------------------------------------------

_DEFAULT_HOST = "registry.ollama.ai"
TAGS_RECHECK_S = 2.0  # see OllamaChat.installed


def model_name(name: str) -> str:
    """A model's name as Ollama's /api/ps and /api/tags list it: `phi4` -> `phi4:latest`.

    Ollama parses `[host/][namespace/]model[:tag][@digest]` and fills in `registry.ollama.ai`, `library`
    and `latest` (types/model/name.go in ollama/ollama); listings show the shortest form, without the
    default host and namespace; names compare case-insensitively (`Name.EqualFold`). So `library/phi4` and `registry.ollama.ai/library/phi4:latest` are
    `phi4:latest`, `jmorgan/m` is `jmorgan/m:latest`, and `hf.co/org/repo:Q4_K_M` keeps its host. The tag
    is looked for after the last `/` only: a host's port (`myhost:5000/m`) is not a tag.
    """
    n = name.strip().split("@", 1)[0]
    if "://" in n:  # a registry's protocol scheme (https://host/ns/model) is not part of the name
        n = n.split("://", 1)[1]
    head, sep, last = n.rpartition("/")
    if last and ":" not in last:
        last += ":latest"
    n = head + sep + last
    low = n.lower()
    for prefix in (f"{_DEFAULT_HOST}/library/", f"{_DEFAULT_HOST}/", "library/"):
        if low.startswith(prefix):
            return n[len(prefix) :]
    return n


def model_key(name: str) -> str:
    """What two names are compared by: Ollama's names are case-insensitive (types/model/name.go)."""
    return model_name(name).lower()


class OllamaChat(ChatBackend):
    """Chat through an Ollama server. The `ollama` tenant is everything Ollama has loaded.

    Fail closed: `/api/ps` is the only way to know what Ollama holds, and a busy server answers it slowly
    or not at all. A failed reading is "unknown", never "empty": the ledger keeps the last state, at the
    worst size known (`worst_bytes`). A refused connection is a reading: nothing listens, so no runner
    of that server holds memory (runners are the server's children), and on CUDA the free-memory check
    after every eviction covers the rest.
    """

    name = "ollama"
    tenant = "ollama"

    def __init__(self, cfg: Config, state: StateFile | None = None):
        self.cfg = cfg
        self.url = cfg.ollama_url
        on_gpu, why = ollama_locality(cfg)
        self.device = LOCAL_GPU if on_gpu else REMOTE
        self.locality = why
        # A number is httpx's per-read timeout: the longest silence while Ollama loads or streams.
        # Ollama's own default is none at all, which is how chats hang forever (docs/facts.md, "Ollama").
        self.client = ollama.Client(host=self.url, timeout=cfg.ollama_timeout_s)
        self._probe = ollama.Client(host=self.url, timeout=min(3.0, cfg.ollama_timeout_s))
        self.state = state if state is not None else StateFile(cfg.state_path)
        self._lock = threading.Lock()  # guards the fields below (readings come from any thread)
        self._sizes: dict[str, int] = {}  # model key -> bytes on disk (/api/tags)
        self._listed_at = float("-inf")  # time.monotonic() of the last /api/tags listing
        self._names: dict[str, str] = {}  # model key -> name as Ollama lists it
        self._seen: dict[str, tuple[str, int, int, int]] = {}  # last successful /api/ps: key -> (name, size, vram, ctx)
        self._seen_ok = False  # has any /api/ps reading succeeded since start?
        self._partial: set[tuple[str, int, int]] = set()  # partial offloads already reported
        self._used: dict[str, str] = {}  # every model Clair sent a chat for (key -> name): evict() unloads them
        self._arbiter: Arbiter | None = None
        self.last_evicted: list[str] = []
        self.warmups = 0
        self._warming = False  # a warm-up after a render is pending or running (one at a time)

    def attach(self, arbiter: Arbiter) -> None:
        self._arbiter = arbiter

    # -- health ----------------------------------------------------------------------------------
    def unreachable(self) -> str:
        return (
            f"Ollama is not reachable at {self.url}. Start it (`ollama serve`, or `sudo systemctl start ollama`), "
            "or point OLLAMA_HOST at it."
        )

    def default_model(self) -> str:
        return self.cfg.chat_model

    def problem(self, model: str | None = None) -> str | None:
        model = model or self.cfg.chat_model
        try:
            keys = self._list()
        except Exception as exc:
            log.debug("ollama probe failed: %s", exc)
            return self.unreachable()
        if not keys:
            return f"Ollama has no models yet. Install one: `ollama pull {model}`."
        if model_key(model) not in keys:
            return f"Model {model} is not installed in Ollama. Run `ollama pull {model}` or pick another model."
        return None

    def _list(self) -> list[str]:
        resp = self._probe.list()
        sizes = {model_key(m.model): int(m.size or 0) for m in resp.models if m.model}
        names = {model_key(m.model): model_name(m.model) for m in resp.models if m.model}
        with self._lock:
            self._sizes, self._names, self._listed_at = sizes, names, time.monotonic()
        return list(sizes)

    def installed(self, model: str) -> bool | None:
        """Is `model` in Ollama's /api/tags? None when that cannot be read (then Ollama decides). A name not in
        the last listing is looked up again, at most every TAGS_RECHECK_S: a model pulled a moment ago is found,
        and a client sending made-up names costs Ollama one listing per interval, not one per request."""
        key = model_key(model)
        with self._lock:
            if key in self._sizes:
                return True
            fresh = time.monotonic() - self._listed_at < TAGS_RECHECK_S
        if fresh:
            return False
        try:
            return key in self._list()
        except Exception:
            return None

    def models(self) -> list[str]:
        try:
            keys = self._list()
        except Exception:
            return []
        with self._lock:
            return [self._names[k] for k in keys]

    # -- what Ollama holds -------------------------------------------------------------------------
    def read(self) -> list[tuple[str, int, int, int]] | None:
        """One /api/ps reading: [(name, size, size_vram, context_length)], or None when it failed."""
        try:
            models = list(self._probe.ps().models)
        except ConnectionError:
            models = []  # nothing listens: see the class docstring
        except Exception as exc:  # timeout, HTTP 500, a broken answer: unknown, never empty
            log.warning("ollama /api/ps failed; keeping the last known state error=%s", str(exc) or type(exc).__name__)
            return None
        found = [
            (model_name(m.model or m.name or "?"), int(m.size or 0), int(m.size_vram or 0), int(m.context_length or 0))
            for m in models
        ]
        self._observe(found)
        return found

    def _observe(self, found: list[tuple[str, int, int, int]]) -> None:
        with self._lock:
            self._seen = {model_key(n): (n, size, vram, ctx) for n, size, vram, ctx in found}
            self._seen_ok = True
            # A model that left may be loaded again, partly on the CPU again: report that load too.
            self._partial = {p for p in self._partial if model_key(p[0]) in self._seen}
        for name, size, vram, ctx in found:
            if size > 0 and ctx > 0:
                # The size Ollama reports at this num_ctx replaces any estimate, from now on and after restarts.
                self.state.put("ollama_loaded_bytes", f"{model_key(name)}@{ctx}", size)
            if 0 < vram < size and (name, ctx, size) not in self._partial:
                self._partial.add((name, ctx, size))
                log.warning(
                    "ollama runs %s partly on the CPU: %.2f of %.2f GiB on the GPU (the GPU was short of memory "
                    "when it loaded; chat is slow until it reloads)",
                    name,
                    vram / GiB,
                    size / GiB,
                )
                if self._arbiter is not None:
                    self._arbiter.count_stat("partial_offload")

    def held_vram(self) -> int | None:
        """GPU bytes Ollama held at the last successful reading (None before any)."""
        with self._lock:
            return sum(v for _, _, v, _ in self._seen.values()) if self._seen_ok else None

    def notice(self) -> str:
        return f"Chat engine: Ollama at `{self.url}`."

    def held_outside(self) -> int | None:
        """The engine protocol's name for it: the Ollama server is another process (0 when elsewhere)."""
        return self.held_vram() if self.on_this_gpu else 0

    def seen(self, arbiter: Arbiter) -> list[dict] | None:
        """What Ollama holds by /api/ps, Clair's requests or not, the ledger told so (None: the reading failed).

        A model another program loaded straight on Ollama shows here, counts in the ledger, and is evicted
        before a render like Clair's own; a failed reading makes the ledger assume the worst."""
        if not self.on_this_gpu:
            return []
        found = self.sync(arbiter)
        if found is None:
            return None
        return [{"model": n, "gb": round(size / GiB, 2), "vram_gb": round(vram / GiB, 2)} for n, size, vram, _ in found]

    def loaded(self) -> list[str]:
        """Names /api/ps lists now; raises ChatUnavailable when it cannot be read (unknown is not empty)."""
        found = self.read()
        if found is None:
            raise ChatUnavailable(f"Ollama at {self.url} did not say which models it has loaded.")
        return [n for n, *_ in found]

    def resident_bytes(self) -> int | None:
        """What Ollama holds on the GPU now (size_vram of every loaded model); None when unknown."""
        found = self.read()
        return None if found is None else sum(v for _, _, v, _ in found)

    def worst_bytes(self) -> int:
        """What Ollama may hold when a reading failed: the largest of everything it was last seen holding,
        any size measured for a model, and the configured model's footprint."""
        with self._lock:
            seen = sum(max(size, vram) for _, size, vram, _ in self._seen.values())
        known = [int(v) for v in self.state.section("ollama_loaded_bytes").values() if isinstance(v, int)]
        # No /api/tags request here: the server just failed to answer one; what was listed before will do.
        return max([seen, self._model_bytes(self.cfg.chat_model, refresh=False), *known])

    def sync(self, arbiter: Arbiter) -> list[tuple[str, int, int, int]] | None:
        """Tell the ledger what Ollama really holds (size_vram from /api/ps); a failed reading keeps it.

        Returns the reading (see `read`), None when it failed or Ollama is elsewhere."""
        if not self.on_this_gpu:
            return None
        read_at = time.monotonic()
        found = self.read()
        if found is None:
            arbiter.set_resident(self.tenant, self.worst_bytes(), read_at=read_at, at_least=True)
        else:
            # By model as well: while chats run, a model the reading no longer shows and no chat brings has left.
            parts = [(model_key(n), max(size, vram)) for n, size, vram, _ in found]
            arbiter.set_resident(self.tenant, sum(v for _, _, v, _ in found), read_at=read_at, parts=parts)
        return found

    # -- sizes -----------------------------------------------------------------------------------
    def measured(self, model: str) -> int | None:
        """The size Ollama reported for `model` at the configured num_ctx, if it ever did."""
        value = self.state.get("ollama_loaded_bytes", f"{model_key(model)}@{self.cfg.chat_num_ctx}")
        return int(value) if isinstance(value, int) and value > 0 else None

    def _model_bytes(self, model: str, refresh: bool = True) -> int:
        measured = self.measured(model)
        if measured is not None:
            return measured
        key = model_key(model)
        with self._lock:
            disk = self._sizes.get(key)
        if disk is None and refresh:
            self.models()
            with self._lock:
                disk = self._sizes.get(key)
        return estimate_loaded_bytes(disk or int(4.9e9), self.cfg.chat_num_ctx)  # unknown: an 8B Q4 model

    def _loaded_bytes(self, model: str) -> int | None:
        """`model`'s size when the last reading shows it loaded at our num_ctx; None when it is not."""
        with self._lock:
            mine = self._seen.get(model_key(model))
        return max(mine[1], mine[2]) if mine is not None and mine[3] == self.cfg.chat_num_ctx else None

    def footprint(self, model: str) -> tuple[int, int]:
        """(need, idle): everything Ollama holds, plus `model` when it is not loaded yet at our num_ctx."""
        total = parts_bytes(self.parts(model))
        return total, total

    def to_load(self, model: str) -> int:
        """What Ollama will load for `model` (0 when the last reading shows it loaded at our num_ctx)."""
        if not self.on_this_gpu or self._loaded_bytes(model) is not None:
            return 0
        return self._model_bytes(model, refresh=False)

    def parts(self, model: str) -> tuple[tuple[str, int], ...]:
        """The footprint by model: everything Ollama was last seen holding, and `model` at its size. Two chats
        for different models sized before either loaded still add up in the ledger (Req.parts)."""
        key = model_key(model)
        with self._lock:
            held = {k: max(size, vram) for k, (_, size, vram, ctx) in self._seen.items() if k != key}
        own = self._loaded_bytes(model)
        return tuple(sorted({**held, key: own if own is not None else self._model_bytes(model)}.items()))

    def brings(self, model: str) -> str:
        """The part of `parts(model)` a chat for `model` brings (Req.brings)."""
        return model_key(model)

    # -- hooks -----------------------------------------------------------------------------------
    def after_grant(self, lease: Lease, model: str | None = None) -> None:
        """The chat may load `model` from now on: evictions unload it even if no reading ever shows it."""
        if model:
            with self._lock:
                self._used[model_key(model)] = model_name(model)

    def after_release(self, lease: Lease) -> None:
        if not self.on_this_gpu:
            return
        if lease.req.tenant == self.tenant:
            if self._arbiter is not None:
                self.sync(self._arbiter)  # what the chat really loaded, and at what size
        elif self.tenant in lease.evicted and lease.kind == "render":
            # Recovery: bring the chat model back in the background so the next message doesn't pay the load
            # (usually started already at the render's tail, see Studio.render: then this does nothing).
            self.warm_after_render()

    def warm_after_render(self) -> None:
        """Reload the chat model a render evicted, in the background (CLAIR_WARMUP), once per render.

        Studio calls it when the render's denoising loop is done (its tail): the warm-up's lease is then
        granted beside the VAE decode when the chat model fits beside it, else right after the decode.
        """
        if not self.on_this_gpu or not self.cfg.warmup or self._arbiter is None:
            return
        if self._arbiter.resident_bytes(self.tenant):
            return  # back already (the warm-up started at the render's tail, or a chat loaded it)
        with self._lock:
            if self._warming:
                return
            self._warming = True
        threading.Thread(target=self._warm_after_render, name="clair-warmup", daemon=True).start()

    def _warm_after_render(self) -> None:
        try:
            self._warm_now()
        finally:
            with self._lock:
                self._warming = False

    def _warm_now(self) -> None:
        arbiter = self._arbiter
        assert arbiter is not None
        # An optional grace period (CLAIR_WARMUP_DELAY_S, 0 by default): it used to be 2 s from the end of the
        # render, so that a render right after did not evict a fresh reload; the reload now starts at the
        # tail and a queued render skips it (below), which docs/performance.md measured as the better trade.
        if self.cfg.warmup_delay_s > 0:
            time.sleep(self.cfg.warmup_delay_s)
        if any(w["kind"] == "render" for w in arbiter.status()["waiting"]):
            return  # another render waits: it would evict the model again at once
        for model in self.last_evicted or [self.cfg.chat_model]:
            need, idle, parts, brings = self.sized(model)  # the warm-up brings its model
            lease = arbiter.request(
                "chat", self.tenant, need, idle, label=f"warm-up:{model}", parts=parts, brings=brings
            )
            try:
                lease.wait(self.cfg.queue_timeout_s)
                self.after_grant(lease, model)
                t0 = time.monotonic()
                self.warm(model)
                self.warmups += 1
                log.info("warm-up done model=%s s=%.2f", model, time.monotonic() - t0)
            except Exception as exc:
                log.warning("warm-up failed model=%s error=%s", model, exc)
            finally:
                lease.release()
                self.sync(arbiter)

    # -- use -------------------------------------------------------------------------------------
    def stream(
        self, model: str, messages: list[dict], stop: threading.Event, tools: list | None = None, meta: dict | None = None
    ) -> Iterator[str]:
        meta = {} if meta is None else meta
        try:
            chunks = self.client.chat(
                model=model,
                messages=messages,
                tools=tools or None,
                stream=True,
                keep_alive=self.cfg.keep_alive_value,
                options={"num_ctx": self.cfg.chat_num_ctx, "num_predict": self.cfg.max_new_tokens},
            )
            try:
                for chunk in chunks:
                    if stop.is_set():
                        break
                    text = chunk.message.content or ""
                    calls = chunk.message.tool_calls or []
                    if calls:  # Ollama sends a call whole, in one chunk
                        meta.setdefault("tool_calls", []).extend(
                            {"name": c.function.name, "arguments": dict(c.function.arguments or {})} for c in calls
                        )
                    if chunk.done:  # Ollama's own counts, on the final chunk
                        meta["usage"] = (int(chunk.prompt_eval_count or 0), int(chunk.eval_count or 0))
                    if text:
                        yield text
            finally:
                chunks.close()  # aborts the HTTP stream: Ollama stops generating for us
        except ollama.ResponseError as exc:
            if exc.status_code == 400 and "does not support tools" in str(exc.error):
                raise ToolsUnsupported(
                    f"{model} does not support tools: Ollama says its chat template has no tool calls. Pick a model "
                    'that has them (`ollama show MODEL` lists "tools" under Capabilities; llama3.1 and qwen2.5 do), '
                    "or send the request without `tools`."
                ) from None
            raise ChatUnavailable(self._explain(exc, model)) from None
        except (ConnectionError, httpx.ConnectError):  # a stream's connect error is not wrapped by the client
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
        """Unload what Ollama was last seen holding, every model Clair chatted with, and the configured
        model, and return only once a successful /api/ps reading is empty.

        The unload answer comes before the memory is free: the runner is only marked expired, killed
        after any running request ends, and listed by /api/ps until it has exited
        (docs/facts.md, "Ollama"). A failed or hung reading proves nothing, so it is retried until
        `evict_timeout_s`; then EvictionFailed refuses the render rather than squeeze it in.
        """
        found = self.read()
        with self._lock:
            seen = [n for n, *_ in self._seen.values()]
            used = list(self._used.values())
        loaded = [n for n, *_ in found] if found is not None else seen
        self.last_evicted = list(loaded)  # what the warm-up brings back after the render
        targets = {model_key(n): n for n in [*seen, *loaded, *used, model_name(self.cfg.chat_model)]}
        unloaded: set[str] = set()
        deadline = time.monotonic() + self.cfg.evict_timeout_s
        delay = 0.02
        problem = ""
        while True:
            for key, name in targets.items():
                if key in unloaded:
                    continue
                try:
                    self._probe.chat(model=name, messages=[], keep_alive=0)
                    unloaded.add(key)
                except ollama.ResponseError as exc:
                    if exc.status_code == 404:
                        unloaded.add(key)  # not installed: it cannot be loaded either
                    else:
                        problem = f"unloading {name} failed ({exc.status_code}: {exc.error})"
                except ConnectionError:
                    unloaded.add(key)  # nothing listens: nothing of it is loaded
                except Exception as exc:
                    problem = f"unloading {name} failed ({str(exc) or type(exc).__name__})"
            found = self.read()
            if found is not None and not found:
                return
            if found is None:
                problem = "/api/ps did not answer"
            else:
                left = [n for n, *_ in found]
                problem = f"it still lists {', '.join(left)}"
                for name in left:  # loaded meanwhile (another client of Ollama): unload it too
                    if model_key(name) not in targets:
                        targets[model_key(name)] = name
                        self.last_evicted.append(name)
            if time.monotonic() > deadline:
                raise EvictionFailed(
                    f"Ollama did not confirm within {self.cfg.evict_timeout_s:.0f} s that it freed the GPU "
                    f"({problem}), so the render was refused rather than run beside a model that may still be "
                    "loaded. Try again in a moment; if it repeats, check `ollama ps` and `journalctl -u ollama` "
                    "(a stuck request may be keeping the model busy)."
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def estimate_loaded_bytes(disk_bytes: int, num_ctx: int) -> int:
    """An upper bound of the VRAM an Ollama model takes once loaded, used until Ollama has reported it.

    Weights (the file, +5 %), a KV cache of 256 KiB per token per 4.9 GB of file (twice an 8B Llama's
    128 KiB, which covers the common GQA models), and 1.45 GiB for the compute graph and Ollama's
    per-GPU floor. An 8B Q4_K_M (4.9 GB) at 4k comes to 7.8 GB; `ollama ps` shows 5.4-6.5 GB for such
    models. Sources and figures: docs/design.md, "Footprints in the ledger".
    """
    scale = disk_bytes / 4.9e9
    kv = num_ctx * 256 * 1024 * scale
    return int(disk_bytes * 1.05 + kv + 1.45 * GiB)


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


def load_dtype(source: str, on_gpu: bool, bf16_ok: bool | None = None):
    """The dtype to load an in-process chat model in: on the CPU fp32; on a GPU the half precision it was
    trained in, read from its config (`dtype`, formerly `torch_dtype`): bf16 for a bf16 model (its
    activations overflow fp16's range), else fp16."""
    import torch

    if not on_gpu:
        return torch.float32
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
        trained = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    except Exception:  # the load itself reports an unreadable config, with what to do
        trained = None
    if bf16_ok is None:
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if str(trained).replace("torch.", "") == "bfloat16" and bf16_ok:
        return torch.bfloat16
    return torch.float16


class LocalChat(ChatBackend):
    """A causal LM from the Hugging Face hub, a local folder, or `tiny` (random weights), in-process."""

    name = "local"
    tenant = "local-chat"
    single_model = True  # any model name a client sends means this model (engine protocol)

    def notice(self) -> str:
        """The Chat tab's line about the engine."""
        if self.cfg.demo and self.model_id == "tiny":
            return (
                "Chat engine: the demo's tiny in-process model (random weights over a small word list: its "
                "replies are readable gibberish)."
            )
        note = " Ollama is not reachable, so chat uses the in-process model." if self.cfg.chat_backend == "auto" else ""
        return f"Chat engine: in-process model {self.label}.{note}"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model_id = cfg.local_chat_model
        self._lock = threading.Lock()  # guards loading, and one generate() at a time
        self._model = None
        self._tok = None
        self._swap = None
        # A failed load is remembered: requests get its reason at once until a re-check (see clair/engines/loadgate.py).
        self.gate = LoadGate(lambda: source_fingerprint(self.model_id, "config.json"))

    @property
    def label(self) -> str:
        return "tiny (random weights)" if self.model_id == "tiny" else self.model_id

    def default_model(self) -> str:
        return self.label

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

    def needs_load(self) -> bool:
        return self._model is None

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

        from clair.device import gpu

        t0 = time.monotonic()
        try:
            if self.model_id == "tiny":
                from clair.engines.tiny import build_tiny_chat

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
                dtype = load_dtype(source, gpu.cuda())
                tok = AutoTokenizer.from_pretrained(source)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except Exception as exc:
            problem = load_failure("in-process chat model", self.model_id, exc, "CLAIR_LOCAL_CHAT_MODEL")
            problem += " Or start Ollama: chat uses it whenever it answers."
            self.gate.failed_loading(problem, exc, "in-process chat model", self.model_id, log)
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

    def stream(
        self, model: str, messages: list[dict], stop: threading.Event, tools: list | None = None, meta: dict | None = None
    ) -> Iterator[str]:
        """Stream a reply. Yields "" (a heartbeat, no text) while another reply still has the model.

        `tools` are not offered (this model is not asked to call any; the /v1 adapter refuses them first);
        `meta["usage"]` counts the tokenizer's tokens: the prompt's, and the reply's that generate() made.

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
            yield from self._stream_locked(messages, stop, {} if meta is None else meta)
        finally:
            self._lock.release()

    def _stream_locked(self, messages: list[dict], stop: threading.Event, meta: dict) -> Iterator[str]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        from clair.device import gpu

        self._load_locked()
        assert self._swap is not None
        self._swap.restore()
        model_, tok = self._model, self._tok
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: v.to(model_.device) for k, v in ids.items()}
        prompt_tokens = int(ids["input_ids"].shape[-1])

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        # timeout: a dead generate() must not hang the reader forever.
        streamer = token_streamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=120)
        failure: list[BaseException] = []
        made: list[int] = []

        def run():
            try:
                out = model_.generate(
                    **ids,
                    streamer=streamer,
                    max_new_tokens=min(self.cfg.max_new_tokens, 256 if self.model_id == "tiny" else 4096),
                    do_sample=True,
                    temperature=0.8,
                    stopping_criteria=StoppingCriteriaList([_Stop()]),
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                )
                if getattr(out, "shape", None) is not None:  # generate() returns the prompt and the reply
                    made.append(int(out.shape[-1]) - prompt_tokens)
            except BaseException as exc:  # surfaced to the reader below
                failure.append(exc)
                streamer.end()

        worker = threading.Thread(target=run, name="local-chat-generate", daemon=True)
        gpu.begin_use()  # a render's peak measured meanwhile is not the render's alone
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
            gpu.end_use()
        if failure:
            raise ChatUnavailable(f"The in-process chat model failed: {failure[0]}")
        if made:
            meta["usage"] = (prompt_tokens, made[0])

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
