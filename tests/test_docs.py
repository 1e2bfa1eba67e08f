"""Docs that run: every shell block of README.md and docs/*.md is run here, or says why it is not.

A block is run command by command, in order, in one working folder per document (so a command may use a
run an earlier one trained), with the fixtures it names (apple.png, mask.png, my_images/ ..., a copy of the
shipped model at its path in the repository) made first.
Tiny settings come from one place, the tables below: TINY's substitutions (budgets become a second, step
counts two, image counts at most eight), then TRAIN_TINY for every training command (two optimizer steps on
a few images), DISTILL_TINY for every distillation (two steps, not a budget), EXPLAIN_TINY for `explain` and
SAMPLING_TINY (two steps) for sample / generate / edit. A block that cannot run here (it needs Stable
Diffusion weights, a running server, a GPU or an hour) has, on the line just above its fence, the marker

    <!-- docs-test: not run (the reason) -->

and a block that goes on from another document's commands (the runs they trained) says so there, as

    <!-- docs-test: in README.md (what it uses from there) -->

(it then runs in that document's working folder, after that document's blocks).

A renamed flag, preset, command or file in the docs makes this test fail.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import random_images, write_images

from diffusekit.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(sh|bash|shell|console)\s*$")
NOT_RUN = re.compile(r"^<!-- docs-test: not run \((.+)\) -->$")
IN_FOLDER_OF = re.compile(r"^<!-- docs-test: in ([\w/.-]+\.md) \(.+\) -->$")

# (pattern, replacement) applied to every command, in order: the one place tiny settings come from
TINY = [
    (r"--budget \S+", "--budget 1s"),
    (r"--steps \d+", "--steps 2"),
    (r"--n (\d+)", lambda m: f"--n {min(int(m[1]), 8)}"),  # at most 8 (8 prompts still share them)
    (r"--prior-images \d+", "--prior-images 2"),
    (r"--train-steps \d+", "--train-steps 2"),
    (r" --compile\b", ""),  # compiling takes half a minute; tests/test_precision.py compiles
]
TRAIN_TINY = ["--set", "train.max_steps=2", "--set", "data.limit=16", "--set", "sample.n=2", "--set", "sample.steps=2",
              "--set", "eval.every=0", "--set", "train.batch_size=4", "--set", "train.checkpoint_every=2"]
TRAINING = {"train", "train-vae", "finetune", "train-controlnet"}
DISTILL_TINY = ["--train-steps", "2", "--set", "train.batch_size=4", "--set", "data.limit=16"]  # no budget to fill
EXPLAIN_TINY = ["--steps", "2", "--n", "2", "--frames", "3", "--levels", "4", "--reference-steps", "4"]
SAMPLING_TINY = ["--steps", "2"]  # appended (the last occurrence of an option wins) unless the image's own settings are asked for
SAMPLING = {"sample", "generate", "edit"}


def shell_blocks(path: Path) -> list[tuple[int, list[str], str | None, str | None]]:
    """(line number, the block's lines, the not-run reason or None, the document whose folder it runs in or None)."""
    lines, blocks, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            above = lines[i - 1] if i else ""
            reason, folder_of = NOT_RUN.match(above), IN_FOLDER_OF.match(above)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append((i + 1, lines[i + 1 : end], reason[1] if reason else None, folder_of[1] if folder_of else None))
            i = end
        i += 1
    return blocks


def commands(block: list[str]) -> list[list[str]]:
    """The block's commands as argument lists: comments dropped, continued lines joined."""
    text = "\n".join(block).replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        args = shlex.split(line, comments=True)
        if args:
            out.append(args)
    return out


def tiny(args: list[str]) -> list[str]:
    text = shlex.join(args)
    for pattern, replacement in TINY:
        text = re.sub(pattern, replacement, text)
    args = shlex.split(text)
    if args[1] in TRAINING:
        return args + TRAIN_TINY
    if args[1] == "distill":
        budget = args.index("--budget") if "--budget" in args else len(args)
        return args[:budget] + args[budget + 2 :] + DISTILL_TINY
    if args[1] == "explain":
        return args + EXPLAIN_TINY
    if args[1] in SAMPLING and "--from" not in args:
        return args + SAMPLING_TINY
    return args


def make_fixtures(folder: Path) -> None:
    """The files the docs' commands read, made small: images, a mask, captioned image folders."""
    write_images(folder / "my_images", random_images(6, size=32, channels=3, seed=1))
    write_images(folder / "my_samples", random_images(8, size=28, seed=2))
    for name, text in (("my_symbols", "alchemical symbol for fire"), ("my_dog", "a dog"), ("dogs", "a dog")):
        write_images(folder / name, random_images(4, size=32, channels=3, seed=3))
        files = sorted(p.name for p in (folder / name).iterdir())
        (folder / name / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": text}) + "\n" for f in files))
    write_images(folder, random_images(2, size=32, channels=3, seed=4), names=["apple.png", "photo.jpg"])
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    write_images(folder, [mask], names=["mask.png"])
    shipped = "src/diffusekit/assets/emoji-t2i"  # the docs name the shipped model by its path in the repository
    shutil.copytree(ROOT / shipped, folder / shipped)


def all_blocks():
    for path in DOCUMENTS:
        for line, block, reason, folder_of in shell_blocks(path):
            yield pytest.param(path, line, block, reason, folder_of, id=f"{path.relative_to(ROOT)}:{line}")


FINISHED: set[tuple[Path, int]] = set()  # blocks run already (a block in another document's folder runs that document first)


def run_block(path: Path, line: int, block: list[str], base: Path, folder_of: Path | None = None) -> None:
    """Run the block's commands in the working folder of its document (or of `folder_of`), once."""
    if (path, line) in FINISHED:
        return
    folder = base / f"docs-{(folder_of or path).stem}"  # one working folder per document
    if not folder.exists():
        folder.mkdir()
        make_fixtures(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for args in commands(block):
            assert args[0] == "diffusekit", f"{path.name}:{line}: only diffusekit commands run here; mark the block not run: {shlex.join(args)}"
            run = tiny(args)
            assert cli_main(run[1:]) == 0, f"{path.name}:{line}: {shlex.join(run)} failed"
    FINISHED.add((path, line))


@pytest.mark.parametrize("path, line, block, reason, folder_of", list(all_blocks()))
def test_every_shell_block_runs_or_says_why_not(path, line, block, reason, folder_of, tmp_path_factory):
    if reason is not None:
        assert len(reason) > 10, f"{path.name}:{line}: say why the block is not run"
        return
    base = tmp_path_factory.getbasetemp()
    host = ROOT / folder_of if folder_of else None
    if host is not None:  # that document's blocks first, in its folder, then this one there
        for host_line, host_block, host_reason, _ in shell_blocks(host):
            if host_reason is None:
                run_block(host, host_line, host_block, base)
    run_block(path, line, block, base, host)
