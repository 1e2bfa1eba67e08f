"""A BERT text encoder in plain PyTorch (Devlin et al. 2019), for the packaged all-MiniLM-L6-v2 and any
BERT folder with config.json, model.safetensors and tokenizer.json.

The math and the module names are those of transformers' BertModel, so the same weights load and the
LoRA files of its attention keep their keys; what it saves is importing transformers, about 3 of the
5 seconds a text-to-image command spends starting on a 2-core CPU. The tokenizer is the `tokenizers`
library's (the Rust one behind transformers' fast tokenizers) reading the folder's tokenizer.json.

    model, tokenizer = load_bert(folder, tokenizer_folder)   # None where the folder is not such a BERT
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.files import read_tensors

# the [CLS] pooler and a masked-LM head are not used for conditioning; position_ids is a buffer
UNUSED_KEYS = ("pooler.", "cls.", "embeddings.position_ids")


@dataclass
class BertConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1


class BertOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # [B, L, D], as transformers' output names it


class Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        types = torch.zeros_like(ids)  # one sentence: every token is of type 0
        return self.dropout(self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings(types)))


class SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads, self.dropout = c.num_attention_heads, c.attention_probs_dropout_prob
        self.query, self.key, self.value = (nn.Linear(c.hidden_size, c.hidden_size) for _ in range(3))

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        b, n, d = h.shape
        q, k, v = (layer(h).view(b, n, self.heads, d // self.heads).transpose(1, 2) for layer in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, n, d)


class AddNorm(nn.Module):
    """dense, dropout, then LayerNorm of the sum with the block's input (BERT's post-norm residual)."""

    def __init__(self, c: BertConfig, width: int):
        super().__init__()
        self.dense = nn.Linear(width, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = SelfAttention(c)  # (transformers' name: attention.self.query, ...)
        self.output = AddNorm(c, c.hidden_size)

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(h, keep), h)


class Intermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(h))  # BERT's "gelu" is the exact erf form


class Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention, self.intermediate, self.output = Attention(c), Intermediate(c), AddNorm(c, c.intermediate_size)

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        h = self.attention(h, keep)
        return self.output(self.intermediate(h), h)


class Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))


class BertTextModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings, self.encoder = Embeddings(config), Encoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> BertOutput:
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # keys a token may attend to
        h = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            h = layer(h, keep)
        return BertOutput(h)


class BertTokenizer:
    """tokenizer.json through `tokenizers`, called like transformers' tokenizers for what TextEncoder asks of them.

    A `tokenizers.Tokenizer` holds its padding and truncation as settings, so each setting gets its own copy
    (made once, under a lock): the server's threads may tokenize at the same time."""

    def __init__(self, path: Path, model_max_length: int):
        self.json, self.model_max_length = path.read_text(), model_max_length
        settings = json.loads(self.json)
        self.pad_id = (settings.get("padding") or {}).get("pad_id", 0)
        added = settings.get("added_tokens") or []  # transformers' names for what attention maps leave out: [CLS], [SEP], [PAD]
        self.all_special_ids = [t["id"] for t in added if t.get("special")]
        self.unk_token_id = next((t["id"] for t in added if t.get("content") == "[UNK]"), None)
        self.variants, self.lock = {}, threading.Lock()

    def variant(self, max_length: int | None, pad: bool):
        """The tokenizer that truncates to max_length (None: never) and pads to it (pad)."""
        with self.lock:
            if (max_length, pad) not in self.variants:
                from tokenizers import Tokenizer

                tokenizer = Tokenizer.from_str(self.json)  # (tokenizer.json's own settings are replaced by these)
                if max_length is None:
                    tokenizer.no_truncation()
                else:
                    tokenizer.enable_truncation(max_length)  # counts [CLS] and [SEP] in, as transformers does
                if pad:
                    tokenizer.enable_padding(length=max_length, pad_id=self.pad_id)
                else:
                    tokenizer.no_padding()
                self.variants[(max_length, pad)] = tokenizer
            return self.variants[(max_length, pad)]

    def __call__(self, prompts: list[str], padding: str | bool = False, truncation: bool = False, max_length: int | None = None,
                 return_tensors: str | None = None) -> dict:
        limit = max_length if truncation and max_length else None
        encodings = self.variant(limit, padding == "max_length" and limit is not None).encode_batch(prompts)
        out = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings]}
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()} if return_tensors == "pt" else out

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """The token of each id, as the vocabulary spells it (word pieces keep their '##')."""
        tokenizer = self.variant(None, False)
        return [tokenizer.id_to_token(i) for i in ids]


def read_bert_config(folder: Path) -> BertConfig | None:
    """The folder's BERT settings, or None where it is not a BERT that this module runs."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if raw.get("model_type") != "bert" or raw.get("position_embedding_type", "absolute") != "absolute" or raw.get("hidden_act", "gelu") != "gelu":
        return None
    fields = dataclasses.fields(BertConfig)
    if any(f.name not in raw for f in fields if f.default is dataclasses.MISSING):
        return None
    return BertConfig(**{f.name: raw[f.name] for f in fields if f.name in raw})


def load_bert(model_folder: Path, tokenizer_folder: Path) -> tuple[BertTextModel, BertTokenizer] | None:
    """(model, tokenizer) for a BERT folder with model.safetensors and tokenizer.json; None for any other encoder."""
    config, weights, vocab = read_bert_config(model_folder), model_folder / "model.safetensors", tokenizer_folder / "tokenizer.json"
    if config is None or not weights.is_file() or not vocab.is_file():
        return None
    try:
        settings = json.loads((tokenizer_folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        settings = {}
    model = BertTextModel(config)
    state = {k.removeprefix("bert."): v for k, v in read_tensors(weights).items()}  # (BertForMaskedLM-style folders prefix their keys)
    try:
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith(UNUSED_KEYS)})
    except RuntimeError:  # a BERT variant with other parts: transformers runs it
        return None
    return model, BertTokenizer(vocab, int(settings.get("model_max_length", config.max_position_embeddings)))
