"""The o200k vocabulary: the genuine `o200k_base.tiktoken`, and the HF `tokenizer.json` built from it.

gpt-oss uses o200k_base BPE ranks plus its own special tokens (docs/harmony.md §5.1). Harmony reads the
ranks from `o200k_base.tiktoken`; Hugging Face tools read a byte-level BPE `tokenizer.json`.
This module converts between the two so that both work offline:

- `load_o200k()` gets the genuine file (an explicit path, `$TIKTOKEN_ENCODINGS_BASE`, or the copy
  shipped in the `bpe-openai` package) and checks its sha256;
- `tokenizer_json()` builds the `tokenizer.json` the way transformers' `TikTokenConverter` does
  (cached, since the merge list takes a few seconds to derive);
- `tiktoken_from_tokenizer_json()` maps a `tokenizer.json` vocab back to `o200k_base.tiktoken`.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

from oss_mlx.errors import OssMlxError

O200K_FILE = "o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_SIZE = 199998  # BPE ranks 0..199997; ids from 199998 on are special tokens

# tiktoken's o200k_base split pattern (docs/harmony.md §5.1; as openai-harmony defines it).
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# gpt-oss special tokens (docs/harmony.md §5.1); every other id in 199998..201087 is <|reserved_N|>.
# 200018 is named <|endofprompt|> in the HF tokenizer (transformers' gpt-oss tokenizer converter; docs/harmony.md §5.1).
SPECIAL_TOKENS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
    200018: "<|endofprompt|>",
}
VOCAB_SIZE = 201088


def special_tokens() -> dict[int, str]:
    return {i: SPECIAL_TOKENS.get(i, f"<|reserved_{i}|>") for i in range(O200K_SIZE, VOCAB_SIZE)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check(data: bytes, where: str) -> bytes:
    if sha256(data) != O200K_SHA256:
        raise OssMlxError(
            f"{where} is not the genuine o200k_base vocabulary (sha256 {sha256(data)[:12]}..., "
            f"expected {O200K_SHA256[:12]}...)"
        )
    return data


def load_o200k(path: str | os.PathLike | None = None) -> tuple[bytes, str]:
    """The genuine o200k_base.tiktoken bytes and where they came from, offline.

    Order: an explicit file; `$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken` (the variable harmony
    and tiktoken use for offline copies); the copy inside the `bpe-openai` package.
    """
    if path is not None:
        p = Path(path)
        if p.is_dir():
            p = p / O200K_FILE
        if not p.is_file():
            raise OssMlxError(f"vocabulary file not found: {p}")
        return _check(p.read_bytes(), str(p)), str(p)
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base and (Path(base) / O200K_FILE).is_file():
        p = Path(base) / O200K_FILE
        return _check(p.read_bytes(), str(p)), f"$TIKTOKEN_ENCODINGS_BASE ({p})"
    return _bpe_openai_o200k(), "bpe-openai package (offline copy)"


@lru_cache(maxsize=1)
def _bpe_openai_o200k() -> bytes:
    import importlib.util

    # Find the package's data without importing it (its import does work we do not need).
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        raise OssMlxError(
            "no offline copy of o200k_base.tiktoken: install bpe-openai, set TIKTOKEN_ENCODINGS_BASE "
            "to a folder holding o200k_base.tiktoken, or pass --vocab FILE"
        )
    gz = Path(list(spec.submodule_search_locations)[0]) / "data" / "o200k_base.tiktoken.gz"
    if not gz.is_file():
        raise OssMlxError(f"bpe-openai has no o200k_base data at {gz}")
    return _check(gzip.decompress(gz.read_bytes()), str(gz))


def parse_tiktoken(data: bytes) -> list[bytes]:
    """Token bytes by rank (the file lists `base64 rank` lines, ranks 0..n-1 in order)."""
    tokens = []
    for line in data.splitlines():
        if line:
            b64, rank = line.split()
            if int(rank) != len(tokens):
                raise OssMlxError("o200k_base.tiktoken ranks are not contiguous")
            tokens.append(base64.b64decode(b64))
    return tokens


def write_tiktoken(tokens: list[bytes]) -> bytes:
    return b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens))


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by byte-level BPE tokenizers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _to_unicode(token: bytes) -> str:
    enc = bytes_to_unicode()
    return "".join(enc[b] for b in token)


def build_tokenizer_json(tokens: list[bytes]) -> dict:
    """tokenizer.json as transformers' TikTokenConverter writes it for gpt-oss.

    Merges: for every token, every split into two tokens that are in the vocabulary, ordered by
    the rank of the merged token (then of the pieces), exactly as
    `TikTokenConverter.extract_vocab_merges_from_model`; with `ignore_merges` this makes HF's
    BPE pick the same pieces as tiktoken.
    """
    ranks = {t: i for i, t in enumerate(tokens)}
    vocab = {}
    merges = []
    for rank, token in enumerate(tokens):
        vocab[_to_unicode(token)] = rank
        local = []
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in ranks and right in ranks:
                local.append((ranks[left], ranks[right], left, right))
        local.sort()
        merges.extend([_to_unicode(left), _to_unicode(right)] for _, _, left, right in local)
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, s in special_tokens().items()
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": O200K_PATTERN}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": True, "vocab": vocab, "merges": merges,
        },
    }


def tokenizer_json() -> Path:
    """Path of a cached tokenizer.json built from the genuine o200k vocabulary."""
    from oss_mlx.store import home

    cache = home() / "cache" / f"tokenizer-{O200K_SHA256[:16]}.json"
    if not cache.is_file():
        data, _ = load_o200k()
        text = json.dumps(build_tokenizer_json(parse_tiktoken(data)), ensure_ascii=False)
        from oss_mlx.checkpoint.files import atomic_write

        atomic_write(cache, text)  # a concurrent builder never sees half a file
    return cache


def tiktoken_from_tokenizer_json(path: str | os.PathLike) -> bytes:
    """Recover `o200k_base.tiktoken` (bytes) from a byte-level BPE tokenizer.json, sha-checked."""
    try:
        tok = json.loads(Path(path).read_text(encoding="utf-8"))
        vocab = tok["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OssMlxError(f"cannot read the vocabulary from {path}: {e}") from None
    dec = {c: b for b, c in bytes_to_unicode().items()}
    tokens: list[bytes | None] = [None] * O200K_SIZE
    try:
        for s, i in vocab.items():
            if i < O200K_SIZE:
                tokens[i] = bytes(dec[c] for c in s)
    except (KeyError, TypeError):
        raise OssMlxError(f"{path} is not a byte-level BPE tokenizer") from None
    if any(t is None for t in tokens):
        raise OssMlxError(f"{path} does not hold the {O200K_SIZE} o200k_base tokens")
    return _check(write_tiktoken(tokens), f"the vocabulary in {path}")
