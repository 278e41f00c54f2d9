"""`oss-mlx convert`: an upstream gpt-oss checkpoint -> a self-contained MLX model folder.

What it does (the output format is the project contract; docs/checkpoint.md §3-4):
- reads either upstream layout (HF repo root, or `original/`), local or from the Hub;
- checks every tensor's name, dtype and shape against the config before writing anything;
- expert weights: a lossless repack, no dequantize/requantize: the U8 blocks [E, out, in/32, 16]
  viewed as little-endian uint32 and flattened are MLX's `mxfp4` weight [E, out, in/8] (same
  nibble order, docs/checkpoint.md §4.5); the E8M0 scales are MLX's scales as they are. The gate/up rows are
  de-interleaved (upstream row 2u = gate u, 2u+1 = up u -> gate rows first, then up rows);
  MXFP4 blocks never straddle rows, so this is a pure permutation of bytes;
- dense weights stay bf16, or with `--dense-bits 8` (or 4) attention qkv/out, embedding and
  unembedding are quantized with `mx.quantize` (affine, group 64, 8 or 4 bits);
- streams tensor by tensor in chunks (peak memory is a few chunks, not the model) into a
  temporary folder that is renamed to OUT only when everything succeeded;
- writes `o200k_base.tiktoken` (sha256-checked) so harmony works offline, and a manifest.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oss_mlx.config import ModelConfig
from oss_mlx.errors import OssMlxError

from oss_mlx.checkpoint import layout as L
from oss_mlx.checkpoint import files
from oss_mlx.checkpoint import safetensors as stio
from oss_mlx.convert.progress import Progress
from oss_mlx.checkpoint import vocab

MAX_SHARD_BYTES = 5_000_000_000  # as mlx-lm's save: a few large files, each mmap-friendly
HUB_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tokenizer.json"]


@dataclass
class Source:
    folder: Path
    layout: str  # "hf" | "original" | "mlx-lm"
    config: ModelConfig
    tensors: dict[str, stio.TensorInfo]
    origin: str  # what the user passed (path or Hub id)
    revision: str | None = None
    dense: dict | None = None  # mlx-lm: {module: its affine quantization} (layout.mlx_lm_dense)

    def parts(self, ours, orig, hf, dtype, shape) -> list[tuple[str, str, tuple[int, ...]]]:
        """(source name, dtype, shape) of the tensors that hold our tensor `ours`, in order."""
        if self.layout == "mlx-lm":
            return L.mlx_lm_parts(self.config, ours, hf, dtype, shape, self.dense)
        return [(n, dtype, s) for n, s in L.upstream_parts(self.config, self.layout, orig, hf, shape)]


# ---- reading the source -----------------------------------------------------------------


def _download(repo_id: str) -> tuple[Path, str]:
    """Fetch only the files conversion needs; respects HF_HUB_OFFLINE and the HF cache."""
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError)
    except ImportError:
        raise OssMlxError(f"{repo_id} is not a local folder and huggingface_hub is not installed")
    try:
        path = snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except GatedRepoError:
        raise OssMlxError(f"{repo_id} is gated on the Hugging Face Hub: log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise OssMlxError(f"{repo_id} is neither a local folder nor a model on the Hugging Face Hub") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise OssMlxError(
                f"{repo_id} is not in the local Hugging Face cache and offline mode is on "
                "(HF_HUB_OFFLINE=1): download it once with network access, or pass a local folder"
            ) from None
        raise OssMlxError(
            f"cannot download {repo_id}: the Hugging Face Hub is unreachable (no network?) and it "
            "is not in the local cache; pass a local folder instead"
        ) from None
    except Exception as e:  # noqa: BLE001 - network stacks raise many types; one line for all
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OssMlxError(f"download of {repo_id} failed: {first}") from None
    path = Path(path)
    return path, path.name  # the snapshot folder is named by the commit


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise OssMlxError(f"cannot read {path}: {getattr(e, 'msg', None) or e}") from None
    if not isinstance(d, dict):
        raise OssMlxError(f"{path} is not a gpt-oss config (not a JSON object)")
    return d


def _find_layout(folder: Path) -> tuple[Path, str, ModelConfig]:
    """(checkpoint folder, layout, config) for an HF root, an `original/` folder, or a root
    holding only `original/`."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        if (folder / "original" / "config.json").is_file():
            return _find_layout(folder / "original")
        raise OssMlxError(f"{folder} has no config.json: not a gpt-oss checkpoint folder")
    d = _read_json(cfg_path)
    if "model_type" in d or "architectures" in d:
        return folder, "hf", ModelConfig.from_hf(d)
    if "num_experts" in d and "rope_ntk_alpha" in d:
        return folder, "original", ModelConfig.from_original(d)
    raise OssMlxError(f"{cfg_path} is not a gpt-oss config")


def _load_tensors(folder: Path) -> dict[str, stio.TensorInfo]:
    """Every tensor of the checkpoint, via the index file when there is one."""
    files, weight_map = stio.shard_files(folder)
    index = folder / "model.safetensors.index.json"
    tensors = {}
    for f in files:
        tensors.update(stio.read_header(f))
    if weight_map:
        for name, f in weight_map.items():
            if name not in tensors or tensors[name].file.name != f:
                raise OssMlxError(f"{f} does not hold {name}, although {index.name} says so")
    return tensors


def _check_tensors(src: Source) -> None:
    """Names, dtypes and shapes exactly as the config implies (docs/checkpoint.md §3.1/3.2)."""
    expected = {name: (dtype, shape) for entry in L.entries(src.config)
                for name, dtype, shape in src.parts(*entry)}
    missing = [n for n in expected if n not in src.tensors]
    if missing:
        hint = ""
        if any(n.endswith(("_blocks", ".blocks")) for n in missing) and any(
                n.endswith("gate_up_proj") for n in src.tensors):
            hint = " (this checkpoint has unquantized experts; only MXFP4 checkpoints are supported)"
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise OssMlxError(f"tensor {missing[0]}{more} missing from {src.folder}{hint}")
    for name, (dtype, shape) in expected.items():
        t = src.tensors[name]
        if t.shape != shape:
            raise OssMlxError(f"tensor {name} in {t.file.name} has shape {list(t.shape)}, "
                              f"expected {list(shape)} for this config")
        if t.dtype != dtype:
            raise OssMlxError(f"tensor {name} in {t.file.name} has dtype {t.dtype}, expected {dtype}")


def _normalized(cfg: ModelConfig) -> ModelConfig:
    """Field types as declared (JSON gives `1` in one layout and `1.0` in the other), so both
    layouts convert to byte-identical config.json files."""
    import dataclasses

    try:
        return ModelConfig(**{f.name: type(f.default)(getattr(cfg, f.name))
                              for f in dataclasses.fields(cfg)})
    except (TypeError, ValueError) as e:
        raise OssMlxError(f"not a gpt-oss config: malformed value ({e})") from None


def open_source(src: str | os.PathLike) -> Source:
    """Resolve SRC (local folder or Hub id), detect its layout and check every tensor."""
    from oss_mlx.store import is_hub_id, model_arg, read_model_config

    s = str(src)
    p = Path(s).expanduser()
    revision = None
    if p.is_dir():
        folder = p.resolve()
        if read_model_config(folder) is not None:
            raise OssMlxError(f"{s} is already a converted oss-mlx model: nothing to convert "
                              f"(use it with --model {model_arg(folder)})")
    elif is_hub_id(s):
        folder, revision = _download(s)
    elif p.exists():
        raise OssMlxError(f"{s} is a file; expected a checkpoint folder or a Hub id")
    else:
        raise OssMlxError(f"no such folder: {s}")
    folder, lay, cfg = _find_layout(folder)
    cfg = _normalized(cfg)
    if cfg.hidden_size % 32 or cfg.intermediate_size % 32:  # MXFP4 blocks of 32 inputs
        raise OssMlxError(f"unsupported dimensions hidden={cfg.hidden_size} "
                          f"intermediate={cfg.intermediate_size} (need multiples of 32)")
    source = Source(folder, lay, cfg, _load_tensors(folder), s, revision)
    if lay == "hf" and L.is_mlx_lm(source.tensors):
        source.layout = "mlx-lm"
        try:
            source.dense = L.mlx_lm_dense(cfg, source.tensors)
        except ValueError as e:
            raise OssMlxError(f"{folder}: unsupported mlx-lm quantization ({e})") from None
    _check_tensors(source)
    return source


def _vocabulary(src: Source, vocab_file) -> tuple[bytes, str]:
    """o200k_base.tiktoken for the output, and a note on where it came from."""
    if vocab_file is not None:
        return vocab.load_o200k(vocab_file)
    candidates = [src.folder / "tokenizer.json"]
    if src.layout == "original":  # `repo/original/`: the repo root may have the tokenizer
        candidates.append(src.folder.parent / "tokenizer.json")
    for tok in candidates:
        if tok.is_file():
            return vocab.tiktoken_from_tokenizer_json(tok), f"derived from {tok}"
    data, where = vocab.load_o200k()
    print(f"oss-mlx: note: {src.folder} has no tokenizer.json ({src.layout} layout); "
          f"using o200k_base.tiktoken from {where}, sha256 verified", file=sys.stderr)
    return data, where


# ---- producing the output tensors -------------------------------------------------------


def _concat_bytes(parts: list[stio.TensorInfo]):
    for t in parts:
        yield from stio.iter_bytes(t)


def _row_chunks(parts: list[stio.TensorInfo], row_bytes: int):
    """The rows of `parts` stacked along axis 0, as uint8 arrays of whole rows (<= CHUNK)."""
    rows = max(1, stio.CHUNK // row_bytes)
    for t in parts:
        n = t.nbytes // row_bytes
        for r in range(0, n, rows):
            k = min(rows, n - r)
            yield np.frombuffer(stio.read_bytes(t, r * row_bytes, k * row_bytes),
                                dtype=np.uint8).reshape(k, row_bytes)


def _deinterleave_experts(t: stio.TensorInfo, row_bytes: int):
    """Per expert: rows (2u = gate u, 2u+1 = up u) -> [gate rows..., up rows...]."""
    per_expert = t.nbytes // t.shape[0]
    for e in range(t.shape[0]):
        x = np.frombuffer(stio.read_bytes(t, e * per_expert, per_expert), dtype=np.uint8)
        x = x.reshape(-1, 2, row_bytes)  # [I, (gate, up), row]
        yield np.ascontiguousarray(x.transpose(1, 0, 2))


def _quantize_rows(parts: list[stio.TensorInfo], cols: int, bits: int = 8):
    """mx.quantize(affine, 64, bits) of bf16 rows, chunk by chunk (groups lie within a row, so
    chunking rows gives the same result); yields the weight, then scales, then biases."""
    import mlx.core as mx

    scales, biases = [], []
    for rows in _row_chunks(parts, cols * 2):
        w = mx.array(rows.view(np.uint16)).view(mx.bfloat16)
        wq, s, b = mx.quantize(w, group_size=L.DENSE_Q8["group_size"], bits=bits)
        mx.eval(wq, s, b)
        yield np.array(wq)
        scales.append(np.array(s.view(mx.uint16)))
        biases.append(np.array(b.view(mx.uint16)))
    yield from scales
    yield from biases


def _per_expert(parts: list[stio.TensorInfo]):
    """Per expert, the expert's slice of each part in turn (mlx-lm's gate rows, then up rows)."""
    for e in range(parts[0].shape[0]):
        for t in parts:
            per_expert = t.nbytes // t.shape[0]
            yield stio.read_bytes(t, e * per_expert, per_expert)


def _mlx_lm_job(src: Source, entry) -> stio.Job:
    """One of our tensors from an mlx-lm folder: a pure byte copy (its experts are already MLX
    mxfp4, its quantized modules already MLX affine), so the conversion is lossless."""
    ours, shape = entry[0], entry[4]
    parts = [src.tensors[n] for n, _, _ in src.parts(*entry)]
    T = stio.TensorInfo
    lf = L.leaf(ours)
    if lf in L.MLX_LM_EXPERTS:
        kind, names = L.MLX_LM_EXPERTS[lf]
        out_shape = (parts[0].shape[0], sum(t.shape[1] for t in parts)) + parts[0].shape[2:]
        produce = (lambda p=parts: _per_expert(p)) if len(names) > 1 else (lambda p=parts: _concat_bytes(p))
        return stio.Job([T(ours, kind, out_shape)], produce)
    module = L.module_of(ours)
    if src.dense is not None and module in src.dense:
        stem = ours[: -len(".weight")]
        n = len(parts) // 3
        rows = sum(t.shape[0] for t in parts[:n])
        out = [T(ours, "U32", (rows, parts[0].shape[1])),
               T(f"{stem}.scales", "BF16", (rows, parts[n].shape[1])),
               T(f"{stem}.biases", "BF16", (rows, parts[2 * n].shape[1]))]
        return stio.Job(out, lambda p=parts: _concat_bytes(p))
    return stio.Job([T(ours, entry[3], shape)], lambda p=parts: _concat_bytes(p))


def _jobs(src: Source, dense_bits: int) -> list[stio.Job]:
    cfg = src.config
    if src.layout == "mlx-lm":
        return [_mlx_lm_job(src, entry) for entry in L.entries(cfg)]
    quantized = {f"{m}.weight" for m in L.DENSE_Q8["modules"]} if dense_bits < 16 else set()
    jobs = []
    for ours, orig, hf, dtype, shape in L.entries(cfg):
        parts = [src.tensors[n] for n, _, _ in src.parts(ours, orig, hf, dtype, shape)]
        spec = L.spec(ours)
        T = stio.TensorInfo
        if f"{L.leaf(ours)}" in quantized:
            rows, cols = shape
            stem = ours[: -len(".weight")]
            out = [T(ours, "U32", (rows, cols * dense_bits // 32)),
                   T(f"{stem}.scales", "BF16", (rows, cols // 64)),
                   T(f"{stem}.biases", "BF16", (rows, cols // 64))]
            produce = (lambda p=parts, c=cols: _quantize_rows(p, c, dense_bits))
        else:
            # MXFP4 blocks U8 [.., in/32, 16] are MLX's U32 [.., in/8]: the same bytes.
            out_shape = shape[:-2] + (shape[-2] * shape[-1] // 4,) if spec.stored == "U32" else shape
            out = [T(ours, spec.stored or dtype, out_shape)]
            if spec.transform == "deinterleave":
                row_bytes = math.prod(shape[2:]) * stio.ITEMSIZE[dtype]
                produce = (lambda t=parts[0], rb=row_bytes: _deinterleave_experts(t, rb))
            else:  # bytes as stored (HF q/k/v concatenated into the fused qkv rows q | k | v)
                produce = (lambda p=parts: _concat_bytes(p))
        jobs.append(stio.Job(out, produce))
    return jobs


# ---- the command ------------------------------------------------------------------------


def _check_out(src: Source, out: Path, force: bool) -> None:
    from oss_mlx.store import converted_from, model_arg, read_model_config

    s, o = src.folder.resolve(), out.resolve()
    if o == s or o in s.parents or s in o.parents:
        raise OssMlxError(f"output {out} overlaps the source {src.folder}")
    if out.exists():
        other = converted_from(out) if read_model_config(out) is not None else None
        if not force and other is not None and other.resolve() != s:
            raise OssMlxError(f"{out} already exists and holds another model (converted from "
                              f"{other}): pass -o FOLDER, or --force to replace it")
        if not force and read_model_config(out) is not None:
            raise OssMlxError(f"{out} already exists: use it with --model {model_arg(out)} "
                              f"(or convert again with --force to replace it)")
        if not force:
            raise OssMlxError(f"{out} already exists (use --force to replace it)")
        if read_model_config(out) is None and not (out.is_dir() and not any(out.iterdir())):
            raise OssMlxError(f"{out} exists and is not an oss-mlx model folder; not replacing it")


def _mlx_lm_dense_choice(source: Source, dense_bits: int) -> dict | None:
    """An mlx-lm folder's dense weights are copied as they are, each module's quantization
    kept: say so, and refuse a --dense-bits that would need a lossy requantization. Returns
    config.json's quantization.dense."""
    from oss_mlx.config import describe_dense

    dense = L.dense_config(source.dense)
    kinds = {(q["bits"], q["group_size"]) for q in (source.dense or {}).values()}
    have = (f"{dense['mode']} {dense['bits']}-bit, group {dense['group_size']}"
            if len(kinds) == 1 else describe_dense(dense))
    if dense_bits < 16 and kinds != {(dense_bits, 64)}:
        raise OssMlxError(f"{source.folder} is an mlx-lm folder with {have} dense weights; it is "
                          f"converted losslessly as it is: leave out --dense-bits {dense_bits}")
    print(f"oss-mlx: note: {source.folder} is an mlx-lm gpt_oss folder: converting it losslessly "
          f"(experts already mxfp4, dense weights kept {have})", file=sys.stderr)
    return dense


def convert(src, out=None, dense_bits: int = 16, force: bool = False, vocab_file=None) -> Path:
    """Convert `src` (folder or Hub id) into the MLX model folder `out` (default: the store)."""
    from oss_mlx import __version__
    from oss_mlx.config import dense_bits as dense_bits_of
    from oss_mlx.store import store_path_for

    if dense_bits not in L.DENSE_BITS:
        raise OssMlxError(f"--dense-bits must be 16, 8 or 4, not {dense_bits}")
    source = open_source(src)
    c = source.config
    dense = L.dense_quantization(dense_bits)
    if source.layout == "mlx-lm":
        dense = _mlx_lm_dense_choice(source, dense_bits)
    if dense_bits < 16 and (c.hidden_size % 64 or (c.num_attention_heads * c.head_dim) % 64):
        raise OssMlxError(f"--dense-bits {dense_bits} needs hidden size and attention width "
                          "divisible by 64")
    out = Path(out).expanduser() if out is not None else store_path_for(src, dense_bits)
    _check_out(source, out, force)
    tiktoken, vocab_from = _vocabulary(source, vocab_file)
    jobs = _jobs(source, dense_bits)
    total = sum(j.nbytes for j in jobs)
    files.disk_check(out.parent, total + len(tiktoken) + (1 << 20))

    import mlx.core as mx

    with files.AtomicFolder(out, replace=force) as tmp:
        with Progress(total, f"convert -> {out.name}") as advance:
            hashes = stio.write_shards(
                tmp, jobs, MAX_SHARD_BYTES, lambda i, n: f"model-{i + 1:05d}-of-{n:05d}.safetensors",
                metadata={"format": "mlx"}, on_bytes=advance)
        config = {
            "model_type": "gpt_oss", "format": "oss-mlx", "format_version": 1,
            "model": source.config.to_dict(),
            "quantization": {"experts": dict(L.EXPERTS_MXFP4),
                             "dense": dense},
            "dtype": "bfloat16",
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / vocab.O200K_FILE).write_bytes(tiktoken)
        listed = {}
        for f in sorted(tmp.iterdir()):
            sha = hashes.get(f.name) or stio.file_sha256(f)
            listed[f.name] = {"sha256": sha, "bytes": f.stat().st_size}
        manifest = {
            "format": "oss-mlx", "format_version": 1,
            "source": source.origin, "source_folder": str(source.folder),
            "source_layout": source.layout, "source_revision": source.revision,
            "dense_bits": dense_bits_of(dense),
            "vocabulary": {"file": vocab.O200K_FILE, "from": vocab_from, "sha256": vocab.O200K_SHA256},
            "versions": {"oss-mlx": __version__, "mlx": mx.__version__,
                         "python": platform.python_version()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": listed,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def add_arguments(parser) -> None:
    parser.add_argument("src", metavar="SRC",
                        help="HF repo folder, `original/` folder, or Hub id (openai/gpt-oss-20b)")
    parser.add_argument("-o", "--out", metavar="OUT", default=None,
                        help="output folder (default: the local model store, see `oss-mlx list`)")
    parser.add_argument("--dense-bits", type=int, choices=list(L.DENSE_BITS), default=16,
                        help="16: bf16 dense weights (default); 8 or 4: 8-/4-bit "
                             "attention/embeddings (affine, group 64)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--vocab", metavar="FILE", default=None,
                        help="o200k_base.tiktoken to use (default: from the source tokenizer, "
                             "else $TIKTOKEN_ENCODINGS_BASE, else the bpe-openai copy)")


def main(args) -> int:
    out = convert(args.src, args.out, dense_bits=args.dense_bits, force=args.force,
                  vocab_file=args.vocab)
    print(out)
    return 0
