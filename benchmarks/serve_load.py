"""`diffusekit serve` under load, and how soon the page shows the first image.

    python benchmarks/serve_load.py                        # 50 clients for 60 s, then the page 5 times (~3 min)
    python benchmarks/serve_load.py --smoke                # 4 clients for 8 s, the page once, 4 steps (< 1 min)
    python benchmarks/serve_load.py --mode sdapi           # 50 clients for 60 s on AUTOMATIC1111's /sdapi/v1/txt2img

It starts `python -m diffusekit serve` (the shipped emoji model unless --model) as a child process on a
free loopback port; nothing but 127.0.0.1 is ever contacted, and every loop is bounded in count and time.

1. load: N clients, each sending POST /v1/images/generations (OpenAI's API, one image, --steps steps)
   over and over for --seconds; a 429 is waited out (Retry-After, at most 1 s) and counted. Reported:
   requests answered with an image / with 429 / otherwise (must be 0), latency percentiles, the server's
   resident memory over time (start, peak, end: "flat" is end within 10% of the first quarter's peak), and
   whether it still answers afterwards.
2. page: headless Chromium (Debian's, via Playwright) opens the page, presses Generate with --steps steps
   and times the first x0 preview and the first image in the gallery; --page-runs times.
3. gallery: a restart with --gallery-images (10,000) small PNGs with parameters in the outputs folder (written
   as the server writes them, into a temporary folder): the time to build the server over it (the scan), to
   answer the first /api/images page, and the page's first view (that page and its 60 PNGs), in process
   (the shipped model loaded beforehand, not timed); and when the background check of every PNG is done.

4. sdapi (only with --mode sdapi): the load of 1 on POST /sdapi/v1/txt2img (AUTOMATIC1111's API, batch_size 1);
   afterwards the PNGs the server wrote into its outputs folder during the run are counted: every answer with an
   image must have one (`every_image_saved`), and every answer must be an image or a 429 (`only_200_or_429`).

The server of 1, 2 and 4 saves its images into a temporary folder (--outputs to choose one), never ./outputs.

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
               "--device", "cpu", "--outputs", args.outputs, *sum((["--model", m] for m in args.model), [])]
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


API_PATHS = {"openai": "/v1/images/generations", "sdapi": "/sdapi/v1/txt2img"}


def answered_image(answer: httpx.Response, api: str) -> bool:
    if answer.status_code != 200:
        return False
    return bool(answer.json()["data"][0].get("b64_json") if api == "openai" else answer.json()["images"])


def saved_pngs(folder: str) -> int:
    """The PNGs in a server's outputs folder, the trash left out."""
    return sum(1 for path in Path(folder).rglob("*.png") if "trash" not in path.relative_to(folder).parts)


def load(url: str, server: subprocess.Popen, clients: int, seconds: float, steps: int, api: str = "openai") -> dict:
    counts = {"image": 0, "429": 0, "other": 0, "error": 0}
    latencies: dict[str, list[float]] = {"image": [], "429": []}
    lock, stop_at = threading.Lock(), time.monotonic() + seconds
    memory: list[tuple[float, float]] = []

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=seconds + 120) as http:
            i = 0
            while time.monotonic() < stop_at and i < 100_000:
                i += 1
                body = {"prompt": PROMPTS[(k + i) % len(PROMPTS)], "steps": steps, "seed": k * 1000 + i, ("n" if api == "openai" else "batch_size"): 1}
                start = time.monotonic()
                try:
                    answer = http.post(API_PATHS[api], json=body)
                except httpx.HTTPError:
                    with lock:
                        counts["error"] += 1
                    continue
                took = time.monotonic() - start
                kind = "image" if answered_image(answer, api) else "429" if answer.status_code == 429 else "other"
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


def gallery_restart(count: int, repeats: int = 3, view: int = 60) -> dict:
    """Restarts over an outputs folder of `count` PNGs (32 x 32, with parameters, a day's folder per 1,000): the time
    to build the server (the scan), to answer the first /api/images page and to fetch its `view` PNGs as the page does."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from diffusekit.images import png_bytes
    from diffusekit.serve import Limits, Server, create_app, load_pipes
    from diffusekit.serve.gallery import Gallery, GalleryImage
    from diffusekit.serve.outputs import Outputs

    pipes = load_pipes([], device="cpu")
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        outputs, began = Outputs(folder), time.perf_counter()
        first_day = time.time() - 86400 * (count // 1000 + 1)
        for k in range(count):
            text = f"{PROMPTS[k % len(PROMPTS)]}\nSteps: 20, Sampler: dpmpp_2m, CFG scale: 3.0, Seed: {k}, Image index: 0, Size: 32x32, Model: emoji-t2i"
            png = png_bytes(Image.new("RGB", (32, 32), (k % 256, (k // 256) % 256, 90)), text)
            created = first_day + (k // 1000) * 86400 + (k % 1000) * 10
            if outputs.write(GalleryImage(f"{k:016x}", None, "emoji-t2i", png, text, k, 0, created)) is None:
                raise SystemExit(f"could not write into {folder}: {outputs.problem}")
        written_s = time.perf_counter() - began
        for _ in range(repeats):
            start = time.perf_counter()
            server = Server(pipes, Limits(), gallery=Gallery(folder=folder))
            built = time.perf_counter()
            with TestClient(create_app(server)) as client:
                answer = client.get("/api/images", params={"limit": view})
                paged = time.perf_counter()
                sizes = [len(client.get(image["url"]).content) for image in answer.json()["images"]]
                viewed = time.perf_counter()
                server.gallery.checked.wait(120)
                checked = time.perf_counter()
                status = client.get("/api/status").json()
            newest = answer.json()["images"][0]["seed"] if answer.json()["images"] else None
            runs.append({"scan_s": built - start, "first_page_s": paged - start, "first_view_s": viewed - start, "all_checked_s": checked - start,
                         "shown": len(sizes), "total": answer.json()["total"], "newest_seed": newest, "skipped": status["skipped"]})
    return {"images": count, "written_s": written_s, "runs": runs, "first_view_s_median": statistics.median(r["first_view_s"] for r in runs),
            "target_s": 1.0, "met": all(r["first_view_s"] < 1.0 for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="models to serve (default: the shipped emoji model)")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--page-runs", type=int, default=5)
    parser.add_argument("--gallery-images", type=int, default=10_000, help="PNGs in the outputs folder for the restart (mode gallery)")
    parser.add_argument("--outputs", help="the server's outputs folder in load and page (default: a new temporary folder)")
    parser.add_argument("--mode", choices=("both", "load", "page", "gallery", "sdapi"), default="both",
                        help="both: load, page and gallery; sdapi: the load on /sdapi/v1/txt2img, every image checked on disk")
    parser.add_argument("--smoke", action="store_true", help="4 clients for 8 s, 4 steps, a queue of 1, the page once (< 1 minute)")
    parser.add_argument("--json", default="benchmarks/results/serve_load.json")
    args = parser.parse_args()
    if args.smoke:
        args.clients, args.seconds, args.steps, args.page_runs, args.queue = 4, 8.0, 4, 1, 1  # a queue of 1: some 429s
        args.gallery_images = min(args.gallery_images, 500)
        if args.json == parser.get_default("json"):
            args.json = "benchmarks/results/serve_load_smoke.json"
    if args.mode == "gallery" and args.json == parser.get_default("json"):
        args.json = "benchmarks/results/serve_gallery.json"
    if args.mode == "sdapi" and args.json == parser.get_default("json"):
        args.json = "benchmarks/results/serve_sdapi.json"
    args.clients, args.seconds = max(1, min(args.clients, 200)), max(1.0, min(args.seconds, 600.0))

    report = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(), "smoke": args.smoke}
    if args.mode in ("both", "gallery"):
        report["gallery"] = gallery_restart(max(1, min(args.gallery_images, 100_000)))
        print(json.dumps(report["gallery"]), flush=True)
    if args.mode == "gallery":
        return write_report(report, args.json)
    scratch = tempfile.TemporaryDirectory(prefix="serve-load-outputs-")
    args.outputs = args.outputs or scratch.name
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args, port)
    report.update({"models": args.model or ["emoji-t2i (shipped)"], "queue": args.queue})
    try:
        if args.mode in ("both", "load"):
            report["load"] = load(url, server, args.clients, args.seconds, args.steps)
            print(json.dumps({k: v for k, v in report["load"].items() if k != "rss_samples"}), flush=True)
        if args.mode == "sdapi":
            before = saved_pngs(args.outputs)
            report["sdapi"] = result = load(url, server, args.clients, args.seconds, args.steps, api="sdapi")
            result["saved_pngs"] = saved_pngs(args.outputs) - before
            result["every_image_saved"] = result["saved_pngs"] == result["answered"]["image"]
            result["only_200_or_429"] = result["answered"]["other"] == result["answered"]["error"] == 0
            print(json.dumps({k: v for k, v in result.items() if k != "rss_samples"}), flush=True)
        if args.mode in ("both", "page"):
            report["page"] = page(url, args.page_runs, args.steps)
            print(json.dumps(report["page"]), flush=True)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        scratch.cleanup()
    write_report(report, args.json)


def write_report(report: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
