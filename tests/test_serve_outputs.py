"""The studio keeps what it makes: every image saved into the outputs folder (a folder per day, a PNG with its
parameters), the gallery rebuilt from that folder on start (newest first, paged, the same ids), damaged files
skipped and counted, a folder that cannot be written a warning and a notice while generation goes on in memory,
and deleting an image moving it into the folder's trash/."""

from __future__ import annotations

import errno
import io
import os
import time
import warnings

import pytest
from conftest import assert_user_error, cli, snapshot
from PIL import Image
from serve_helpers import tiny_pipe, wait_for

from diffusekit.errors import DiffusekitWarning, UserError
from diffusekit.images import parse_parameters, png_bytes
from diffusekit.serve import Limits, Server, create_app
from diffusekit.serve.gallery import Gallery
from diffusekit.serve.jobs import FINISHED

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


def studio(folder=None, capacity: int = 256, **options) -> TestClient:
    server = Server({"tiny": tiny_pipe()}, Limits(), gallery=Gallery(capacity, folder), **options)
    return TestClient(create_app(server))


def generate(client, headers=None, **body) -> list[dict]:
    """Run a job to its end; its images."""
    job = client.post("/api/jobs", json={"steps": 2, **body}, headers=headers)
    assert job.status_code == 202, job.text
    url = f"/api/jobs/{job.json()['id']}"
    wait_for(lambda: client.get(url, headers=headers).json()["status"] in FINISHED)
    done = client.get(url, headers=headers).json()
    assert done["status"] == "done", done
    return done["images"]


def pngs(folder) -> list:
    return sorted(p for p in folder.rglob("*.png") if "trash" not in p.relative_to(folder).parts)


def checked(client) -> dict:
    wait_for(lambda: client.get("/api/status").json()["checked"])
    return client.get("/api/status").json()


def test_every_image_is_written_into_a_folder_per_day_with_its_parameters(tmp_path):
    with studio(tmp_path / "outputs") as client:
        images = generate(client, n=2, seed=7)
        assert client.get("/api/status").json() | {"checked": True} == {
            "outputs": str(tmp_path / "outputs"), "saving": True, "notice": None, "images": 2, "checked": True, "skipped": 0}
    files = pngs(tmp_path / "outputs")
    assert sorted(f.name.rsplit("-", 1)[1] for f in files) == sorted(f"{image['id']}.png" for image in images)
    for image in images:
        made = time.localtime(image["created"])
        file = tmp_path / "outputs" / time.strftime("%Y-%m-%d", made) / f"{time.strftime('%H%M%S', made)}-7-{image['index']}-{image['id']}.png"
        assert file in files  # a folder per day; the time, seed, image index and id
        recorded = parse_parameters(Image.open(file).info["parameters"])
        assert recorded["Seed"] == 7 and recorded["Image index"] == image["index"] and recorded["Model"] == "tiny"
    assert not list((tmp_path / "outputs").rglob(".*"))  # no temporary file left


def test_a_restarted_server_shows_the_same_gallery_newest_first_paged_with_the_same_ids_and_urls(tmp_path):
    folder = tmp_path / "outputs"
    with studio(folder) as client:
        for seed in (1, 2):
            generate(client, n=3, seed=seed)
        before = client.get("/api/images").json()
        files = {image["id"]: client.get(image["url"]).content for image in before["images"]}
    assert [(image["seed"], image["index"]) for image in before["images"]] == [(2, 2), (2, 1), (2, 0), (1, 2), (1, 1), (1, 0)]

    with studio(folder, capacity=2) as client:  # the in-memory cap hides nothing that is on disk
        after = client.get("/api/images").json()
        assert after["total"] == 6 and after["offset"] == 0
        assert [image["id"] for image in after["images"]] == [image["id"] for image in before["images"]]
        for old, new in zip(before["images"], after["images"]):
            assert {k: new[k] for k in ("seed", "index", "model", "parameters", "url")} == {k: old[k] for k in ("seed", "index", "model", "parameters", "url")}
            assert new["created"] == pytest.approx(old["created"], abs=1e-3) and new["job"] is None  # jobs are not kept over a restart
        assert {image_id: client.get(f"/api/images/{image_id}.png").content for image_id in files} == files
        page = client.get("/api/images", params={"offset": 2, "limit": 3}).json()
        assert [image["id"] for image in page["images"]] == [image["id"] for image in before["images"][2:5]] and page["total"] == 6
        assert client.get("/api/images", params={"offset": 6}).json()["images"] == []
        newer = generate(client, seed=3)  # a new image goes on top of the old ones
        assert client.get("/api/images", params={"limit": 1}).json()["images"][0]["id"] == newer[0]["id"]
        assert checked(client)["skipped"] == 0


@pytest.mark.parametrize("query, field", [({"offset": -1}, "offset"), ({"limit": 0}, "limit"), ({"limit": 501}, "limit"),
                                          ({"limit": "ten"}, "limit"), ({"offset": "1e3"}, "offset")])
def test_bad_paging_is_a_400_naming_the_parameter(tmp_path, query, field):
    with studio(tmp_path / "outputs") as client:
        answer = client.get("/api/images", params=query)
        assert answer.status_code == 400 and answer.json()["error"]["param"] == field and "whole number" in answer.json()["error"]["message"]


def test_damaged_pngs_and_pngs_without_parameters_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "outputs"
    with studio(folder) as client:
        made = generate(client, n=2, seed=4)
    good = pngs(folder)[0]
    day = folder / "2026-01-02"
    day.mkdir()
    (day / "cut-short.png").write_bytes(good.read_bytes()[:-30])
    (day / "not-a-png.png").write_bytes(b"%PDF-1.4 definitely not a PNG")
    (day / "no-parameters.png").write_bytes(png_bytes(Image.new("L", (8, 8))))
    (folder / "by-hand.png").write_bytes(png_bytes(Image.new("L", (8, 8)), "a copy\nSteps: 2, Sampler: euler, Seed: 9, Model: other"))
    (folder / "trash").mkdir()
    (folder / "trash" / "old-0123456789abcdef.png").write_bytes(good.read_bytes())  # trash is never shown
    (folder / "notes.txt").write_text("not an image")
    snapshot_before = snapshot(folder)

    with pytest.warns(DiffusekitWarning, match=r"gallery: 3 images, 3 skipped \(damaged or without parameters\)") as caught:
        with studio(folder) as client:
            status = checked(client)
            shown = client.get("/api/images").json()
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1
    assert status["skipped"] == 3 and status["images"] == 3 and shown["total"] == 3
    assert {image["id"] for image in shown["images"]} >= {image["id"] for image in made}
    by_hand = next(image for image in shown["images"] if image["model"] == "other")
    assert by_hand["seed"] == 9 and by_hand["index"] == 0 and len(by_hand["id"]) == 16
    assert snapshot(folder) == snapshot_before  # skipped files are left where they are


def test_a_page_asked_for_before_the_check_ends_already_leaves_out_the_damaged(tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    for k in range(3):
        (folder / f"bad-{k}.png").write_bytes(b"nope")
        os.utime(folder / f"bad-{k}.png", ns=(10**18 + k, 10**18 + k))  # the newest files of the folder
    (folder / "good.png").write_bytes(png_bytes(Image.new("L", (8, 8)), "ok\nSteps: 2, Sampler: euler, Seed: 1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiffusekitWarning)
        gallery = Gallery(folder=folder)
        images, _ = gallery.page(0, 2)
        assert [image.path.name for image in images] == ["good.png"]
        assert gallery.checked.wait(10) and gallery.status()["skipped"] == 3


def test_an_outputs_path_that_is_a_file_warns_once_shows_a_notice_and_images_stay_in_memory(tmp_path):
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the folder should be")
    with pytest.warns(DiffusekitWarning) as caught:
        with studio(blocker) as client:
            images = generate(client, n=2) + generate(client)
            status = client.get("/api/status").json()
            assert len(client.get("/api/images").json()["images"]) == 3
            assert Image.open(io.BytesIO(client.get(images[0]["url"]).content)).size == (8, 8)
    problems = [str(w.message) for w in caught if "outputs folder" in str(w.message)]
    assert len(problems) == 1 and "is a file" in problems[0] and "--outputs DIR" in problems[0]
    assert status["saving"] is False and status["notice"] == problems[0]
    assert blocker.read_text() == "a file where the folder should be"


def test_a_full_disk_warns_once_generation_goes_on_in_memory_and_saving_resumes_when_there_is_room(tmp_path, monkeypatch):
    folder = tmp_path / "outputs"

    def full(path, write, sync=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    with studio(folder) as client:
        monkeypatch.setattr("diffusekit.serve.outputs.atomic_write", full)
        with pytest.warns(DiffusekitWarning, match="the disk is full") as caught:
            kept = generate(client) + generate(client)
        assert len([w for w in caught if "outputs folder" in str(w.message)]) == 1
        status = client.get("/api/status").json()
        assert not status["saving"] and "free some space" in status["notice"]
        assert all(client.get(image["url"]).status_code == 200 for image in kept) and not pngs(folder)
        monkeypatch.undo()
        saved = generate(client)
        assert client.get("/api/status").json()["saving"] and [f.name.rsplit("-", 1)[1] for f in pngs(folder)] == [f"{saved[0]['id']}.png"]
        assert client.get("/api/images").json()["total"] == 3


def test_a_read_only_outputs_folder_warns_once_and_generation_goes_on(tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root (os.geteuid() == 0) with its usual capabilities writes anyway
            pytest.skip("this process writes into read-only folders (root): the full-disk test covers a failing write")
        with pytest.warns(DiffusekitWarning, match="not writable") as caught:
            with studio(folder) as client:
                assert len(generate(client, n=2)) == 2 and client.get("/api/images").json()["total"] == 2
                assert "not writable" in client.get("/api/status").json()["notice"]
        assert len([w for w in caught if "outputs folder" in str(w.message)]) == 1 and not list(folder.iterdir())
    finally:
        folder.chmod(0o755)


def test_delete_moves_the_image_into_trash_and_out_of_the_gallery_for_good(tmp_path):
    folder = tmp_path / "outputs"
    with studio(folder, api_key="k") as client:
        key = {"Authorization": "Bearer k"}
        first, second = generate(client, headers=key, n=2)
        assert client.delete(f"/api/images/{first['id']}").status_code == 401  # the API key rules of every /api/ route
        file = next(f for f in pngs(folder) if f.name.endswith(f"{first['id']}.png"))
        answer = client.delete(f"/api/images/{first['id']}.png", headers=key)
        assert answer.status_code == 200 and answer.json() == {"id": first["id"], "deleted": True,
                                                               "trash": f"trash/{file.parent.name}/{file.name}"}
        assert (folder / "trash" / file.parent.name / file.name).exists() and not file.exists()
        assert [image["id"] for image in client.get("/api/images", headers=key).json()["images"]] == [second["id"]]
        assert client.get(first["url"], headers=key).status_code == 404
        assert client.delete(f"/api/images/{first['id']}", headers=key).status_code == 404
    with studio(folder, api_key="k") as client:  # after a restart it stays deleted; the trash is not shown
        assert [image["id"] for image in client.get("/api/images", headers=key).json()["images"]] == [second["id"]]


def test_delete_of_an_image_kept_in_memory_only_forgets_it(tmp_path):
    with studio() as client:
        image = generate(client)[0]
        assert client.delete(f"/api/images/{image['id']}").json() == {"id": image["id"], "deleted": True, "trash": None}
        assert client.get("/api/images").json()["images"] == []


@pytest.mark.parametrize("name", ["..%2F..%2Fetc%2Fpasswd", "..%2Fnotes.txt", "0123456789abcdef", "0123456789ABCDEF", "trash%2Fx.png", "%2E%2E"])
def test_names_that_try_path_tricks_are_404_and_touch_nothing(tmp_path, name):
    folder = tmp_path / "outputs"
    with studio(folder) as client:
        generate(client)
        (folder / "notes.txt").write_text("keep me")
        before = snapshot(tmp_path)
        for method in ("GET", "DELETE"):
            answer = client.request(method, f"/api/images/{name}")
            assert answer.status_code in (400, 404) and "error" in answer.json(), (method, name)
        assert snapshot(tmp_path) == before and client.get("/api/images").json()["total"] == 1


def test_without_a_folder_nothing_is_written_and_the_newest_images_stay_in_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with studio(capacity=2) as client:
        made = generate(client, n=3)
        assert [image["id"] for image in client.get("/api/images").json()["images"]] == [made[2]["id"], made[1]["id"]]
        assert client.get("/api/status").json()["outputs"] is None
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_saves_into_outputs_by_default_and_says_so_in_its_help(capsys):
    from diffusekit.cli import build_parser
    from diffusekit.cli.serving import outputs_folder

    parse = build_parser().parse_args
    assert str(outputs_folder(parse(["serve"]))) == "outputs"
    assert str(outputs_folder(parse(["serve", "--outputs", "elsewhere"]))) == "elsewhere"
    assert str(outputs_folder(parse(["serve", "--save", "old"]))) == "old"  # the deprecated name of --outputs
    assert outputs_folder(parse(["serve", "--no-save"])) is None
    with pytest.raises(UserError, match="give one of the two"):
        outputs_folder(parse(["serve", "--no-save", "--outputs", "x"]))
    assert_user_error(cli(capsys, "serve", "--no-save", "--outputs", "x", "--port", "1"), "--no-save", "--outputs")
    with pytest.raises(SystemExit):
        parse(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "default: outputs/ in the folder where serve runs" in shown and "--no-save" in shown and "trash/" in shown


def test_a_delete_the_folder_does_not_allow_is_one_error_and_the_image_stays(tmp_path, monkeypatch):
    folder = tmp_path / "outputs"
    with studio(folder) as client:
        image = generate(client)[0]

        def refuse(source, target):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr("diffusekit.serve.outputs.os.rename", refuse)
        answer = client.delete(f"/api/images/{image['id']}")
        monkeypatch.undo()
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "outputs_unwritable"
        assert "Permission denied" in answer.json()["error"]["message"] and "writable" in answer.json()["error"]["message"]
        assert client.get(image["url"]).status_code == 200 and len(pngs(folder)) == 1
