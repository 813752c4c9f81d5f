"""Prometheus metrics for /metrics (issue 9): what the traffic cop does, measured.

`Metrics(studio)` builds its own `CollectorRegistry` (never the process-global one, so two apps in one
process, as in the tests, do not collide) and fills it two ways:

* events: the arbiter's hand-overs and idle evictions (`Arbiter.on_event`) and the studio's chats, renders,
  loads, restores, recoveries and errors (`Studio.on_event`) update counters and histograms as they happen;
* state at scrape time: a custom collector reads the arbiter's status (holder, queue, ledger, its counters)
  and, on CUDA, the device's memory figures, so those are never stale.

Every name starts with `clair_`; `SERIES` lists them (tests/test_metrics.py checks each is exposed).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from clair.device import gpu

KINDS = ("chat", "render")
SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
SERIES = (
    "clair_gpu_holder",
    "clair_queue_depth",
    "clair_handovers_total",
    "clair_handover_seconds",
    "clair_evict_seconds",
    "clair_restore_seconds",
    "clair_load_seconds",
    "clair_render_seconds",
    "clair_render_steps_total",
    "clair_renders_total",
    "clair_chat_time_to_first_token_seconds",
    "clair_chat_tokens_per_second",
    "clair_chats_total",
    "clair_vram_ledger_bytes",
    "clair_vram_budget_bytes",
    "clair_vram_device_bytes",
    "clair_budget_breaches_total",
    "clair_oom_recoveries_total",
    "clair_oom_failures_total",
    "clair_preemptions_total",
    "clair_idle_evictions_total",
    "clair_errors_total",
    "clair_worker_restarts_total",
    "clair_card_budget_bytes",
    "clair_card_ledger_bytes",
    "clair_card_free_bytes",
)


class _Live:
    """Gauges and counters read from the studio at scrape time."""

    def __init__(self, studio):
        self.studio = studio

    def collect(self):
        st = self.studio.arbiter.status()
        holder = GaugeMetricFamily("clair_gpu_holder", "Requests holding the GPU now, by kind.", labels=["kind"])
        queue = GaugeMetricFamily("clair_queue_depth", "Requests waiting for the GPU, by kind.", labels=["kind"])
        for kind in KINDS:
            holder.add_metric([kind], sum(1 for h in st["holders"] if h["kind"] == kind))
            queue.add_metric([kind], sum(1 for w in st["waiting"] if w["kind"] == kind))
        yield holder
        yield queue
        ledger = GaugeMetricFamily(
            "clair_vram_ledger_bytes", "GPU memory each resident tenant occupies, as the arbiter's ledger has it.",
            labels=["tenant"],
        )
        for r in st["resident"]:
            ledger.add_metric([r["tenant"]], r["bytes"])
        yield ledger
        yield GaugeMetricFamily(
            "clair_vram_budget_bytes", "The VRAM budget the arbiter plans within (0: unknown).",
            value=self.studio.arbiter.budget,
        )
        device = GaugeMetricFamily(
            "clair_vram_device_bytes",
            "GPU memory as the CUDA device reports it: total, free, and reserved by Clair's own process "
            "(absent without CUDA).",
            labels=["kind"],
        )
        now = gpu.reading()  # CUDA or the simulated card, read together
        if now is not None:
            device.add_metric(["total"], now.total)
            device.add_metric(["free"], now.free)
            device.add_metric(["clair_reserved"], now.reserved)
        yield device
        stats = st["stats"]
        for name, key, text in (
            ("clair_budget_breaches", "budget_exceeded", "Times the ledger went over the budget with several tenants resident."),
            ("clair_preemptions", "preemptions", "Renders paused at a step boundary for a chat."),
            ("clair_evict_failures", "evict_failures", "Evictions that failed."),
            ("clair_swaps", "swaps", "Tenants evicted from the GPU (for a request, out of memory, or idle)."),
            ("clair_grants", "grants", "GPU leases granted."),
        ):
            yield CounterMetricFamily(name, text, value=stats.get(key, 0))
        yield CounterMetricFamily(
            "clair_oom_recoveries", "Renders that ran out of GPU memory and recovered with a fallback.",
            value=self.studio.image.oom_recoveries,
        )
        yield CounterMetricFamily(
            "clair_oom_failures", "Renders that ran out of GPU memory with every fallback.",
            value=self.studio.image.oom_failures,
        )
        restarts = CounterMetricFamily(
            "clair_worker_restarts", "Worker processes started again after one died or stalled, per card "
            "(CLAIR_WORKERS=on; no samples without workers).", labels=["card"],
        )
        for card, n in sorted(self.studio.worker_restarts().items()):
            restarts.add_metric([card], n)
        yield restarts
        yield from self._cards()

    def _cards(self):
        """Per card (several cards with workers; one card is card "0"): its budget, its ledger, its free memory."""
        budget = GaugeMetricFamily("clair_card_budget_bytes", "Each card's VRAM budget (0: unknown).", labels=["card"])
        ledger = GaugeMetricFamily(
            "clair_card_ledger_bytes", "What each card's ledger holds, per tenant.", labels=["card", "tenant"]
        )
        free = GaugeMetricFamily("clair_card_free_bytes", "Each card's free memory, as read (absent: unknown).", labels=["card"])
        for card in self.studio.cards_status():
            label = str(card["index"])
            budget.add_metric([label], card["budget"])
            for r in card["resident"]:
                ledger.add_metric([label, r["tenant"]], r["bytes"])
            if card["reading"] is not None:
                free.add_metric([label], card["reading"]["free"])
        yield budget
        yield ledger
        yield free


class Metrics:
    """The registry of one app, fed by the studio's and the arbiter's events."""

    def __init__(self, studio):
        self.studio = studio
        r = self.registry = CollectorRegistry()
        self.handovers = Counter(
            "clair_handovers", "Grants that evicted another tenant first, by the kind they went to.", ["kind"], registry=r
        )
        self.handover_seconds = Histogram(
            "clair_handover_seconds", "A hand-over's duration: queue wait plus evictions.", ["kind"],
            buckets=SECONDS, registry=r,
        )
        self.evict_seconds = Histogram(
            "clair_evict_seconds", "One tenant's eviction from the GPU.", ["tenant"], buckets=SECONDS, registry=r
        )
        self.idle_evictions = Counter(
            "clair_idle_evictions", "Idle tenants unloaded without a request: eject, keep-alive.", ["tenant", "why"],
            registry=r,
        )
        self.restore_seconds = Histogram(
            "clair_restore_seconds", "Weights copied back onto the GPU (a render's start, a resume).", ["tenant"],
            buckets=SECONDS, registry=r,
        )
        self.load_seconds = Histogram(
            "clair_load_seconds", "A model's load from disk into host memory.", ["model"], buckets=SECONDS, registry=r
        )
        self.render_seconds = Histogram(
            "clair_render_seconds", "Time rendering (pauses not included).", buckets=SECONDS, registry=r
        )
        self.render_steps = Counter("clair_render_steps", "Denoising steps rendered.", registry=r)
        self.renders = Counter("clair_renders", "Renders finished.", registry=r)
        self.ttft = Histogram(
            "clair_chat_time_to_first_token_seconds", "From the GPU grant to a chat's first token (includes a model load).",
            ["backend"], buckets=SECONDS, registry=r,
        )
        self.tps = Histogram(
            "clair_chat_tokens_per_second", "A chat's streaming speed after its first token.", ["backend"],
            buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320, 1000), registry=r,
        )
        self.chats = Counter("clair_chats", "Chats finished.", ["backend"], registry=r)
        self.chat_tokens = Counter("clair_chat_tokens", "Tokens streamed in chat replies.", ["backend"], registry=r)
        self.errors = Counter("clair_errors", "Chats and renders that failed, by what and error kind.", ["what", "kind"], registry=r)
        for kind in KINDS:  # the series exist from the start, at 0
            self.handovers.labels(kind)
        r.register(_Live(studio))
        studio.arbiter.on_event(self._arbiter_event)
        studio.on_event(self._studio_event)

    def _arbiter_event(self, event: str, data: dict) -> None:
        if event == "start" and data.get("evicted"):
            self.handovers.labels(data["kind"]).inc()
            self.handover_seconds.labels(data["kind"]).observe(data.get("wait_s", 0.0) + data.get("evict_s", 0.0))
            for tenant, s in (data.get("evict_each_s") or {}).items():
                self.evict_seconds.labels(tenant).observe(s)
        elif event == "evict":
            self.idle_evictions.labels(data["tenant"], data.get("why") or "-").inc()
            self.evict_seconds.labels(data["tenant"]).observe(data.get("evict_s", 0.0))

    def _studio_event(self, event: str, data: dict) -> None:
        if event == "render":
            self.renders.inc()
            self.render_seconds.observe(data["render_s"])
            self.render_steps.inc(data["steps"])
        elif event == "chat":
            backend = data.get("backend") or "-"
            self.chats.labels(backend).inc()
            self.chat_tokens.labels(backend).inc(data.get("tokens") or 0)
            if data.get("ttft_s") is not None:
                self.ttft.labels(backend).observe(data["ttft_s"])
            if data.get("tokens_per_s") is not None:
                self.tps.labels(backend).observe(data["tokens_per_s"])
        elif event == "restore" and data.get("s"):
            self.restore_seconds.labels(data["tenant"]).observe(data["s"])
        elif event == "load":
            self.load_seconds.labels(data["model"]).observe(data["s"])
        elif event == "error":
            self.errors.labels(data["what"], data["kind"]).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition: (body, content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
