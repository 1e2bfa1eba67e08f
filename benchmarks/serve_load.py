"""`diffusekit serve` under load, and how soon the page shows the first image.

    python benchmarks/serve_load.py                        # 50 clients for 60 s, then the page 5 times (~3 min)
    python benchmarks/serve_load.py --smoke                # 4 clients for 8 s, the page once, 4 steps (< 1 min)

It starts `python -m diffusekit serve` (the shipped emoji model unless --model) as a child process on a
free loopback port; nothing but 127.0.0.1 is ever contacted, and every loop is bounded in count and time.

1. load: N clients, each sending POST /v1/images/generations (OpenAI's API, one image, --steps steps)
   over and over for --seconds; a 429 is waited out (Retry-After, at most 1 s) and counted. Reported:
   requests answered with an image / with 429 / otherwise (must be 0), latency percentiles, the server's
   resident memory over time (start, peak, end: "flat" is end within 10% of the first quarter's peak), and
   whether it still answers afterwards.
2. page: headless Chromium (Debian's, via Playwright) opens the page, presses Generate with --steps steps
   and times the first x0 preview and the first image in the gallery; --page-runs times.

The JSON (default benchmarks/results/serve_load.json) records the CPU, the thread count and the arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

PROMPTS = ["red apple", "rocket", "grinning face", "sun", "snowman", "pizza", "red heart", "dog face"]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "diffusekit", "serve", "--host", "127.0.0.1", "--port", str(port), "--queue", str(args.queue),
               "--device", "cpu", *sum((["--model", m] for m in args.model), [])]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.kill()
    raise SystemExit("the server did not come up within 120 s")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1], "mean": statistics.fmean(ordered)}


def load(url: str, server: subprocess.Popen, clients: int, seconds: float, steps: int) -> dict:
    counts = {"image": 0, "429": 0, "other": 0, "error": 0}
    latencies: dict[str, list[float]] = {"image": [], "429": []}
    lock, stop_at = threading.Lock(), time.monotonic() + seconds
    memory: list[tuple[float, float]] = []

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=seconds + 120) as http:
            i = 0
            while time.monotonic() < stop_at and i < 100_000:
                i += 1
                body = {"prompt": PROMPTS[(k + i) % len(PROMPTS)], "n": 1, "steps": steps, "seed": k * 1000 + i}
                start = time.monotonic()
                try:
                    answer = http.post("/v1/images/generations", json=body)
                except httpx.HTTPError:
                    with lock:
                        counts["error"] += 1
                    continue
                took = time.monotonic() - start
                kind = "image" if answer.status_code == 200 and answer.json()["data"][0].get("b64_json") else "429" if answer.status_code == 429 else "other"
                with lock:
                    counts[kind] += 1
                    latencies.setdefault(kind, []).append(took)
                if kind == "429":
                    time.sleep(min(1.0, float(answer.headers.get("Retry-After", 1))))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads) and time.monotonic() < stop_at + 180:
        memory.append((round(time.monotonic() - began, 2), rss_mib(server.pid)))
        time.sleep(0.5)
    alive = httpx.get(f"{url}/api/health", timeout=10).status_code == 200
    quarter = [m for t, m in memory if t <= seconds / 4] or [memory[0][1]]
    return {"clients": clients, "seconds": seconds, "steps": steps, "answered": counts, "images_per_s": counts["image"] / seconds,
            "latency_s": {kind: percentiles(values) for kind, values in latencies.items()},
            "rss_mib": {"start": memory[0][1], "peak": max(m for _, m in memory), "end": memory[-1][1], "hwm": rss_mib(server.pid, "VmHWM"),
                        "first_quarter_peak": max(quarter)},
            "memory_flat": memory[-1][1] <= 1.1 * max(quarter), "server_up_after": alive, "rss_samples": memory[:: max(1, len(memory) // 40)]}


def page(url: str, runs: int, steps: int) -> dict:
    if not Path(CHROMIUM).exists():
        return {"skipped": f"{CHROMIUM} is missing (apt-get install chromium)"}
    from playwright.sync_api import sync_playwright

    times = []
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        browser = playwright.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        tab = browser.new_page()
        tab.goto(url)
        tab.wait_for_selector("#model option", state="attached")
        tab.wait_for_load_state("networkidle")  # the gallery of earlier images has loaded: it is not counted as new
        for run in range(runs):
            tab.fill("#prompt", PROMPTS[run % len(PROMPTS)])
            tab.fill("#steps", str(steps))
            before = tab.locator("#gallery-items .item img").count()
            tab.evaluate("window.__t0 = performance.now(); window.__preview = null;"
                         "new MutationObserver(() => { if (window.__preview === null) window.__preview = performance.now(); })"
                         ".observe(document.getElementById('preview'), {attributes: true, attributeFilter: ['src']});")
            tab.click("#generate")
            tab.wait_for_function(f"document.querySelectorAll('#gallery-items .item img').length > {before}", timeout=300_000)
            first, preview = tab.evaluate("[performance.now() - window.__t0, window.__preview && window.__preview - window.__t0]")
            times.append({"first_image_s": first / 1000, "first_preview_s": preview / 1000 if preview else None})
        browser.close()
    warm = [t["first_image_s"] for t in times[1:]] or [times[0]["first_image_s"]]
    return {"runs": times, "steps": steps, "first_image_s_median_after_first": statistics.median(warm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="models to serve (default: the shipped emoji model)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--page-runs", type=int, default=5)
    parser.add_argument("--mode", choices=("both", "load", "page"), default="both")
    parser.add_argument("--smoke", action="store_true", help="4 clients for 8 s, 4 steps, a queue of 1, the page once (< 1 minute)")
    parser.add_argument("--json", default="benchmarks/results/serve_load.json")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.seconds, args.steps, args.page_runs, args.queue = 4, 8.0, 4, 1, 1  # a queue of 1: some 429s
        if args.json == parser.get_default("json"):
            args.json = "benchmarks/results/serve_load_smoke.json"
    args.clients, args.seconds = max(1, min(args.clients, 200)), max(1.0, min(args.seconds, 600.0))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "smoke": args.smoke,
              "models": args.model or ["emoji-t2i (shipped)"], "queue": args.queue}
    try:
        if args.mode in ("both", "load"):
            report["load"] = load(url, server, args.clients, args.seconds, args.steps)
            print(json.dumps({k: v for k, v in report["load"].items() if k != "rss_samples"}), flush=True)
        if args.mode in ("both", "page"):
            report["page"] = page(url, args.page_runs, args.steps)
            print(json.dumps(report["page"]), flush=True)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
