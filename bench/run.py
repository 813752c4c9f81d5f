"""Clair's arbiter benchmark: who waits, how long, and how many swaps, under each GPU policy.

    python bench/run.py --quick --out bench/out/quick.json      # CPU, no GPU or network, ~3 minutes

It drives the real `Studio` (arbiter, Ollama client code, image engine) with the tiny image model and
the Ollama stand-in from tests/ set to realistic delays: loading an 8B model takes 2 s (1-10 s is
typical from page cache), its unload finishes 1 s after Ollama answers (0.5-1.5 s), and it streams at
25 tokens/s (docs/facts.md, "Ollama"). Renders are paced to a consumer GPU's SDXL speed.
Every scenario runs on a simulated 20 GB card (clair/device/simcard.py, a file of its own): the stand-in's runners
and Clair's models take memory on it, and the device OOMs it counted are printed beside the ledger's figures.

What is simulated, and why:
* The ledger is told each render's *declared* size (768x768, or 1024x1024 where nothing fits beside
  it) while the tiny pipeline draws 256x256 (64x64 on the seed card), to keep CPU time out of the figures.
* Compute sharing: when the budget policy lets a chat and a render run at once, both slow down as
  measured on an H100 (render 2.29 -> 3.71 s, chat 26 -> 12 tok/s; docs/facts.md).

Scenarios, each run under each policy: chat_only (3 users), render_only (1 user), mixed (3 chat users
and an image user at once, both models fit in the 20 GB budget), mixed_nofit (the same at 1024x1024:
SDXL's 16.4 GiB and the 8B model's 5.7 GiB do not fit together; preemption off, so a chat waits for the
whole render), nofit_preempt (the same with CLAIR_PREEMPT=auto: the render pauses at a step boundary for
the chat, then evicts the model again and resumes). The JSON's top-level figures per
policy are the `mixed` scenario's; `budget_exceeded` is summed over all of them. A PNG timeline shows
who held the GPU in the mixed scenarios (when matplotlib is installed: it is in requirements-dev.txt).

The seed card (issue 11): the seed's 20 GB card, an 8B chat model whose loaded size comes from the
stand-in's own table of `ollama ps` figures (tests/ollama_standin.py, not Clair's estimate), 1024x1024
renders and three chat users: seed_card_chat (chats alone, the baseline), seed_card (CLAIR_VAE=fp16-fix),
seed_card_stock (CLAIR_VAE=stock) and seed_card_always (fp16-fix with CLAIR_PREEMPT=always: the render
pauses for each chat instead of sharing compute with it). Goals: with the fp16-safe VAE no eviction and no reload, and chat TTFT p95 within 1.5x
of chats alone.

Hiding the hand-over (issue 18): nofit_always is the no-fit load with CLAIR_PREEMPT=always; nofit_render and
seed_card_render are each load's renders alone (nothing to evict, no reload after them), the baseline of its
render slowdown (`render_slowdown`: request-to-finish p50 against theirs); after_render sends a chat the moment
each no-fit render returns (`after_render_ttft_*`: how soon the evicted chat model answers again; the reload
starts at the render's tail, beside the decode). The VAE decode is paced at DECODE_S. `chat_gpu_wait_*` is a
chat's wait for its lease (the arbiter's part of its first-token time, before the model's load and Ollama's
own queue). Goals: no-fit chat TTFT p95 within one step plus the model's unload and load plus 0.5 s; seed card
chat TTFT p95 within 1.5x of chats alone with a render slowdown under 25 %.

Settings for comparing (the load stays the same): --ollama-parallel N runs the stand-in with OLLAMA_NUM_PARALLEL=N
(Ollama's default is 1; each slot has its own KV cache and the slots share the model's compute), --preempt,
--max-preemptions and --pause-share override CLAIR_PREEMPT, CLAIR_MAX_PREEMPTIONS and the arbiter's pause
budget under always. `chat_ttft_by_position` splits the first-token times by a chat's place in Ollama's queue
(1 + the chats streaming when its lease was ready that got their first token before it), and `chat_samples`
lists each chat (sent at, first-token time, GPU wait, place).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clair.arbiter import Arbiter, GiB  # noqa: E402
from clair.base.config import Config  # noqa: E402
from clair.device import simcard  # noqa: E402
from clair.engines.image import RenderParams  # noqa: E402
from clair.service.studio import Studio, Token  # noqa: E402
from tests.ollama_standin import OllamaStandin  # noqa: E402

MODEL = "llama3.1:8b"
TOKEN_S = 0.04  # 25 tokens/s
REPLY_TOKENS = 20
RENDER_STEPS = 20
STEP_S = 0.1  # ~2 s for 20 steps: an SDXL step at 768x768 on a 4090-class card
# The VAE decode after the last step, paced like the steps (the tiny VAE itself takes milliseconds): the
# bench's assumption of a few steps' time, not a measurement (docs/performance.md says what is measured).
DECODE_S = 0.5
# The no-fit load (a 1024² render with the stock VAE and the 8B model do not fit together in 20 GB).
NOFIT_SCENARIOS = ("mixed_nofit", "nofit_preempt", "nofit_always", "nofit_render", "after_render")
CHAT_SLOWDOWN = 26 / 12  # measured: an 8B model decoding beside an SDXL render
RENDER_SLOWDOWN = 3.71 / 2.29


# The seed card's chat model: llama3.1:8b, a 4.7 GB file. Its loaded size comes from the stand-in's own table
# of `ollama ps` figures users posted (tests/ollama_standin.py, LOADED_SIZES: 6.2 GB at 4k), not Clair's estimate.
SEED_CARD_MODEL = {"name": MODEL, "disk_gb": 4.7}
SEED_CARD_VAES = {
    "seed_card": "fp16-fix",
    "seed_card_stock": "stock",
    "seed_card_chat": "fp16-fix",
    "seed_card_always": "fp16-fix",
    "seed_card_render": "fp16-fix",
}
SEED_CARD_SCENARIOS = tuple(SEED_CARD_VAES)


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def arbiter_overhead_us(n: int, rounds: int = 5) -> tuple[float, list[float]]:
    """One uncontended lease acquire + release on a bare arbiter, in µs.

    The median of each of `rounds` rounds, and the best of those (as timeit does): on a shared VM the
    scheduler's noise only ever adds time, and it moved single medians between 25 and 47 µs here.
    """
    a = Arbiter(policy="budget", budget_bytes=20 * GiB)
    medians = []
    for _ in range(rounds):
        samples = []
        for _ in range(n // rounds):
            t0 = time.perf_counter_ns()
            lease = a.request("chat", "ollama", GiB)
            lease.poll(0)
            lease.release()
            samples.append(time.perf_counter_ns() - t0)
        medians.append(statistics.median(samples) / 1000)
    return min(medians), [round(m, 2) for m in medians]


class Contention:
    """Tracks what computes on the GPU now, and slows the other tenant as a shared GPU would."""

    def __init__(self, standin: OllamaStandin):
        self.standin = standin
        self.lock = threading.Lock()
        self.running = {"chat": 0, "render": 0}
        self.timeline: list[tuple[str, float, float]] = []  # (kind, start, end)
        self._open: dict[int, tuple[str, float]] = {}

    def on_event(self, event: str, data: dict) -> None:
        with self.lock:
            if event == "start":
                self.running[data["kind"]] += 1
                self._open[data["id"]] = (data["kind"], data["at"])
            elif event == "release" and data["id"] in self._open:
                kind, start = self._open.pop(data["id"])
                self.running[kind] -= 1
                self.timeline.append((kind, start, data["at"]))
            self.standin.token_delay = TOKEN_S * (CHAT_SLOWDOWN if self.running["render"] else 1.0)

    def step_s(self) -> float:
        with self.lock:
            return STEP_S * (RENDER_SLOWDOWN if self.running["chat"] else 1.0)


# The others: Clair's default (auto). seed_card_always: CLAIR_PREEMPT=always, so a chat gets the GPU alone
# (the render pauses for it) instead of sharing compute with the render.
PREEMPT = {
    "mixed_nofit": "off",
    "nofit_preempt": "auto",
    "nofit_always": "always",
    "seed_card": "auto",
    "seed_card_always": "always",
}
# Renders alone under the same load's sizes and pacing: the baseline of each load's render slowdown.
BASELINE = {
    "mixed_nofit": "nofit_render",
    "nofit_preempt": "nofit_render",
    "nofit_always": "nofit_render",
    "seed_card": "seed_card_render",
    "seed_card_always": "seed_card_render",
    "seed_card_stock": "seed_card_render",
}


def run_scenario(
    policy: str,
    scenario: str,
    chats: int,
    renders: int,
    out_dir: Path,
    parallel: int = 1,
    preempt: str = "",
    max_preemptions: int | None = None,
    pause_share: float | None = None,
) -> dict:
    seed_card = scenario in SEED_CARD_SCENARIOS
    disk_gb = SEED_CARD_MODEL["disk_gb"] if seed_card else 4.9
    # Every scenario runs on a simulated 20 GB card of its own (clair/device/simcard.py): the stand-in's runners and
    # Clair's models take and give back memory on it, and it counts every out-of-memory refusal itself.
    card = out_dir / f"{policy}-{scenario}-card.json"
    # OLLAMA_NUM_PARALLEL: 1 is Ollama's default; with more, each slot has its own KV cache (the model takes more
    # of the card) and the slots generating at once share its compute (tests/ollama_standin.py, parallel_share).
    standin = OllamaStandin(
        {MODEL: disk_gb},
        load_delay=2.0,
        unload_delay=1.0,
        token_delay=TOKEN_S,
        sim_card=str(card),
        num_parallel=parallel,
    )
    standin.reply_fn = lambda body: ["tok"] + [" tok"] * (REPLY_TOKENS - 1)
    standin.start()
    cfg = dataclasses.replace(
        Config(),
        chat_backend="ollama",
        ollama_host=standin.host,
        image_model="tiny",
        output_dir=str(out_dir / f"{policy}-{scenario}"),
        gpu_policy=policy,
        sim_gpu_gb=20.0,
        sim_gpu_file=str(card),
        vram_budget_gb=20.0,  # the whole card, as before: the card itself says whether that was too much
        warmup=True,
        preempt=preempt or PREEMPT.get(scenario, Config().preempt),
        max_preemptions=Config().max_preemptions if max_preemptions is None else max_preemptions,
        # The tiny pipeline keeps its own VAE; the footprint it declares follows CLAIR_VAE.
        vae=SEED_CARD_VAES.get(scenario, "stock"),
    )
    studio = Studio(cfg)
    if pause_share is not None:  # the arbiter's pause budget under `always` (clair/arbiter/policy.py, pause_budget)
        studio.arbiter.max_pause_share = pause_share
    # Every lease, for the chats' wait for the GPU (request to the grant's evictions done): what the arbiter
    # decides, without the model's load or Ollama's own queue that follow it.
    leases: list = []
    mine = threading.local()  # each chat user's last lease, for its place in Ollama's queue
    request = studio.arbiter.request

    def record(*a, **k):
        leases.append(request(*a, **k))
        mine.lease = leases[-1]
        return leases[-1]

    studio.arbiter.request = record
    contention = Contention(standin)
    studio.arbiter.on_event(contention.on_event)
    declared = 1024 if scenario in NOFIT_SCENARIOS or seed_card else 768
    real_footprint = studio.image.footprint
    studio.image.footprint = lambda w, h: real_footprint(declared, declared)  # see the module docstring
    pipe = studio.image.load()
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: time.sleep(DECODE_S))
    pipe.sim_render_size = (declared, declared)  # the card sees the declared size's memory
    studio.image.learns = False  # and a peak per megapixel of the small drawing would be wrong
    # With the simulated card the stand-in sizes its loads to the card's free memory. Without one, Ollama sees
    # a card of the budget's size, and while a render runs, the render's share of it is taken (its whole
    # footprint while it denoises, the decode's once its tail has shrunk it: the ledger's figure, which the
    # render reports when its UNet and text encoders leave): a chat model loaded beside a render that left it
    # too little is partly offloaded to the CPU, which the engine reports (partial_offload) and this benchmark
    # counts as a budget breach.
    standin.vram_total_bytes = studio.arbiter.budget
    standin.vram_used_elsewhere = lambda: studio.arbiter.resident_bytes("image") if contention.running["render"] else 0
    # The seed card and the no-fit load draw 64x64 and warm the pipeline first: on a shared 2-core machine the
    # tiny model's own CPU time at 256x256 (and its first call) stretched renders to 6-32 s instead of the paced
    # ~3 s, and every extra second of render slows the chats beside it. Only the pacing should count.
    small = seed_card or scenario in NOFIT_SCENARIOS
    draw = 64 if small else 256
    if small:
        studio.image.render(RenderParams("warm-up", steps=2, width=draw, height=draw, seed=0).validated())

    ttft: list[float] = []
    sent: dict[str, float] = {}  # each chat's message -> its first-token time, to find it in Ollama's queue
    firsts: list[tuple] = []  # (the chat's lease, its first token's time.time(), its first-token time)
    render_wait: list[float] = []
    render_s: list[float] = []
    render_total: list[float] = []  # GPU start to finish, pauses included
    render_e2e: list[float] = []  # request to finish: what the image user waits
    after_ttft: list[float] = []  # after_render: a chat sent the moment a render returns
    paused: list[float] = []
    preemptions = 0
    errors: list[str] = []
    lock = threading.Lock()
    t_start = time.time()

    def chat_user(i: int, n: int, think: float):
        history: list[dict] = []
        for k in range(n):
            msg = f"user {i} message {k}"
            t0 = time.monotonic()
            first = None
            reply = ""
            try:
                for ev in studio.chat(msg, history):
                    if isinstance(ev, Token):
                        if first is None:
                            first = time.monotonic() - t0
                        reply += ev.text
            except Exception as exc:
                errors.append(f"chat: {exc}")
                continue
            with lock:
                ttft.append(first if first is not None else float("nan"))
                if first is not None:
                    sent[msg] = first
                lease = getattr(mine, "lease", None)
                if first is not None and lease is not None and lease.kind == "chat":
                    firsts.append((lease, lease.requested_at + first, first))
            history += [{"role": "user", "content": msg}, {"role": "assistant", "content": reply}]
            time.sleep(think)

    def image_user(n: int, gap: float):
        nonlocal preemptions
        for k in range(n):
            params = RenderParams("bench", steps=RENDER_STEPS, width=draw, height=draw, seed=k)
            try:
                _, info = studio.render(params, on_progress=lambda text, frac: pace(text))
            except Exception as exc:
                errors.append(f"render: {exc}")
                continue
            with lock:
                render_wait.append(info["gpu_started_at"] - info["requested_at"])
                render_s.append(info["render_s"])
                render_total.append(info["gpu_finished_at"] - info["gpu_started_at"])
                render_e2e.append(info["gpu_finished_at"] - info["requested_at"])
                paused.append(info["paused_s"])
                preemptions += info["preemptions"]
            if scenario == "after_render":
                # The user reads the image and chats at once: how soon the chat model answers again.
                t0 = time.monotonic()
                first = None
                for ev in studio.chat(f"about image {k}", []):
                    if isinstance(ev, Token) and first is None:
                        first = time.monotonic() - t0
                with lock:
                    after_ttft.append(first if first is not None else float("nan"))
            time.sleep(gap)

    def pace(text: str):
        if text.startswith("Step"):
            time.sleep(contention.step_s())

    # Ollama starts with the chat model loaded, as it would be after a first message; except for the renders
    # alone that each load's slowdown is measured against (nothing to evict, no reload after them).
    if scenario in BASELINE.values():
        studio.cfg = dataclasses.replace(cfg, warmup=False)
        studio.ollama.cfg = studio.cfg
    else:
        studio.ollama.warm(MODEL)
    users: list[threading.Thread] = []
    chatters = ("chat_only", "mixed", "mixed_nofit", "nofit_preempt", "nofit_always", *SEED_CARD_SCENARIOS)
    if scenario in chatters and scenario != "seed_card_render":
        users += [threading.Thread(target=chat_user, args=(i, chats, 1.0 + 0.3 * i)) for i in range(3)]
    if scenario not in ("chat_only", "seed_card_chat"):
        users.append(threading.Thread(target=image_user, args=(renders, 1.5)))
    for t in users:
        t.start()
    for t in users:
        t.join(300)
    # Let a final warm-up finish so its swap is counted.
    deadline = time.monotonic() + 15
    while not studio.arbiter.is_idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.time() - t_start
    stats = studio.arbiter.status()["stats"]
    loads = sum(1 for e in standin.events_for(MODEL) if e.kind == "loaded")
    unloads = sum(1 for e in standin.events_for(MODEL) if e.kind == "unloaded")
    # What Ollama reported for the chat model at its num_ctx (the engine keeps it from /api/ps readings).
    ollama_gb = (studio.ollama.measured(MODEL) or 0) / GiB
    less_queue = _less_queue(sent, standin.requests)
    standin.stop()
    gpu_wait = [
        ls.ready_at - ls.requested_at
        for ls in leases
        if ls.kind == "chat" and ls.ready_at is not None and not ls.label.startswith("warm-up")
    ]
    samples, by_position = _positions(firsts, t_start)
    device_oom = simcard.read(str(card))["oom"]  # refusals the card itself counted, not Clair's ledger
    return {
        "chat_gpu_wait_p95_s": _r(percentile(gpu_wait, 95)),
        "chat_gpu_wait_max_s": _r(max(gpu_wait) if gpu_wait else None),
        "chat_ttft_p50_s": _r(percentile(ttft, 50)),
        "chat_ttft_p95_s": _r(percentile(ttft, 95)),
        "chat_ttft_max_s": _r(max(ttft) if ttft else None),
        "chat_ttft_all_s": [_r(x) for x in sorted(ttft)],
        # The first-token time less the time the chat waited in Ollama's own queue for a free slot (other chats'
        # replies; the stand-in's record): what the hand-over (and the model's load) cost the chat.
        "chat_ttft_less_queue_p95_s": _r(percentile(less_queue, 95)),
        "chat_ttft_less_queue_max_s": _r(max(less_queue) if less_queue else None),
        # p95 and count of the first-token time by place in Ollama's queue (1 = no other chat streaming)
        "chat_ttft_by_position": {
            str(k): {"p95_s": _r(percentile(v, 95)), "max_s": _r(max(v)), "n": len(v)} for k, v in sorted(by_position.items())
        },
        "ollama_num_parallel": parallel,
        "chat_samples": sorted(samples),  # (sent at, first token after, GPU wait, position), s since the start
        "render_wait_p95_s": _r(percentile(render_wait, 95)),
        "render_s_p50": _r(percentile(render_s, 50)),
        "render_total_s_p50": _r(percentile(render_total, 50)),
        "render_paused_s_p50": _r(percentile(paused, 50)),
        "render_e2e_s_p50": _r(percentile(render_e2e, 50)),
        "render_e2e_s_max": _r(max(render_e2e) if render_e2e else None),
        "render_e2e_s_mean": _r(statistics.mean(render_e2e) if render_e2e else None),
        "render_e2e_s_all": [_r(x) for x in render_e2e],
        "after_render_ttft_p50_s": _r(percentile(after_ttft, 50)),
        "after_render_ttft_max_s": _r(max(after_ttft) if after_ttft else None),
        "preemptions": preemptions,
        "chats": len(ttft),
        "renders": len(render_wait),
        "swaps": stats["swaps"],
        "ollama_loads": loads,
        "ollama_unloads": unloads,
        "ollama_loaded_gb": round(ollama_gb, 2),
        "vae": cfg.vae,
        "declared_render_gb": round(studio.image.footprint(declared, declared)[0] / GiB, 2),
        "warmups": studio.ollama.warmups,
        # A partial CPU offload (size_vram < size in /api/ps) means Ollama did not get the memory the ledger
        # planned for it: a budget breach seen from Ollama's side.
        "budget_exceeded": stats["budget_exceeded"] + stats.get("partial_offload", 0),
        "partial_offload": stats.get("partial_offload", 0),
        "device_oom": device_oom,
        "oom_recoveries": studio.image.oom_recoveries,
        "max_used_gb": round(stats["max_used_bytes"] / GiB, 2),
        "errors": errors,
        "elapsed_s": round(elapsed, 1),
        "declared_render_size": declared if "chat" not in scenario else None,
        "timeline": [(k, round(s - t_start, 3), round(e - t_start, 3)) for k, s, e in contention.timeline],
    }


def _less_queue(sent: dict[str, float], requests: list) -> list[float]:
    """Each chat's first-token time less its wait for a free slot in Ollama (`RequestRecord.slot_wait_s`)."""
    waited = {}
    for record in requests:
        messages = record.messages if record.path == "/api/chat" else None
        if messages and isinstance(messages[-1], dict):
            waited[str(messages[-1].get("content"))] = record.slot_wait_s
    return [first - waited[msg] for msg, first in sent.items() if msg in waited]


def _positions(firsts: list[tuple], t_start: float) -> tuple[list[tuple], dict[int, list[float]]]:
    """Each chat's place in Ollama's queue: 1 + the chats that held a lease when its own was ready (or got one
    with it, within 50 ms: one pause's grants) and had their first token before it. With one request at a
    time in Ollama (OLLAMA_NUM_PARALLEL=1) those are the replies it waited for. Returns the samples (sent at,
    first-token time, GPU wait, place; seconds since the start) and the first-token times by place."""
    samples, by_position = [], {}
    for lease, first_at, first in firsts:
        ready = lease.ready_at or lease.requested_at
        ahead = [
            1
            for other, other_first, _ in firsts
            if other is not lease
            and (other.ready_at or other.requested_at) <= ready + 0.05
            and (other.released_at or float("inf")) > ready
            and other_first < first_at
        ]
        place = 1 + len(ahead)
        by_position.setdefault(place, []).append(first)
        samples.append((_r(lease.requested_at - t_start), _r(first), _r(ready - lease.requested_at), place))
    return sorted(samples), by_position


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def draw_timeline(results: dict, path: Path) -> bool:
    """Draw the mixed scenarios' GPU leases; False (and a note) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed (pip install -r requirements-dev.txt), so {path} was not drawn")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, s) for p in results for s in ("mixed", "mixed_nofit", "nofit_preempt") if s in results[p]["scenarios"]]
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 1.6 * len(panels)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    colors = {"chat": "#2b59c3", "render": "#e07b00"}
    for ax, (policy, scenario) in zip(axes, panels, strict=True):
        for kind, start, end in results[policy]["scenarios"][scenario]["timeline"]:
            y = 1 if kind == "render" else 0
            ax.barh(y, end - start, left=start, height=0.6, color=colors[kind], alpha=0.5, edgecolor="none")
        ax.set_yticks([0, 1], ["chat", "render"])
        r = results[policy]["scenarios"][scenario]
        ax.set_title(
            f"{policy} / {scenario}: chat TTFT p95 {r['chat_ttft_p95_s']} s, swaps {r['swaps']}",
            fontsize=9,
            loc="left",
        )
    axes[-1].set_xlabel("seconds since the scenario started (bars: GPU leases held)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests per user (CPU, ~3 minutes)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "run.json")
    ap.add_argument("--rounds", type=int, default=0, help="messages per chat user and renders (overrides --quick)")
    ap.add_argument("--png", type=Path, default=None, help="timeline image (default: next to --out)")
    ap.add_argument("--policies", default="budget,exclusive")
    ap.add_argument(
        "--ollama-parallel", type=int, default=1, help="OLLAMA_NUM_PARALLEL of the Ollama stand-in (Ollama's default: 1)"
    )
    ap.add_argument("--preempt", default="", help="CLAIR_PREEMPT for every scenario (default: each scenario's own)")
    ap.add_argument("--max-preemptions", type=int, default=None, help="CLAIR_MAX_PREEMPTIONS (default: Clair's)")
    ap.add_argument(
        "--pause-share", type=float, default=None, help="the arbiter's max_pause_share under always (default: Clair's)"
    )
    ap.add_argument(
        "--scenarios", default="chat_only,render_only,mixed,mixed_nofit,nofit_preempt,seed_card_chat,seed_card,seed_card_stock"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.png or args.out.with_suffix(".png")
    overhead, overhead_rounds = arbiter_overhead_us(20000)
    print(
        f"arbiter overhead (uncontended acquire + release, best median of 5 rounds): {overhead:.1f} us {overhead_rounds}"
    )
    chats, renders = (4, 3) if args.quick else (8, 6)
    if args.rounds:
        chats = renders = args.rounds
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies.split(","):
            results[policy] = {"scenarios": {}}
            for scenario in args.scenarios.split(","):
                r = run_scenario(
                    policy,
                    scenario,
                    chats,
                    renders,
                    Path(tmp),
                    args.ollama_parallel,
                    args.preempt,
                    args.max_preemptions,
                    args.pause_share,
                )
                results[policy]["scenarios"][scenario] = r
                print(
                    f"{policy:9} {scenario:15} ttft p50 {r['chat_ttft_p50_s']} p95 {r['chat_ttft_p95_s']} s "
                    f"(less Ollama's queue p95 {r['chat_ttft_less_queue_p95_s']} max {r['chat_ttft_less_queue_max_s']}) | "
                    f"render wait p95 {r['render_wait_p95_s']} s | swaps {r['swaps']} | loads {r['ollama_loads']} | "
                    f"over budget {r['budget_exceeded']} | device OOMs {r['device_oom']} | preemptions {r['preemptions']} | "
                    f"render e2e p50 {r['render_e2e_s_p50']} s | after-render ttft p50 {r['after_render_ttft_p50_s']} s | "
                    f"{r['elapsed_s']} s"
                    + (f" | ttft by position {r['chat_ttft_by_position']}" if r["chat_ttft_by_position"] else "")
                    + (f" | ERRORS {r['errors']}" if r["errors"] else "")
                )
    policies = {}
    for policy, data in results.items():
        head = data["scenarios"].get("mixed") or next(iter(data["scenarios"].values()))
        policies[policy] = {
            **{k: head[k] for k in ("chat_ttft_p50_s", "chat_ttft_p95_s", "render_wait_p95_s", "swaps")},
            "budget_exceeded": sum(s["budget_exceeded"] for s in data["scenarios"].values()),
            "scenarios": data["scenarios"],
        }
    goals = {"arbiter_overhead_under_50us": overhead < 50}
    goals["budget_exceeded_zero"] = all(p["budget_exceeded"] == 0 for p in policies.values())
    goals["device_oom_zero"] = all(s["device_oom"] == 0 for p in policies.values() for s in p["scenarios"].values())
    if {"budget", "exclusive"} <= policies.keys() and "mixed" in args.scenarios.split(","):
        b, e = policies["budget"]["chat_ttft_p95_s"], policies["exclusive"]["chat_ttft_p95_s"]
        goals["budget_beats_exclusive_chat_p95_when_both_fit"] = b is not None and e is not None and b < e
    # Each render's slowdown against renders alone under the same load's sizes and pacing (request to finish).
    for data in policies.values():
        runs = data["scenarios"]
        for name, r in runs.items():
            base = runs.get(BASELINE.get(name, ""), {}).get("render_e2e_s_p50")
            r["render_slowdown"] = _r(r["render_e2e_s_p50"] / base - 1) if base and r["render_e2e_s_p50"] else None
            # The mean as well: with few renders, one that took in every pause hides behind the median.
            mean = r["render_e2e_s_mean"]
            r["render_slowdown_mean"] = _r(mean / runs[BASELINE[name]]["render_e2e_s_mean"] - 1) if base and mean else None
    scenarios = args.scenarios.split(",")
    # No-fit load: a chat waits at most one render step plus the model's unload (the render's weights are a
    # pointer swap) and load, plus 0.5 s; the render takes no longer than its pauses.
    bound = STEP_S * RENDER_SLOWDOWN + 2.0 + 1.0 + 0.5
    for name in ("nofit_preempt", "nofit_always"):
        if name not in scenarios:
            continue
        for policy, data in policies.items():
            r = data["scenarios"][name]
            p95 = r["chat_ttft_p95_s"]
            goals[f"{policy}_{name}_chat_p95_within_step_plus_swap"] = p95 is not None and p95 <= bound
            # The same bound on the part the hand-over decides: Ollama's own queue behind other chats' replies
            # (one request at a time with OLLAMA_NUM_PARALLEL=1) is there with no render at all.
            mine = r["chat_ttft_less_queue_p95_s"]
            goals[f"{policy}_{name}_chat_p95_less_ollama_queue_within_step_plus_swap"] = mine is not None and mine <= bound
            extra = (r["render_total_s_p50"] or 0) - (r["render_s_p50"] or 0)
            goals[f"{policy}_{name}_render_extra_within_pauses"] = extra <= (r["render_paused_s_p50"] or 0) + 0.25
    seed = policies.get("budget", {}).get("scenarios", {})
    if "seed_card" in seed:
        card = seed["seed_card"]
        goals["seed_card_fp16_vae_no_eviction_no_reload"] = card["swaps"] == 0 and card["ollama_loads"] == 1
    for name in ("seed_card", "seed_card_always"):
        r = seed.get(name)
        alone = seed.get("seed_card_chat", {}).get("chat_ttft_p95_s")
        if r is None or not alone or r["chat_ttft_p95_s"] is None:
            continue
        goals[f"{name}_chat_p95_within_1_5x_of_chat_alone"] = r["chat_ttft_p95_s"] <= 1.5 * alone
        if r.get("render_slowdown") is not None:
            goals[f"{name}_render_slowdown_under_25pct"] = r["render_slowdown"] < 0.25
    out = {
        "machine": "CPU only (tiny models, Ollama stand-in); see the module docstring for what is simulated",
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "headline_scenario": "mixed",
        "arbiter_overhead_us": round(overhead, 2),
        "arbiter_overhead_rounds_us": overhead_rounds,
        "policies": policies,
        "goals": goals,
        "timeline_png": None,
    }
    named = args.scenarios.split(",")  # names, not substrings: "mixed" is in "mixed_nofit"
    if "mixed" in named and "mixed_nofit" in named and draw_timeline(results, png):
        out["timeline_png"] = str(png)
    args.out.write_text(json.dumps(out, indent=2))
    for name, ok in goals.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    for policy, data in policies.items():
        for name, r in data["scenarios"].items():
            if r.get("render_slowdown") is not None:
                print(
                    f"{policy:9} {name:17} render e2e p50 {r['render_e2e_s_p50']} s, slowdown {r['render_slowdown']:+.0%} "
                    f"(mean {r['render_slowdown_mean']:+.0%}; each {r['render_e2e_s_all']})"
                )
    print(f"wrote {args.out}" + (f" and {png}" if out["timeline_png"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
