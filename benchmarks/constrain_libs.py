"""Grammar libraries for constrained decoding, measured on the real o200k (harmony) vocabulary.

    python benchmarks/constrain_libs.py --model MODEL [--libs llguidance,outlines_core,xgrammar]

MODEL: any converted folder (only its vocabulary is read), e.g. `oss-mlx synth tiny-ck --preset
tiny && oss-mlx convert tiny-ck -o tiny`, then `--model tiny`.

For each library and each schema: the time to compile the grammar for the 201,088-token
vocabulary (one-off per tokenizer + per schema), and the per-token cost while writing a valid
instance (compute the next-token bitmask, then advance by the sampled token), mean and p99 over
the tokens of the instance. Then a JSON Schema coverage table: which keywords each library
compiles (a keyword it silently ignores would not show here; the coverage check also samples
whether a compiled grammar rejects an instance that breaks the keyword).

xgrammar imports torch at module level (for its tensor helpers); where torch is absent a stub
module stands in, which is enough for its CPU mask path (numpy arrays through DLPack).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

VOCAB = 201088
from oss_mlx.checkpoint.vocab import O200K_PATTERN  # noqa: E402  (the one copy of tiktoken's pattern)

SCHEMAS = {
    "tool_args": ({
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            "where": {"type": "object", "properties": {"lat": {"type": "number"},
                                                         "lon": {"type": "number"}},
                      "required": ["lat", "lon"], "additionalProperties": False},
        },
        "required": ["city", "unit", "where"],
        "additionalProperties": False,
    }, {"city": "San Francisco, California", "unit": "celsius", "days": 7,
        "tags": ["weekend", "hiking trip", "fog"], "where": {"lat": 37.7749, "lon": -122.4194}}),
    "json_object": ({"type": "object"},
                    {"answer": "The capital of France is Paris.", "confidence": 0.97,
                     "sources": ["encyclopedia", "atlas"], "ok": True, "n": None}),
}

# keyword -> (schema, an instance that breaks it); None: nothing simple breaks it.
COVERAGE = {
    "enum": ({"enum": ["a", "b"]}, "c"),
    "const": ({"const": "x"}, "y"),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {}),
    "additionalProperties:false": ({"type": "object", "properties": {"a": {"type": "integer"}},
                                    "additionalProperties": False}, {"b": 1}),
    "nested object": ({"type": "object", "properties": {"o": {"type": "object", "properties": {
        "x": {"type": "boolean"}}, "required": ["x"]}}, "required": ["o"]}, {"o": {}}),
    "array items": ({"type": "array", "items": {"type": "integer"}}, ["a"]),
    "minItems/maxItems": ({"type": "array", "minItems": 1, "maxItems": 2}, []),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                     "items": False}, ["a", "b"]),
    "uniqueItems": ({"type": "array", "uniqueItems": True, "items": {"type": "integer"}}, [1, 1]),
    "contains": ({"type": "array", "contains": {"type": "integer"}}, ["a"]),
    "type list": ({"type": ["string", "null"]}, 1),
    "anyOf": ({"anyOf": [{"type": "string"}, {"type": "integer"}]}, True),
    "oneOf": ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, True),
    "allOf": ({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                         {"required": ["a"]}]}, {}),
    "$ref/$defs": ({"$defs": {"p": {"type": "integer"}}, "type": "object",
                    "properties": {"a": {"$ref": "#/$defs/p"}}, "required": ["a"]}, {"a": "x"}),
    "recursive $ref": ({"$defs": {"n": {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "additionalProperties": False}},
        "$ref": "#/$defs/n"}, {"kids": [{"x": 1}]}),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 3}, "a"),
    "pattern": ({"type": "string", "pattern": "^[a-z]+[0-9]$"}, "abc"),
    "format:date-time": ({"type": "string", "format": "date-time"}, "yesterday"),
    "format:date": ({"type": "string", "format": "date"}, "2024-13-45x"),
    "format:email": ({"type": "string", "format": "email"}, "not an email"),
    "format:uuid": ({"type": "string", "format": "uuid"}, "1234"),
    "format:ipv4": ({"type": "string", "format": "ipv4"}, "999.1"),
    "format:uri": ({"type": "string", "format": "uri"}, "no spaces allowed"),
    "minimum/maximum": ({"type": "integer", "minimum": 1, "maximum": 5}, 9),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0}, 0),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 7),
    "minProperties/maxProperties": ({"type": "object", "minProperties": 1}, {}),
    "patternProperties": ({"type": "object", "patternProperties": {"^x": {"type": "integer"}},
                           "additionalProperties": False}, {"xa": "s"}),
    "propertyNames": ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}, {"A1": 1}),
    "dependentRequired": ({"type": "object", "dependentRequired": {"a": ["b"]}}, {"a": 1}),
    "if/then/else": ({"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}}, -1),
    "not": ({"not": {"type": "string"}}, "s"),
}


def load_vocab(model_dir: Path):
    """Token bytes for ids 0..199997 from the .tiktoken file, special names for the rest."""
    ranks: dict[bytes, int] = {}
    for line in (model_dir / "o200k_base.tiktoken").read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from oss_mlx.harmony import load_encoding

    enc = load_encoding(model_dir)
    specials = {enc.decode([i]): i for i in range(len(ranks), VOCAB)}
    return enc, ranks, specials


# ---- one adapter per library: compile(schema) -> matcher; mask(matcher, buf); advance(matcher, t)


class LLGuidance:
    name = "llguidance"

    def __init__(self, ranks, specials):
        import llguidance

        self.ll = llguidance
        self.tok = llguidance.LLTokenizer.from_tiktoken(
            encoder=ranks, special_tokens=specials, pattern=O200K_PATTERN, eos_token=200002,
            n_vocab=VOCAB)

    def compile(self, schema):
        g = self.ll.LLMatcher.grammar_from_json_schema(schema)
        err = self.ll.LLMatcher.validate_grammar(g, self.tok)
        if err:
            raise ValueError(err)
        return self.ll.LLMatcher(self.tok, g, log_level=0)

    def mask(self, m, buf):
        m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes)

    def advance(self, m, t):
        return m.consume_token(t)

    def accepting(self, m):
        return m.is_accepting()


class OutlinesCore:
    name = "outlines_core"

    def __init__(self, ranks, specials):
        import outlines_core

        self.oc = outlines_core
        vocab: dict[bytes, list[int]] = {}
        for b, i in ranks.items():
            vocab.setdefault(b, []).append(i)
        self.vocab = outlines_core.Vocabulary(200002, vocab)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def mask(self, m, buf):
        m.write_mask_into(buf.ctypes.data, buf.size, buf.itemsize)

    def advance(self, m, t):
        m.advance(t)
        return True

    def accepting(self, m):
        return m.is_finished()


class XGrammar:
    name = "xgrammar"

    def __init__(self, ranks, specials):
        try:
            import torch  # noqa: F401
        except ImportError:
            sys.modules["torch"] = _torch_stub()
        import xgrammar

        self.xg = xgrammar
        vocab = [b""] * VOCAB
        for b, i in ranks.items():
            vocab[i] = b
        for s, i in specials.items():
            vocab[i] = s.encode()
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=VOCAB,
                                      stop_token_ids=[200002])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)

    def compile(self, schema):
        return self.xg.GrammarMatcher(self.compiler.compile_json_schema(json.dumps(schema),
                                                                       any_whitespace=True,
                                                                       separators=(",", ":")))

    def mask(self, m, buf):
        m.fill_next_token_bitmask(buf[None])

    def advance(self, m, t):
        return m.accept_token(t)

    def accepting(self, m):
        return m.is_terminated() or m.accept_token(200002)


def _torch_stub():
    mod = types.ModuleType("torch")

    class _Any:
        def __getattr__(self, name):
            return _Any()

        def __call__(self, *a, **k):
            return _Any()

    import importlib.machinery

    mod.__spec__ = importlib.machinery.ModuleSpec("torch", None, is_package=True)
    mod.__path__ = []
    mod.__version__ = "2.5.0"  # a package, so `import torch.x` finds nothing instead of failing oddly
    mod.__getattr__ = lambda name: _Any()  # type: ignore[attr-defined]
    mod.Tensor = type("Tensor", (), {})
    return mod


ADAPTERS = {"llguidance": LLGuidance, "outlines_core": OutlinesCore, "xgrammar": XGrammar}


def measure(lib, enc, schema, instance, repeats: int):
    text = json.dumps(instance, separators=(",", ":"))
    tokens = enc.encode(text, allowed_special=set())
    t = time.perf_counter()
    m = lib.compile(schema)
    compile_s = time.perf_counter() - t
    buf = np.zeros((VOCAB + 31) // 32, dtype=np.int32)
    per_token = []
    for _ in range(repeats):
        m = lib.compile(schema)
        for tok in tokens:
            t = time.perf_counter()
            lib.mask(m, buf)
            allowed = (buf[tok // 32] >> (tok % 32)) & 1
            ok = lib.advance(m, tok)
            per_token.append(time.perf_counter() - t)
            if not allowed or not ok:
                raise RuntimeError(f"{lib.name} rejected token {tok} of a valid instance")
    return compile_s, per_token, len(tokens)


def coverage(lib, enc):
    row = {}
    for kw, (schema, bad) in COVERAGE.items():
        try:
            m = lib.compile(schema)
        except Exception as e:  # noqa: BLE001 - we tabulate the failure
            row[kw] = "error: " + str(e).splitlines()[0][:60]
            continue
        row[kw] = "ok" if _rejects(lib, m, enc, bad) else "compiles, bad instance NOT rejected"
    return row


def _rejects(lib, m, enc, bad) -> bool:
    buf = np.zeros((VOCAB + 31) // 32, dtype=np.int32)
    for tok in enc.encode(json.dumps(bad, separators=(",", ":")), allowed_special=set()):
        lib.mask(m, buf)
        if not (buf[tok // 32] >> (tok % 32)) & 1 or not lib.advance(m, tok):
            return True
    return not lib.accepting(m)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a converted model folder (its vocabulary)")
    ap.add_argument("--libs", default=",".join(ADAPTERS))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    enc, ranks, specials = load_vocab(Path(args.model))
    print(f"vocabulary: {len(ranks)} byte tokens + {len(specials)} specials = {len(ranks) + len(specials)}")
    table = {}
    for name in args.libs.split(","):
        t = time.perf_counter()
        try:
            lib = ADAPTERS[name](ranks, specials)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: unavailable: {e}")
            continue
        print(f"\n{name}: tokenizer setup {time.perf_counter() - t:.2f} s")
        for sname, (schema, inst) in SCHEMAS.items():
            try:
                comp, per, n = measure(lib, enc, schema, inst, args.repeats)
            except Exception as e:  # noqa: BLE001
                print(f"  {sname}: FAILED: {e}")
                continue
            per_ms = sorted(x * 1e3 for x in per)
            print(f"  {sname}: compile {comp * 1e3:.1f} ms; {n} tokens; mask+advance mean "
                  f"{statistics.mean(per_ms):.3f} ms, median {statistics.median(per_ms):.3f} ms, "
                  f"p99 {per_ms[int(0.99 * (len(per_ms) - 1))]:.3f} ms, max {per_ms[-1]:.3f} ms")
        table[name] = coverage(lib, enc)
    if table:
        print("\nJSON Schema coverage (ok = compiles and rejects a breaking instance)")
        names = list(table)
        print(f"  {'keyword':30s} " + " ".join(f"{n:36s}" for n in names))
        for kw in COVERAGE:
            print(f"  {kw:30s} " + " ".join(f"{table[n][kw][:36]:36s}" for n in names))
        for n in names:
            print(f"  {n}: {sum(v == 'ok' for v in table[n].values())}/{len(COVERAGE)} ok")


if __name__ == "__main__":
    main()
