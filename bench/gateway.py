"""What the gate costs: time to first token and to the whole reply, straight to Ollama vs through Clair.

    python bench/gateway.py --n 100

The official `ollama` client sends the same small chat N times to the Ollama stand-in directly and
then through Clair's Ollama-compatible port (clair/adapters/gateway.py: a lease from the arbiter, the ledger
synced from /api/ps before and after, the body forwarded with httpx and relayed chunk by chunk), and
N times through /v1/chat/completions with the official `openai` client (Studio.chat). The stand-in
answers at once (no load, no token delay, TCP_NODELAY as Go sets it), so the figures are Clair's own
overhead on an idle GPU.
CPU only; it prints medians and 95th percentiles in milliseconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "llama3.1:8b"


def measure(n: int, first_and_total) -> tuple[list[float], list[float]]:
    firsts, totals = [], []
    for i in range(n):
        t0 = time.perf_counter()
        first, end = first_and_total(i)
        firsts.append((first - t0) * 1000)
        totals.append((end - t0) * 1000)
    return firsts, totals


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, int(len(values) * 0.95) - 1)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100)
    args = p.parse_args()

    import ollama
    import openai

    from clair.base.config import Config
    from clair.service.studio import Studio
    from tests.gateway_support import Served, gateway_app, v1_app
    from tests.ollama_standin import OllamaStandin, _Handler

    # The stand-in writes a response's headers and body in two sends; with Nagle's algorithm on, the
    # client's delayed ACK holds the second one ~40 ms on Linux. Real Ollama (Go's net/http) sets
    # TCP_NODELAY, so the stand-in does too here, or every /api/ps reading would cost 40 ms.
    _Handler.disable_nagle_algorithm = True

    with OllamaStandin({MODEL: 4.9}) as standin, tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(
            Config(),
            chat_backend="ollama",
            ollama_host=standin.host,
            image_model="tiny",
            output_dir=str(Path(tmp) / "outputs"),
            users_file=str(Path(tmp) / "users.json"),
            warmup=False,
        )
        studio = Studio(cfg)
        gw, v1 = Served(gateway_app(studio)), Served(v1_app(studio))
        try:
            rows = []
            for name, url in (("ollama direct", standin.url), ("ollama via Clair", gw.url)):
                client = ollama.Client(host=url)

                def one(i, client=client):
                    stream = client.chat(model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], stream=True)
                    first = None
                    for _ in stream:
                        first = first or time.perf_counter()
                    return first, time.perf_counter()

                one(0)  # load the model, open the connection
                rows.append((name, *measure(args.n, one)))
            oc = openai.OpenAI(base_url=v1.url + "/v1", api_key="x", max_retries=0)

            def one_v1(i):
                stream = oc.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], stream=True
                )
                first = None
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                return first, time.perf_counter()

            one_v1(0)
            rows.append(("/v1 via Clair", *measure(args.n, one_v1)))
        finally:
            gw.stop()
            v1.stop()
    print(f"{'path':<18} {'first token p50':>16} {'p95':>8} {'whole reply p50':>16} {'p95':>8}   (ms, n={args.n})")
    for name, firsts, totals in rows:
        print(
            f"{name:<18} {statistics.median(firsts):>16.1f} {p95(firsts):>8.1f} "
            f"{statistics.median(totals):>16.1f} {p95(totals):>8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
