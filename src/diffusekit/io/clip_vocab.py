"""CLIP's tokenizer for checkpoints that carry none (single files), built offline from open-clip-torch's vocabulary.

    write_clip_tokenizer(folder, pad_token="!")   # a transformers CLIPTokenizer folder (vocab + merges)

The BPE file `bpe_simple_vocab_16e6.txt.gz` (MIT licence, 1.4 MB) is the vocabulary of every CLIP text
encoder of Stable Diffusion 1.x / 2.x. open-clip-torch ships it; diffusekit only reads the file and never
imports open_clip (which would import torchvision), so `pip install --no-deps open-clip-torch` is enough.
The vocabulary is laid out as open_clip's SimpleTokenizer does: the 256 byte characters, the same with
`</w>`, one token per merge (lines 1 .. 48894 of the file), then the start and end tokens (ids 49406, 49407).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from diffusekit.errors import UserError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # the merges CLIP uses: its vocabulary is 49408 tokens
START, END = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def bpe_file() -> Path:
    """The vocabulary file inside the installed open_clip package, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(folder) / BPE_FILE for folder in folders if (Path(folder) / BPE_FILE).is_file()), None)
    if path is None:
        raise UserError("a single-file checkpoint carries no tokenizer, and diffusekit builds CLIP's from the vocabulary that "
                        "open-clip-torch ships: pip install --no-deps open-clip-torch (only that file is read), or give "
                        "--config FOLDER, a diffusers folder of the same family, to use its tokenizer/")
    return path


def byte_characters() -> list[str]:
    """GPT-2 / CLIP's printable character for each of the 256 bytes, in the order the vocabulary lists them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + n) for n in range(len(others))]


def clip_vocabulary(path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) of CLIP's BPE tokenizer."""
    lines = gzip.open(path or bpe_file()).read().decode("utf-8").split("\n")[1 : MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(merge) for merge in merges] + [START, END]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, pad_token: str = END) -> None:
    """A transformers CLIPTokenizer folder. pad_token: SD 1.x pads with the end token, SD 2.x (OpenCLIP) with "!" (id 0)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(str(folder))
