"""`diffusekit serve` against hostile or careless clients: bodies that once were a 500 with a plain-text body,
text that is not Unicode, numbers out of every sensible range, long thin images, odd Host headers, clients that
drop mid-body, and the command line's mistakes (an empty --api-key, a port in use). Each is one 4xx JSON error
or one "error:" line, and the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_user_error, cli
from PIL import Image
from serve_helpers import running_server, tiny_pipe, wait_for

from diffusekit.serve import LOOPBACK_HOSTS, Limits, Server, create_app

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client():
    server = Server({"tiny": tiny_pipe(), "chars": tiny_pipe(text=True)}, Limits(), queue_size=64)
    with TestClient(create_app(server, allowed_hosts=LOOPBACK_HOSTS), base_url="http://127.0.0.1:7860", raise_server_exceptions=False) as c:
        yield c


def png_data_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def assert_refused(answer, status: int, *fragments: str, param: str | None = None) -> dict:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


def still_serving(client) -> None:
    assert client.post("/api/jobs", json={"steps": 1, "guidance": 1.0}).status_code == 202


RAW_BODIES = [  # (raw JSON body, the field named, fragments of the message)
    (b"[" * 100_000 + b"]" * 100_000, None, ["nested too deeply"]),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, ["nested too deeply"]),
    (b'{"seed": ' + b"7" * 5000 + b"}", None, ["5000 digits", "no field takes more than"]),
    (b'{"steps": -' + b"1" * 500 + b"}", None, ["500 digits"]),
    (b'{"image": "data:image/png;base64"}', "image", ["data: URL without a comma"]),
    (b'{"guidance": NaN}', None, ["NaN is not a JSON number"]),
    (b'{"sampler": "ddim", "eta": Infinity}', None, ["Infinity is not a JSON number"]),
    (b'{"guidance": -Infinity}', None, ["-Infinity is not a JSON number"]),
    (b'{"guidance": 1e400}', None, ["1e400 is too large"]),
    (b'{"guidance": "inf"}', "guidance", ["finite number"]),
    (b'{"guidance": 1e308}', "guidance", ["guidance = 1e+308", "use 0 to 30"]),
    (b'{"guidance": 1e30}', "guidance", ["use 0 to 30"]),
    (b'{"guidance": -1}', "guidance", ["use 0 to 30"]),
    (b'{"sampler": "ddim", "eta": 1e30}', "eta", ["eta = 1e+30", "use 0 to 1"]),
    (b'{"sampler": "ddim", "eta": 1.5}', "eta", ["use 0 to 1"]),
    (b'{"steps": 1e300}', "steps", ["exceeded maximum size"]),
    (b'{"model": "chars", "prompt": "\\ud800"}', "prompt", ["lone surrogate", "send valid Unicode"]),
    (b'{"model": "chars", "negative_prompt": "ab\\udfff"}', "negative_prompt", ["lone surrogate"]),
    (b'{"model": "chars", "prompt": "\xed\xa0\x80"}', "prompt", ["lone surrogate"]),  # the surrogate in raw bytes
    (b'{"sampler": "\\ud800"}', "sampler", ["lone surrogate"]),
    (b'{"\\ud800": 1}', "\\ud800", ["lone surrogate"]),
]


@pytest.mark.parametrize("body, param, fragments", RAW_BODIES, ids=range(len(RAW_BODIES)))
def test_hostile_bodies_are_one_json_error_naming_the_problem(client, body, param, fragments):
    assert_refused(client.post("/api/jobs", content=body, headers=JSON), 400, *fragments, param=param)
    still_serving(client)


def test_a_lone_surrogate_gets_the_same_answer_from_both_apis(client):
    for field in ("prompt", "negative_prompt"):
        body = json.dumps({"model": "chars", "prompt": "ab", field: "x\ud800"}).encode()  # sent as the escape \ud800
        native = assert_refused(client.post("/api/jobs", content=body, headers=JSON), 400, "lone surrogate", param=field)
        openai = assert_refused(client.post("/v1/images/generations", content=body, headers=JSON), 400, param=field)
        assert native == openai
    assert not [job for job in client.app.state.server.jobs.values() if job.status == "failed"]  # refused up front, nothing queued
    still_serving(client)


def test_the_limits_name_the_finite_ranges_and_valid_values_still_work(client):
    limits = client.get("/api/models").json()["limits"]
    assert limits["max_guidance"] == 30.0 and limits["max_eta"] == 1.0
    for body in ({"guidance": 30.0}, {"guidance": 0}, {"sampler": "ddim", "eta": 1.0}, {"sampler": "ddim", "eta": 0}):
        answer = client.post("/api/jobs", json={"steps": 1, **body})
        assert answer.status_code == 202, answer.text


@pytest.mark.parametrize("width, height", [(1, 1_000_000), (1, 4_194_304), (4_194_304, 1), (9, 100)])
def test_a_long_thin_upload_is_refused_before_it_is_decoded(client, width, height):
    thin = png_data_url(width, height)
    if (width, height) == (1, 1_000_000):
        assert len(base64.b64decode(thin.split(",", 1)[1])) < 3000  # the 2 kB file of the report
    for body in ({"image": thin}, {"image": thin, "mask": thin}):
        error = assert_refused(client.post("/api/jobs", json={"steps": 2, **body}), 400, f"{width}x{height} pixels", param="image")
        assert "more than 8 times the other" in error["message"] or "longer than the 8192" in error["message"]
    ok = client.post("/api/jobs", json={"steps": 2, "image": png_data_url(8, 64), "strength": 1.0})  # 8:1 is fine
    assert ok.status_code == 202, ok.text


def test_thin_uploads_leave_the_memory_alone(tmp_path):
    """The report's case in a fresh process: 1x1,000,000 (and 1x4,194,304) PNGs, with and without a mask."""
    script = tmp_path / "probe.py"
    script.write_text(f"""
import base64, io, resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from fastapi.testclient import TestClient
from PIL import Image
from serve_helpers import tiny_pipe
from diffusekit.serve import Limits, Server, create_app
def url(w, h):
    buffer = io.BytesIO()
    Image.new("L", (w, h)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
bodies = [{{"image": url(1, h), **mask}} for h in (1_000_000, 4_194_304) for mask in ({{}}, {{"mask": url(1, h)}})]
with TestClient(create_app(Server({{"tiny": tiny_pipe()}}, Limits()))) as client:
    client.post("/api/jobs", json={{"steps": 1}})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    statuses = [client.post("/api/jobs", json=body).status_code for body in bodies]
    print(statuses, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
""")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    statuses, grown_mib = out.stdout.strip().rsplit(" ", 1)
    assert statuses == "[400, 400, 400, 400]" and int(grown_mib) < 64, out.stdout  # was 5.9 GB, or a MemoryError


@pytest.mark.parametrize("host, status", [
    ("[::1]", 200), ("[::1]:7860", 200), ("localhost", 200), ("LocalHost:7860", 200), ("127.0.0.1", 200), ("127.0.0.1:7860", 200),
    ("::1", 200),  # a bare IPv6 literal: no port can follow it
    ("evil.example", 421), ("evil.example:7860", 421), ("127.0.0.1.evil.example", 421), ("[::1]x", 421), ("[::1]:port", 421),
    ("[::2]:7860", 421), ("localhost:7860:1", 421), ("", 421), ("[", 421), (":7860", 421)])
def test_host_headers_are_parsed_with_their_ipv6_brackets_and_ports(client, host, status):
    answer = client.get("/api/health", headers={"host": host})
    assert answer.status_code == status, answer.text
    if status == 421:
        assert answer.json()["error"]["message"].startswith(f"Host '{host}' is not this server's name")


def test_a_client_that_drops_mid_body_is_one_short_log_line(capfd):
    server = Server({"tiny": tiny_pipe()}, Limits())
    with running_server(create_app(server)) as url:
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("uvicorn.error").addHandler(handler)
        try:
            port = int(url.rsplit(":", 1)[1])
            for _ in range(3):
                with socket.create_connection(("127.0.0.1", port)) as raw:
                    raw.sendall(b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 1000\r\n\r\n" + b'{"steps": ')
                    time.sleep(0.05)
            wait_for(lambda: len(records) >= 3, timeout=10)
            time.sleep(0.2)  # anything else it would log
            import httpx

            assert httpx.get(f"{url}/api/health").status_code == 200
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
    assert len(records) == 3 and not any(record.exc_info for record in records)
    for record in records:
        line = record.getMessage()
        assert "\n" not in line and len(line) < 200 and "10 of 1000 bytes" in line and "POST /api/jobs" in line, line
    assert "Traceback" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("key", ["", "   ", " padded", "ключ"])
def test_an_empty_or_unsendable_api_key_is_refused(capsys, key):
    assert_user_error(cli(capsys, "serve", "--api-key", key), "--api-key")
    assert_user_error(cli(capsys, "serve", f"--api-key={key}"), "--api-key")


def test_a_port_in_use_is_one_error_line_naming_it_and_nothing_is_served(capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, out, err = cli(capsys, "serve", "--port", port)
    assert_user_error((code, out, err), f"port {port} on 127.0.0.1 is already in use", "another one with --port")
    assert out == ""  # no "serving ..." line


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_binds_first_then_says_where_it_serves():
    """The real command (the shipped model) on a free port: the line comes once the port is known to be free, and it answers."""
    httpx = pytest.importorskip("httpx")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "diffusekit", "serve", "--port", str(port), "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving emoji-t2i on http://127.0.0.1:") and f":{port}/" in line, line + proc.stderr.read()
        deadline = time.monotonic() + 30
        while True:  # uvicorn starts taking connections a moment after the line
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/health", headers={"host": "[::1]"}, timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert answer.status_code == 200 and answer.json()["models"] == ["emoji-t2i"]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
