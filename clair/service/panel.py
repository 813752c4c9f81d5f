"""The live GPU panel (issue 9): what the traffic cop is doing, for the Status tab and the line atop both tabs.

`panel_data(studio)` gathers everything from the studio and its arbiter into plain values (no Gradio, no
HTML): the VRAM bar's segments, who holds the GPU and for what, the queue with estimated starts (from the
running work's measured pace, see `Arbiter._remaining_locked`), the last hand-overs with their evict,
restore and load seconds, the holds of the last minutes for a timeline, recent recoveries and errors, and
the models that may be unloaded by hand. `panel_html()` and `compact_html()` draw it; every text that
came from outside (model names are the client's) is escaped. Other users' jobs show without their name or
address (`panel_data(viewer=...)`): only the viewer's own carry them.
"""

from __future__ import annotations

import re
import time
from html import escape

from clair.device import gpu

GiB = 1024**3
TIMELINE_S = 300.0  # the timeline shows the last five minutes
NAMES = {"ollama": "Ollama", "image": "image model", "local-chat": "chat model"}
COLORS = {"ollama": "#4f7cff", "image": "#e0882b", "local-chat": "#2fa37a", "other": "#9aa0a6", "chat": "#4f7cff", "render": "#e0882b"}
DOING = {"chat": "chatting", "render": "rendering"}


def _name(tenant: str) -> str:
    return NAMES.get(tenant, tenant)


def _shown(label: str) -> str:
    """A job's label without whom it is for: `api:<model> (<user>@<address>)` becomes `api:<model>`."""
    return re.sub(r"\s*\([^()]*\)\s*$", "", str(label)) or "a job"


def _private(entry: dict, viewer: str | None) -> dict:
    """`entry` (a holder or a waiting job) as `viewer` may see it: whole when it is theirs, else without
    the user's name or address (the kind and the model stay: they explain the wait)."""
    if viewer is not None and entry.get("owner") == viewer:
        return entry
    return {**entry, "label": _shown(entry["label"]), "owner": None}


def private_status(st: dict, viewer: str | None) -> dict:
    """`Studio.status()` as `viewer` may see it (the Status endpoint): the same rule as the panel."""
    out = dict(st)
    out["holders"] = [_private(h, viewer) for h in st.get("holders") or []]
    out["waiting"] = [_private(w, viewer) for w in st.get("waiting") or []]
    out["holder"] = out["holders"][0] if out["holders"] else None
    if isinstance(st.get("last_handover"), dict) and "to" in st["last_handover"]:
        out["last_handover"] = {**st["last_handover"], "to": _shown(st["last_handover"]["to"])}
    return out


def panel_data(studio, now: float | None = None, viewer: str | None = None) -> dict:
    """The panel's state, as plain values (times are seconds; sizes are bytes), as `viewer` (the logged-in
    user; None: nobody's in particular) may see it: other people's jobs carry no name or address."""
    now = time.time() if now is None else now
    st = studio.status()
    hist = studio.arbiter.history()
    vram = _vram(st, studio.arbiter.budget)
    holders, queue = _holders(st, viewer), _queue(st, viewer)
    events = [dict(e) for e in reversed(list(studio.recent))]
    busy = {h["tenant"] for h in holders}
    ejectable = [
        {
            "tenant": t,
            "name": label,
            "resident": any(s["tenant"] == t for s in vram["segments"]),
            "busy": t in busy,
        }
        for t, label in studio.ejectable().items()
    ]
    return {
        "at": now,
        "cuda": bool(st.get("cuda")),
        "vram": vram,
        "holders": holders,
        "queue": queue,
        "handovers": _handovers(studio, hist)[:8],
        "timeline": _timeline_data(hist, now),
        "events": events[:8],
        "ejectable": ejectable,
        "image_keep_alive_s": st.get("image_keep_alive_s"),
        "stats": st["stats"],
        "policy": st["policy"],
        "worker_restarts": st.get("worker_restarts") or {},
        "cards": [_card_vram(c) for c in st.get("cards") or []],  # several cards: one bar each
    }


def _vram(st: dict, budget, reading: dict | None = None, name: str | None = None) -> dict:
    """The memory bar: the ledger's residents; on a card, what it says is used beyond Clair's and Ollama's share.
    `reading` and `name`: one card of several (Studio.cards_status); default the first card, read now."""
    segments = [
        {"tenant": r["tenant"], "name": _name(r["tenant"]), "bytes": r["bytes"], "busy": r["busy"], "evicting": r["evicting"]}
        for r in st["resident"]
    ]
    ledger = sum(s["bytes"] for s in segments)
    device = None
    if reading is None and name is None:
        now = gpu.reading() if st.get("cuda") else None  # CUDA or the simulated card; one consistent reading
        if now is not None:
            reading, name = {"total": now.total, "free": now.free, "reserved": now.reserved}, gpu.dev().name
    if reading is not None:
        ours = reading["reserved"] + sum(s["bytes"] for s in segments if s["tenant"] == "ollama")
        from clair.service.studio import CONTEXT_ALLOWANCE  # our own CUDA context is not another program's memory

        others = max(0, reading["total"] - reading["free"] - ours - CONTEXT_ALLOWANCE)
        device = {"total": reading["total"], "free": reading["free"], "others": others, "name": name}
    scale = (device or {}).get("total") or budget or ledger or 1
    others = device["others"] if device else 0
    free = device["free"] if device else (max(0, budget - ledger) if budget else None)

    return {
        "budget": budget,
        "scale": scale,
        "segments": segments,
        "ledger": ledger,
        "others": others,
        "free": free,
        "device": device,
    }


def _card_vram(card: dict) -> dict:
    """One card's bar (several cards): its own arbiter's ledger and budget, and its own reading."""
    st = {"resident": card["resident"]}
    v = _vram(st, card["budget"], reading=card["reading"], name=card["name"])
    return {"index": card["index"], "name": card["name"], "vram": v}


def _holders(st: dict, viewer: str | None) -> list[dict]:
    """The jobs holding the GPU, as `viewer` may see them."""
    holders = [
        {
            "kind": h["kind"],
            "label": h["label"],
            "owner": h.get("owner"),
            "tenant": h["tenant"],
            "phase": h["phase"],
            "held_s": h["held_s"],
            "done": h.get("done", 0),
            "total": h.get("total", 0),
            "remaining_s": h.get("remaining_s"),
        }
        for h in st["holders"]
    ]
    return [_private(h, viewer) for h in holders]


def _queue(st: dict, viewer: str | None) -> list[dict]:
    """The jobs waiting for the GPU, in order, as `viewer` may see them."""
    queue = [
        {
            "kind": w["kind"],
            "label": w["label"],
            "owner": w.get("owner"),
            "position": w["position"],
            "eta_s": w["eta_s"],
            "waited_s": w["waited_s"],
            "reason": w["reason"],
        }
        for w in st["waiting"]
    ]
    return [_private(w, viewer) for w in queue]


def _handovers(studio, hist: dict) -> list[dict]:
    """Hand-overs: evictions for a request, idle evictions, loads and restores, newest first."""
    swaps = []
    for h in hist["handovers"]:
        for tenant, s in (h.get("evict_each_s") or {t: None for t in h["evicted"]}).items():
            swaps.append({"at": h["at"], "what": "evict", "tenant": tenant, "for": _shown(h["to"]), "s": s, "wait_s": h["wait_s"]})
    for e in hist["idle_evictions"]:
        swaps.append({"at": e["at"], "what": "evict", "tenant": e["tenant"], "for": e["why"] or "idle", "s": e["evict_s"]})
    for e in list(studio.swaps):
        swaps.append({"at": e["at"], "what": e["event"], "tenant": e.get("tenant") or "image", "for": e.get("model", ""), "s": e["s"]})
    swaps.sort(key=lambda x: x["at"], reverse=True)
    return swaps


def _timeline_data(hist: dict, now: float) -> dict:
    """The holds of the last TIMELINE_S at most, as seconds before `now`."""
    # The timeline spans the last TIMELINE_S at most, and shrinks to what happened (at least a minute).
    starts = [h["start"] for h in hist["holds"] if h["start"] is not None and h["start"] > now - TIMELINE_S]
    window = min(TIMELINE_S, max(60.0, 1.1 * (now - min(starts)))) if starts else 60.0
    holds = []
    for h in hist["holds"]:
        end = h["end"] if h["end"] is not None else now
        if h["start"] is None or end < now - window:
            continue
        holds.append(
            {"kind": h["kind"], "label": _shown(h["label"]), "start_s": max(-window, h["start"] - now), "end_s": end - now,
             "running": h["end"] is None}
        )
    return {"window_s": window, "holds": holds}


# ---------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------


def _gb(n: int | float | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GB"


def _s(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{x:.2f} s" if x < 10 else f"{x:.0f} s"


def _who(x: dict) -> str:
    return f" for {escape(x['owner'])}" if x.get("owner") else ""


def _holder_text(h: dict) -> str:
    what = DOING.get(h["kind"], h["kind"])
    bits = [f"{_s(h['held_s'])}"]
    if h["kind"] == "render" and h["total"]:
        bits.append(f"step {h['done']}/{h['total']}")
    elif h["kind"] == "chat" and h["done"]:
        bits.append(f"{h['done']} tokens")
    if h["phase"] != "running":
        bits.append(h["phase"])
    elif h.get("remaining_s") is not None:
        bits.append(f"about {h['remaining_s']:.0f} s left")
    return f"{what} ({escape(h['label'])}{_who(h)}; {', '.join(bits)})"


def _bar(d: dict, height: int = 18) -> str:
    v = d["vram"]
    font = 11 if height >= 14 else 0  # a thin bar has no room for words: they are in its tooltips
    scale = max(1, v["scale"])
    parts = []
    for s in v["segments"]:
        pct = 100.0 * s["bytes"] / scale
        state = " (busy)" if s["busy"] else (" (leaving)" if s["evicting"] else "")
        title = escape(f"{s['name']}: {_gb(s['bytes'])}{state}")
        parts.append(
            f'<div title="{title}" style="width:{pct:.2f}%;background:{COLORS.get(s["tenant"], "#b07cd8")};'
            f'{"opacity:.5;" if s["evicting"] else ""}overflow:hidden;white-space:nowrap;font-size:{font}px;color:#fff;'
            f'padding-left:3px">{escape(s["name"])} {_gb(s["bytes"])}</div>'
        )
    if v["others"]:
        pct = 100.0 * v["others"] / scale
        parts.append(
            f'<div title="other processes: {_gb(v["others"])}" style="width:{pct:.2f}%;background:{COLORS["other"]};'
            f'font-size:{font}px;color:#fff;overflow:hidden;white-space:nowrap;padding-left:3px">others {_gb(v["others"])}</div>'
        )
    return (
        f'<div class="clair-vram" style="display:flex;height:{height}px;border:1px solid #8884;border-radius:4px;'
        f'overflow:hidden;background:#8882">{"".join(parts)}</div>'
    )


def _vram_caption(d: dict) -> str:
    v = d["vram"]
    if v["device"]:
        return (
            f"GPU {_gb(v['device']['total'])}{_card_name(v['device'])}: free {_gb(v['free'])}, other processes {_gb(v['others'])}; "
            f"Clair's budget {_gb(v['budget'])}, ledger {_gb(v['ledger'])}"
        )
    if v["budget"]:
        return f"Budget {_gb(v['budget'])}: ledger {_gb(v['ledger'])}, free {_gb(v['free'])} (no GPU here: expected sizes, not measured)"
    return f"Ledger {_gb(v['ledger'])}; no known budget: one model on the GPU at a time"


def compact_html(d: dict) -> str:
    """One line for the top of both tabs: the GPU's holder, the queue, and a thin VRAM bar."""
    if d["holders"]:
        gpu_text = "<b>GPU: " + ", ".join(_holder_text(h) for h in d["holders"]) + "</b>"
    else:
        gpu_text = "<b>GPU free</b>"
    if d["queue"]:
        kinds = ", ".join(
            f"{w['kind']} in about {w['eta_s']:.0f} s" + (" (paused)" if "paused" in w["label"] else "")
            for w in d["queue"][:3]
        )
        gpu_text += f" · {len(d['queue'])} waiting: {kinds}"
    loaded = ", ".join(f"{escape(s['name'])} ≈{_gb(s['bytes'])}" for s in d["vram"]["segments"]) or "nothing"
    where = "" if d["cuda"] else " (no GPU here: expected sizes, not measured)"
    budget = d["vram"]["budget"]
    vram = f"VRAM budget {_gb(budget)}" if budget else "VRAM budget unknown: one model at a time"
    return (
        f'<div class="clair-compact">{gpu_text} · loaded: {loaded}{where} · {vram}'
        f'<div style="margin-top:3px">{_bar(d, 8)}</div></div>'
    )


def _timeline(d: dict, width: int = 600, height: int = 46) -> str:
    win = d["timeline"]["window_s"]
    rows = {"render": 6, "chat": 26}
    rects = []
    for h in d["timeline"]["holds"]:
        x0 = width * (1 + h["start_s"] / win)
        x1 = width * (1 + h["end_s"] / win)
        w = max(1.5, x1 - x0)
        title = escape(f"{h['label']}: {h['end_s'] - h['start_s']:.1f} s" + (" (running)" if h["running"] else ""))
        rects.append(
            f'<rect x="{x0:.1f}" y="{rows.get(h["kind"], 26)}" width="{w:.1f}" height="14" rx="2" '
            f'fill="{COLORS.get(h["kind"], "#888")}"><title>{title}</title></rect>'
        )
    # The row labels sit beside the drawing, not in it: the SVG stretches to the page's width
    # (preserveAspectRatio="none"), which squashed text drawn inside it, and bars from the window's start hid it.
    return (
        '<div class="clair-timeline-row" style="display:flex;gap:.4em;align-items:stretch">'
        f'<div class="clair-timeline-labels" style="flex:0 0 3.6em;height:{height}px;display:flex;flex-direction:column;'
        'justify-content:space-around;font-size:11px;opacity:.7"><span>render</span><span>chat</span></div>'
        f'<svg class="clair-timeline" viewBox="0 0 {width} {height}" width="100%" height="{height}" '
        f'preserveAspectRatio="none" role="img" aria-label="GPU holders over the last {win:.0f} s" style="flex:1 1 auto;min-width:0">'
        f'{"".join(rects)}</svg></div>'
        f'<div style="display:flex;justify-content:space-between;font-size:11px;opacity:.6;margin-left:4em">'
        f"<span>{_ago(d['at'] - win, d['at'])}</span><span>now</span></div>"
    )


def _table(head: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p style="opacity:.7">{empty}</p>'
    th = "".join(f"<th style='text-align:left;padding-right:12px'>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td style='padding-right:12px'>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table style='font-size:13px'><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _ago(at: float, now: float) -> str:
    s = max(0.0, now - at)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago"


def panel_html(d: dict) -> str:
    """The full panel for the Status tab."""
    now = d["at"]
    holder = (
        "<br>".join(_holder_text(h) for h in d["holders"]) if d["holders"] else "Nobody: the GPU is free."
    )
    queue = _table(
        ["#", "kind", "what", "who", "starts in about", "waiting", "why"],
        [
            [str(w["position"]), w["kind"], escape(w["label"]), escape(w["owner"] or "–"), _s(w["eta_s"]),
             _s(w["waited_s"]), escape(w["reason"])]
            for w in d["queue"]
        ],
        "Nothing waits.",
    )
    swaps = _table(
        ["when", "what", "model", "for", "seconds"],
        [
            [_ago(x["at"], now), x["what"], escape(_name(x["tenant"])), escape(str(x["for"])), _s(x["s"])]
            for x in d["handovers"]
        ],
        "No hand-over yet.",
    )
    events = _table(
        ["when", "what"],
        [
            [_ago(e["at"], now), escape(f"{e.get('what') or e['event']}: {e.get('kind', '')} {e.get('text', '')}".strip())]
            for e in d["events"]
        ],
        "No recoveries, errors or unloads.",
    )
    keep = d.get("image_keep_alive_s")
    keep_text = (
        "kept on the GPU" if keep is None or keep < 0 else f"unloaded after {keep:g} s without a render"
    )
    stats = d["stats"]
    return (
        '<div class="clair-panel">'
        f"<h3>VRAM</h3>{_bars(d, keep_text)}"
        f"<h3>GPU holder</h3><p>{holder}</p>"
        f"<h3>Queue</h3>{queue}"
        f"<h3>Who held the GPU</h3>{_timeline(d)}"
        f"<h3>Last hand-overs</h3>{swaps}"
        f"<h3>Recoveries, errors and unloads</h3>{events}"
        f"<p style='font-size:12px;opacity:.7'>Policy {escape(d['policy'])} · grants {stats.get('grants', 0)} · "
        f"swaps {stats.get('swaps', 0)} · preemptions {stats.get('preemptions', 0)} · "
        f"out-of-memory recoveries {stats.get('oom_recoveries', 0)} · budget breaches {stats.get('budget_exceeded', 0)}"
        f"{_restarts_text(d)}</p>"
        "</div>"
    )


def _card_name(device: dict) -> str:
    """" (simulated 20 GB card)" when the device is the simulated card (CLAIR_SIM_GPU_GB): a newcomer must
    not take the demo's figures for a real GPU's."""
    name = str(device.get("name") or "")
    return f" ({escape(name)})" if name.startswith("simulated") else ""


def _restarts_text(d: dict) -> str:
    """" · worker restarts: card 0: 1" with workers (CLAIR_WORKERS=on), else nothing."""
    restarts = d.get("worker_restarts") or {}
    if not restarts:
        return ""
    return " · worker restarts: " + ", ".join(f"card {escape(str(c))}: {int(n)}" for c, n in sorted(restarts.items()))


def _bars(d: dict, keep_text: str) -> str:
    """The VRAM bar with its caption: one per card when there are several."""
    if not d.get("cards"):
        return f"{_bar(d, 22)}<p style='font-size:13px'>{escape(_vram_caption(d))}. Image model: {keep_text}.</p>"
    return "".join(
        f"<p style='font-size:13px;margin-bottom:2px'><b>card {c['index']}</b></p>{_bar(c, 22)}"
        f"<p style='font-size:13px'>{escape(_vram_caption(c))}.</p>"
        for c in d["cards"]
    ) + f"<p style='font-size:13px'>Image model: {keep_text}.</p>"
