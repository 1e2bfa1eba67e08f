"""Jobs and one worker thread per model with a bounded queue; each finished image goes into the gallery (gallery.py).

A job is one call of a Pipeline. Its worker runs one job at a time; the callback of every sampler
step publishes progress (with small previews of x0_hat and of the noisy x_t) to whoever watches the job, and raises
JobCancelled when the job was cancelled, which unwinds the sampler. Watchers are asyncio queues
fed from the worker thread with call_soon_threadsafe. A job that had watchers and lost them all
(every client that waited for it disconnected) is cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import threading
import time

from diffusekit.errors import UserError
from diffusekit.images import gif_bytes, png_bytes
from diffusekit.serve.gallery import Gallery, GalleryImage
from diffusekit.serve.inside import attention_summary, step_previews

PREVIEW_EVERY_S = 0.2  # at most five previews a second: two decodes (x0_hat, x_t) and PNGs each
FINISHED = ("done", "failed", "cancelled")


class JobCancelled(Exception):
    """Raised inside the sampler's callback to stop a cancelled job."""


class QueueFull(Exception):
    def __init__(self, retry_after: int, size: int):
        super().__init__(f"the queue of this model is full ({size} jobs wait); try again in {retry_after} s")
        self.retry_after, self.size = retry_after, size


class Job:
    """One generation: `call` holds the keyword arguments of Pipeline.__call__ (already checked)."""

    def __init__(self, model: str, call: dict, seed: int, first_index: int = 0, animate: bool = False):
        self.id = secrets.token_hex(8)
        self.model, self.call, self.seed, self.first_index, self.animate = model, call, seed, first_index, animate
        self.status, self.step, self.steps, self.error = "queued", 0, 0, None
        self.images: list[GalleryImage] = []
        self.animation: bytes | None = None
        self.created, self.started, self.finished = time.time(), None, None
        self.preview: str | None = None  # the latest x0_hat preview (a PNG data URL), and the x_t beside it
        self.noisy: str | None = None
        self.attention: dict | None = None  # with "attention": true, each token's maps (inside.attention_summary)
        self.notes: list[str] = []  # what the server changed of the request (a control image resized)
        self.cancel_requested = threading.Event()
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self.was_watched = False

    def summary(self, position: int | None = None) -> dict:
        return {"id": self.id, "model": self.model, "status": self.status, "step": self.step, "steps": self.steps, "position": position,
                "seed": self.seed, "images": [image.summary() for image in self.images], "error": self.error,
                "animation": f"/api/jobs/{self.id}/animation.gif" if self.animation else None, "attention": self.attention, "notes": self.notes,
                "events": f"/api/jobs/{self.id}/events", "created": self.created, "started": self.started, "finished": self.finished}

    def publish(self, event: dict) -> None:
        with self.lock:
            watchers = list(self.watchers)
        for loop, queue in watchers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # that watcher's loop is closed
                pass

    def watch(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            self.watchers.append((loop, queue))
            self.was_watched = True
        return queue

    def unwatch(self, queue: asyncio.Queue) -> None:
        """Stop watching; the last watcher to leave an unfinished job cancels it (its client went away)."""
        with self.lock:
            self.watchers = [(loop, q) for loop, q in self.watchers if q is not queue]
            orphaned = not self.watchers and self.status not in FINISHED
        if orphaned:
            self.cancel()

    def cancel(self) -> None:
        self.cancel_requested.set()

    def finish(self, status: str, error: dict | None = None) -> None:
        self.call = {k: v for k, v in self.call.items() if k not in ("image", "mask_image", "control_image")}  # the uploads are not kept
        self.status, self.error, self.finished = status, error, time.time()
        self.done.set()
        self.publish({"event": status, "job": self.summary()})


class ModelWorker:
    """One model's thread: runs its jobs one at a time, in order; at most `queue_size` wait."""

    def __init__(self, name: str, pipe, gallery: Gallery, queue_size: int = 8):
        self.name, self.pipe, self.gallery, self.queue_size = name, pipe, gallery, queue_size
        pipe.name = name  # what its images record as "Model": the name clients choose it by
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.condition = threading.Condition()
        self.recent_seconds: collections.deque[float] = collections.deque(maxlen=8)
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name=f"diffusekit-{name}", daemon=True)
        self.thread.start()

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely to free up (the recent jobs' mean duration)."""
        mean = sum(self.recent_seconds) / len(self.recent_seconds) if self.recent_seconds else 5.0
        return max(1, min(600, round(mean)))

    def submit(self, job: Job) -> int:
        """Queue a job; its place in the queue (0: next). QueueFull when `queue_size` jobs already wait."""
        with self.condition:
            if len(self.waiting) >= self.queue_size:
                raise QueueFull(self.retry_after(), self.queue_size)
            self.waiting.append(job)
            self.condition.notify()
            return len(self.waiting) - 1

    def position(self, job: Job) -> int | None:
        with self.condition:
            return self.waiting.index(job) if job in self.waiting else None

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self.condition:
            if job in self.waiting:
                self.waiting.remove(job)
                job.finish("cancelled")

    def stop(self) -> None:
        """Cancel the waiting jobs and the running one, and end the thread."""
        with self.condition:
            self.stopped = True
            waiting, self.waiting = list(self.waiting), collections.deque()
            if self.running is not None:
                self.running.cancel()
            self.condition.notify_all()
        for job in waiting:
            job.cancel()
            job.finish("cancelled")

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.waiting and not self.stopped:
                    self.condition.wait()
                if self.stopped:
                    return
                job = self.running = self.waiting.popleft()
            try:
                self._execute(job)
            finally:
                with self.condition:
                    self.running = None

    def _execute(self, job: Job) -> None:
        if job.cancel_requested.is_set():
            return job.finish("cancelled")
        job.status, job.started = "running", time.time()
        job.publish({"event": "running", "job": job.summary()})
        frames, last_preview = [], 0.0

        def on_step(info) -> None:
            if job.cancel_requested.is_set():
                raise JobCancelled
            nonlocal last_preview
            job.step, job.steps = info["i"] + 1, info["steps"]
            if job.animate:
                frames.append(self.pipe.preview(info, 1, noisy=True))
            previews, now = {"preview": None, "noisy": None}, time.monotonic()
            if now - last_preview >= PREVIEW_EVERY_S and job.step < job.steps:
                last_preview, previews = now, step_previews(self.pipe, info)
                job.preview, job.noisy = previews["preview"], previews["noisy"]
            job.publish({"event": "progress", "step": job.step, "steps": job.steps, **previews})

        try:
            output = self.pipe(callback=on_step, **job.call)
            images = [GalleryImage(secrets.token_hex(8), job.id, self.name, png_bytes(image, text), text, job.seed, job.first_index + i)
                      for i, (image, text) in enumerate(zip(output.images, output.parameters))]
            job.animation = gif_bytes(frames) if frames else None
            job.attention = attention_summary(output.attention) if output.attention is not None else None
        except JobCancelled:
            return job.finish("cancelled")
        except UserError as err:
            return job.finish("failed", {"message": str(err), "type": "invalid_request_error", "param": None, "code": "bad_request"})
        except Exception as err:  # a bug or the machine (out of memory): the job fails, the server keeps serving
            return job.finish("failed", {"message": f"generation failed: {type(err).__name__}: {err}", "type": "server_error", "param": None,
                                         "code": "internal_error"})
        for image in images:
            self.gallery.add(image)
        job.images = images
        self.recent_seconds.append(time.time() - job.started)
        job.finish("done")
