"""`diffusekit explain CONCEPT`: every concept's figure made by its command on the shipped model (tiny settings),
every equation's code reference pointing at a function that exists, and the bad inputs."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, cli, tiny_config
from PIL import Image

from diffusekit.errors import UserError
from diffusekit.explain import CONCEPTS, ExplainSettings, draw_latent
from diffusekit.models import build_net
from diffusekit.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]

TINY = {  # settings small enough for a test, per concept
    "forward": ["--frames", 3, "--steps", 2],
    "reverse": ["--frames", 2, "--steps", 2],
    "loss": ["--levels", 3, "--n", 2, "--steps", 2],
    "latent": ["--steps", 2],
    "attention": ["--steps", 2],
    "steps": ["--steps", 2, "--n", 1, "--reference-steps", 3],
}


def test_every_concept_has_tiny_settings_here():
    assert set(TINY) == set(CONCEPTS)


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_each_concept_draws_its_figure_and_prints_its_equation_and_code(concept, tmp_path, capsys):
    out = tmp_path / f"{concept}.png"
    code, printed, err = cli(capsys, "explain", concept, "--out", out, *TINY[concept])
    assert code == 0, err
    with Image.open(out) as figure:
        assert figure.width >= 100 and figure.height >= 60
    assert CONCEPTS[concept].equation.splitlines()[0] in printed
    assert all(reference in printed for reference in CONCEPTS[concept].code)
    assert re.search(r"measured on emoji-t2i: .+", printed), printed


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes of a file, and each class's methods as Class.method."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef)}
    return names


@pytest.mark.parametrize("concept", sorted(CONCEPTS))
def test_each_code_reference_names_a_function_of_that_file(concept):
    for reference in CONCEPTS[concept].code:
        file, _, name = reference.partition(": ")
        assert (ROOT / file).is_file(), f"{concept}: {file} does not exist"
        assert name in defined_names(ROOT / file), f"{concept}: {file} defines no {name}"


def test_the_docs_page_shows_every_concept_with_its_command_and_figure():
    page = (ROOT / "docs" / "concepts.md").read_text()
    for concept in CONCEPTS:
        assert f"diffusekit explain {concept} " in page and f"(concepts/{concept}.png)" in page
        assert (ROOT / "docs" / "concepts" / f"{concept}.png").is_file()
        for reference in CONCEPTS[concept].code:
            file, _, name = reference.partition(": ")
            assert f"[`{name}`](../{file})" in page, f"docs/concepts.md does not link {name} of {file}"


def test_an_unknown_concept_lists_the_concepts(tmp_path, capsys):
    assert_user_error(cli(capsys, "explain", "diffusion", "--out", tmp_path / "x.png"), "unknown concept 'diffusion'", ", ".join(CONCEPTS))
    assert not (tmp_path / "x.png").exists()


def test_an_existing_figure_is_kept_without_overwrite(tmp_path, capsys):
    out = tmp_path / "forward.png"
    out.write_bytes(b"mine")
    assert_user_error(cli(capsys, "explain", "forward", "--out", out), "already exists", "--overwrite")
    assert_user_error(cli(capsys, "explain", "forward", "--out", tmp_path), "a folder")
    assert out.read_bytes() == b"mine"


def test_a_pixel_model_has_no_latent_space_and_no_attention():
    config = tiny_config()
    pipe = Pipeline(config, build_net(config))
    with pytest.raises(UserError, match="pixel space: it has no autoencoder"):
        draw_latent(pipe, ExplainSettings())
    with pytest.raises(UserError, match="unconditional: it has no cross-attention"):
        CONCEPTS["attention"].draw(pipe, ExplainSettings(steps=1))
    figure, measured = CONCEPTS["forward"].draw(pipe, ExplainSettings(frames=2, steps=1))  # a pixel model's forward process works
    assert figure.width > 0 and "closed form" in measured


def test_forward_starts_from_a_given_image(tmp_path, capsys):
    source = tmp_path / "apple.png"
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(source)
    code, printed, err = cli(capsys, "explain", "forward", "--image", source, "--frames", 2, "--out", tmp_path / "f.png")
    assert code == 0, err
    assert_user_error(cli(capsys, "explain", "forward", "--image", source, "--out", source, "--overwrite"), "would be written over --image")
