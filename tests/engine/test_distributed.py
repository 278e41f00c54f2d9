"""Distributed runs on one machine: mlx.launch, the ring backend over loopback, 2 and 4 ranks.

Oracles: the single-process model and engine (float32) for logits and tokens; the safetensors
headers for the bytes each rank must read; the openai package's own client and types for
`serve`; the processes' own exit for a rank that is killed or stopped.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from oss_mlx.config import ModelConfig

from support import SUPPORT  # noqa: E402
LAUNCH = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
pytestmark = pytest.mark.skipif(
    not __import__("mlx.core", fromlist=["distributed"]).distributed.is_available("ring"),
    reason="MLX built without the ring backend",
)


def free_ports(n: int) -> int:
    """A base port with n free consecutive ports (the ring listens on base .. base + n - 1)."""
    for _ in range(200):
        base = random.randrange(14100, 14990 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def launch(n: int, args: list[str], env: dict | None = None, **popen) -> subprocess.Popen:
    cmd = LAUNCH + ["--python", sys.executable, "--backend", "ring", "-n", str(n),
                    "--hosts", "127.0.0.1", "-p", str(free_ports(n)), "--"] + args
    full_env = {**os.environ, "OSS_MLX_RANK_TIMEOUT": "20", **(env or {})}
    return subprocess.Popen(cmd, env=full_env, text=True, **popen)


def run_launch(n, args, timeout=240, env=None):
    p = launch(n, args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_launch(p)
        raise
    return out, err


def synth_model(tmp_path_factory, name: str, cfg: ModelConfig):
    from oss_mlx.convert import synth as synth_module
    from oss_mlx.convert.convert import convert

    mp = pytest.MonkeyPatch()
    mp.setitem(synth_module.PRESETS, name, cfg)
    try:
        src = synth_module.synth(tmp_path_factory.mktemp("src") / name, preset=name, seed=3)
    finally:
        mp.undo()
    return convert(src, tmp_path_factory.mktemp("mlx") / name)


@pytest.fixture(scope="session")
def uneven_model(tmp_path_factory):
    """The tiny model with 3 mxfp4 groups of experts' rows: on 2 ranks, rank 0 holds 2 of them
    and rank 1 one, so rank 0's share is the larger."""
    from oss_mlx.config import PRESETS

    return synth_model(tmp_path_factory, "uneven", replace(PRESETS["tiny"], intermediate_size=96))


@pytest.fixture(scope="session")
def tiny4_model(tmp_path_factory):
    """A tiny model that 4 ranks can split: 8 query / 4 KV heads, 4 mxfp4 groups of experts'
    intermediate rows, sliding window 8."""
    cfg = ModelConfig(num_hidden_layers=4, num_experts=8, experts_per_token=4, hidden_size=64,
                      intermediate_size=128, head_dim=64, num_attention_heads=8,
                      num_key_value_heads=4, sliding_window=8)
    return synth_model(tmp_path_factory, "tiny4", cfg)


def single_process(folder):
    """Float32 logits (full sequence, then prefill + one token at a time) and greedy tokens."""
    import mlx.core as mx

    from support.dist_worker import GREEDY_PROMPT, PREFILL, TOKENS

    from oss_mlx.engine import Engine, SamplingParams

    engine = Engine.load(str(folder), dtype=mx.float32)
    m = engine.model
    full = m(mx.array([TOKENS[:PREFILL]]))[0]
    cache = m.make_cache()
    steps = [m.prefill(mx.array([TOKENS[:PREFILL]]), cache, chunk_size=5)[0]]
    for t in TOKENS[PREFILL:]:
        steps.append(m(mx.array([[t]]), cache)[0, -1])
    greedy = engine.complete(GREEDY_PROMPT, SamplingParams(temperature=0, max_tokens=12)).tokens
    return np.array(full), np.array(mx.stack(steps)), greedy


def expected_bytes(folder, n: int, rank: int) -> int:
    """Bytes rank `rank` of `n` must read, from the files' headers: every tensor whole, but the
    split ones (attention qkv, sinks, output weights; expert weights; unembedding) 1/n each, and
    the biases added once (attention output, experts' down) only on rank 0."""
    def header_of(path):  # read here, independently of the loader's reader
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        return header

    split = re.compile(r"attention\.(qkv\.|sinks|out\.(weight|scales|biases))|"
                       r"experts\.(gate_up\.|down\.(weight|scales|biases))|unembedding\.")
    once = re.compile(r"attention\.out\.bias|experts\.down\.bias")
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        header = header_of(f)
        for name, info in header.items():
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            if once.search(name):
                total += nbytes if rank == 0 else 0
            elif split.search(name):
                if name.startswith("unembedding"):  # rows ceil(V / n) per rank, the last fewer
                    rows = info["shape"][0]
                    per = -(-rows // n)
                    mine = max(0, min(rows, (rank + 1) * per) - rank * per)
                    total += nbytes * mine // rows
                else:
                    total += nbytes // n
            else:
                total += nbytes
    return total


@pytest.mark.parametrize("n,moe,fixture", [(2, "tp", "tiny_model"), (4, "tp", "tiny4_model"),
                                           (2, "ep", "tiny4_model")])
@pytest.mark.subprocess
def test_sharded_matches_single_process(n, moe, fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    out, err = run_launch(n, [str(SUPPORT / "dist_worker.py"), str(folder), str(tmp_path), moe])
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]
    full, steps, greedy = single_process(folder)
    got = np.load(tmp_path / "logits.npz")
    # Through prefill (in chunks of 5) and 8 single tokens past the window of 8.
    assert np.abs(got["full"] - full).max() <= 1e-5
    assert np.abs(got["steps"] - steps).max() <= 1e-5
    for rep in reports:
        assert rep["size"] == n
        assert rep["greedy"] == greedy
        if moe == "tp":
            assert rep["bytes_read"] == expected_bytes(folder, n, rep["rank"])


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("kv_bits", [8, 4])
def test_generate_json_tokens_two_ranks_kv_bits(tiny_model, kv_bits):
    """--kv-bits under a launch: each rank quantizes its own KV heads (per head vector, so
    the codes are the single process's), and the greedy tokens are the single process's.
    (On this tiny model 8-bit KV gives the float cache's tokens; 4-bit does not, so the
    4-bit run is the one that tells a rank ignoring the flag apart.)"""
    import mlx.core as mx

    from oss_mlx.engine import Engine, SamplingParams
    from oss_mlx.engine.loading import LoadOptions, apply
    from oss_mlx.harmony import build_conversation, user_message

    out, err = run_launch(2, ["-m", "oss_mlx.cli", "generate", "--model", str(tiny_model),
                              "--prompt", "Hello there", "--temperature", "0",
                              "--kv-bits", str(kv_bits),
                              "--max-tokens", "24", "--json"], env={"OSS_MLX_DTYPE": "float32"})
    lines = out.strip().splitlines()
    assert len(lines) == 1, (out, err)  # only rank 0 writes to stdout
    got = json.loads(lines[0])
    engine = Engine.load(str(tiny_model), dtype=mx.float32)
    conv = build_conversation([user_message("Hello there")], reasoning="medium")
    greedy = SamplingParams(temperature=0, max_tokens=24)
    float_kv = engine.complete(conv, greedy).tokens
    engine.reset_cache()
    apply(engine.model, LoadOptions(kv_bits=kv_bits))
    want = engine.complete(conv, greedy).tokens
    assert got["tokens"] == want
    assert got["stats"]["generated_tokens"] == 24
    if kv_bits == 4:
        assert want != float_kv  # the run can tell a rank that ignored --kv-bits


class OneRank:
    """The rank() and size() of a launch's group: loads one rank's share in this process."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def cache_bytes(model, context: int, kv_bits) -> int:
    import mlx.core as mx

    cache = model.make_cache(kv_bits=kv_bits)
    model.prefill(mx.array([[(7 * i) % 1000 for i in range(context)]]), cache, 64, logits=False)
    mx.eval([c.state for c in cache])
    return sum(c.nbytes for c in cache)


@pytest.mark.parametrize("moe,kv_bits", [("tp", None), ("ep", 8)])
def test_rank_plan_is_what_the_sharded_load_holds(tiny_model, moe, kv_bits):
    """A launched rank's memory plan (no launch here): its weights are exactly the nbytes of
    the arrays its sharded load holds, and its KV cache 1/n of the single process's, as the
    caches of the loaded share measure after a prefill."""
    from mlx.utils import tree_flatten

    from oss_mlx.engine import memory
    from oss_mlx.model import load
    from oss_mlx.model.shard import Sharding

    n, context = 2, 300
    single = cache_bytes(load(tiny_model, dtype="bfloat16"), context, kv_bits)
    single_plan = memory.plan_for_folder(tiny_model, context, kv_bits)
    for rank in range(n):
        sharding = Sharding(OneRank(rank, n), moe=moe)
        model = load(tiny_model, dtype="bfloat16", shard=sharding)
        held = sum(v.nbytes for _, v in tree_flatten(model.parameters())) + model._periods.nbytes
        plan = memory.plan_for_rank(tiny_model, rank, n, moe, context, kv_bits)
        assert plan.weights == held
        assert plan.weights < single_plan.weights
        sharding.comm.enabled = False  # collectives as the identity: right shapes, wrong numbers
        measured = cache_bytes(model, context, kv_bits)
        assert measured * n == single
        assert abs(plan.kv * n - single_plan.kv) <= n  # the plan's int() of each share


@pytest.mark.subprocess
@pytest.mark.slow
def test_rank_that_does_not_fit_ends_every_rank(uneven_model):
    """A limit between the two ranks' plans: rank 0 refuses with its own figures, rank 1 ends
    naming rank 0, both before loading, and the launch ends."""
    from oss_mlx.engine import memory

    p0, p1 = (memory.plan_for_rank(uneven_model, r, 2).total for r in (0, 1))
    assert p0 > p1
    t0 = time.monotonic()
    out, err = run_launch(2, ["-m", "oss_mlx.cli", "generate", "--model", str(uneven_model),
                              "--prompt", "Hi", "--max-tokens", "2"], timeout=120,
                          env={"OSS_MLX_MEMORY_LIMIT": str((p0 + p1) // 2)})
    assert time.monotonic() - t0 < 120
    ours = sorted(line for line in err.splitlines() if line.startswith("oss-mlx: error:"))
    assert len(ours) == 2, err
    assert ours[0].startswith(f"oss-mlx: error: rank 0: its share (1/2) of uneven at 131,072 "
                              f"tokens needs {p0 / 1e9:.1f} GB"), ours[0]
    assert ours[1] == ("oss-mlx: error: rank 1: rank 0 cannot hold its share of the model (see "
                       "its error); ending the session")
    assert "Traceback" not in err


class Output:
    """A launch's stdout or stderr, read by a thread so the test can wait for a line."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.closed = threading.Event()  # the stream reached its end
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
        self.closed.set()

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    if re.search(pattern, line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no line matching {pattern!r}: {''.join(self.lines)}")
                self.cond.wait(left)

    @property
    def text(self) -> str:
        with self.cond:
            return "".join(self.lines)


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the launch's rank processes (children of mlx.launch, MLX_RANK set)."""
    ranks = {}
    children = [c for t in Path(f"/proc/{launcher.pid}/task").iterdir()  # mlx.launch starts
                for c in (t / "children").read_text().split()]          # each from a thread
    for child in children:
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for kv in env:
            if kv.startswith(b"MLX_RANK="):
                ranks[int(kv[9:])] = int(child)
    return ranks


def end_launch(launcher: subprocess.Popen, pids: dict | None = None):
    """Kill what is left of a launch: its ranks first (killing mlx.launch alone orphans them)."""
    try:
        pids = {**rank_pids(launcher), **(pids or {})}
    except OSError:  # the launcher is gone already
        pids = pids or {}
    for pid in pids.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    launcher.kill()
    launcher.wait(timeout=30)


def serve_two_ranks(model, env=None):
    port = free_ports(1)
    p = launch(2, ["-m", "oss_mlx.cli", "serve", "--model", str(model), "--port", str(port),
                   "--name", "tiny"], env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = Output(p.stdout), Output(p.stderr)
    try:
        out.wait_for(r"serving 'tiny' at", 180)
    except BaseException:
        end_launch(p)
        raise
    return p, port, out, err


def openai_client(port):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)


@pytest.mark.subprocess
@pytest.mark.slow
def test_serve_two_ranks_answers_openai_then_ends_when_rank1_dies(tiny_model):
    p, port, out, err = serve_two_ranks(tiny_model)
    try:
        client = openai_client(port)
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=6, temperature=0)
        assert r.object == "chat.completion"
        assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
        # A client that leaves mid-stream cancels the generation on every rank at the same
        # token: the next request still runs in lockstep and gives the same answer. (The role
        # chunk comes first, as the generation starts; random weights stream no content. Had
        # the 4000 tokens not been cancelled, the next request would wait for them, well past
        # the client's 60 s timeout.)
        with client.chat.completions.create(model="tiny", stream=True, max_tokens=4000,
                                            messages=[{"role": "user", "content": "Go on"}],
                                            temperature=0) as stream:
            for _ in stream:
                break
        again = client.chat.completions.create(model="tiny", temperature=0, max_tokens=6,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert again.choices[0].message == r.choices[0].message
        assert again.usage.completion_tokens == 6
        # Two requests in flight at once decode as one batch on every rank (rank 0's plan
        # says who joins and when): each gets what it got alone, and the ranks stay in step.
        other = client.chat.completions.create(
            model="tiny", temperature=0, max_tokens=9,
            messages=[{"role": "user", "content": "Tell me more"}])
        with ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda a: client.chat.completions.create(
                model="tiny", temperature=0, max_tokens=a[1],
                messages=[{"role": "user", "content": a[0]}]), [("Hi", 6), ("Tell me more", 9)]))
        assert [b.choices[0].message for b in both] == [r.choices[0].message,
                                                         other.choices[0].message]
        assert [b.usage.completion_tokens for b in both] == [6, 9]
        assert "one at a time" not in err.text  # a launch once served them one by one
        # Idle (no request in flight): rank 1 dies, mlx.launch SIGTERMs rank 0, whose exit
        # hook's STOP meets the lost peer. (That hook once ran on the main thread after serve
        # had released its MLX streams: "There is no Stream(cpu, 1) in current thread".)
        assert_ends_naming_rank1(p, err)
    except BaseException:
        print("STDERR>>>", err.text, "<<<")
        raise
    finally:
        end_launch(p)


# Our two endings of rank 0 when rank 1 is gone: the collective failed, or it did not progress
# within the grace the launch's SIGTERM leaves (MLX 0.32's ring can wait forever on a dead
# peer instead of raising).
RANK1_GONE = (r"^oss-mlx: error: rank 0: (lost the connection to rank 1 \(it ended or cannot "
              r"be reached\)|no answer from rank 1 for \d+ s \(stopped or unreachable\)); "
              r"ending the session$")


def assert_ends_naming_rank1(p, err, within: float = 30):
    """Kill rank 1 of launch `p`: the launch ends within `within` s, mlx.launch names rank 1,
    and rank 0 ends with exactly one line of ours naming rank 1 (no traceback, no MLX error)."""
    os.kill(rank_pids(p)[1], signal.SIGKILL)
    t0 = time.monotonic()
    p.wait(timeout=within)
    assert time.monotonic() - t0 < within
    err.wait_for(r"Node with rank 1 exited with code -9", 5)
    err.wait_for(r"oss-mlx: error: ", 5)
    err.closed.wait(5)  # everything rank 0 wrote is in
    ours = [line for line in err.text.splitlines() if "oss-mlx: error" in line]
    assert len(ours) == 1 and re.match(RANK1_GONE, ours[0]), err.text
    assert "Traceback" not in err.text and "Stream(" not in err.text, err.text
    assert "ERROR" not in err.text, err.text  # e.g. uvicorn's graceful-shutdown timeout


@pytest.mark.subprocess
@pytest.mark.slow
def test_serve_two_ranks_ends_when_rank1_dies_mid_request(tiny_model):
    from openai import APIConnectionError

    p, port, out, err = serve_two_ranks(tiny_model)
    try:
        client = openai_client(port)
        # Random weights rarely stream content: the role chunk says the request is accepted,
        # and with max_tokens 4000 it is still generating when rank 1 is killed.
        killed = False
        with pytest.raises(APIConnectionError):  # the server went away mid-stream
            with client.chat.completions.create(model="tiny", stream=True, max_tokens=4000,
                                                messages=[{"role": "user", "content": "Go"}],
                                                temperature=0) as stream:
                for _ in stream:
                    if not killed:
                        killed = True
                        assert_ends_naming_rank1(p, err)
        assert killed
    finally:
        end_launch(p)


@pytest.mark.subprocess
def test_stopped_rank_ends_rank0_within_the_timeout(tiny_model):
    p, port, out, err = serve_two_ranks(tiny_model, env={"OSS_MLX_RANK_TIMEOUT": "3"})
    pids = rank_pids(p)
    try:
        os.kill(pids[1], signal.SIGSTOP)
        t0 = time.monotonic()
        err.wait_for(r"oss-mlx: error: rank 0: no answer from rank 1 for \d+ s", 30)
        assert time.monotonic() - t0 < 30
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pids[0]}").exists() and time.monotonic() < deadline:
            if Path(f"/proc/{pids[0]}/stat").read_text().split()[2] == "Z":
                break
            time.sleep(0.1)
        assert not Path(f"/proc/{pids[0]}").exists() or \
            Path(f"/proc/{pids[0]}/stat").read_text().split()[2] == "Z"
        assert "Traceback" not in err.text
    finally:
        # mlx.launch waits on the stopped rank it was told to end: kill it for the launch to end.
        end_launch(p, pids)


@pytest.mark.subprocess
def test_bench_two_ranks_reports_communication(tiny_model, tmp_path):
    from oss_mlx.store import read_model_config

    cfg = ModelConfig.from_dict(read_model_config(Path(tiny_model))["model"])
    out, err = run_launch(2, ["-m", "oss_mlx.cli", "bench", "--model", str(tiny_model),
                              "--prompt-tokens", "16", "--gen-tokens", "4", "--chunk-size", "8",
                              "--json", str(tmp_path / "bench.json")])
    r = json.loads((tmp_path / "bench.json").read_text())
    assert r["ranks"] == 2 and len(r["per_rank"]) == 2
    assert r["decode_tps"] > 0 and r["prefill_tps"] > 0 and r["comm_s_per_decoded_token"] >= 0
    # Per decoded token: two float32 [1, 1, hidden] all_sums per layer (attention, experts) and
    # one all_gather of this rank's half of the bf16 logits.
    sums = 2 * cfg.num_hidden_layers * cfg.hidden_size * 4
    gather = -(-cfg.vocab_size // 2) * 2
    assert r["payload_bytes_per_decoded_token"] == sums + gather
    assert r["collectives_per_decoded_token"] == 2 * cfg.num_hidden_layers + 1
    assert r["wire_bytes_per_decoded_token"] == sums + gather  # n = 2: 2 (n-1)/n = 1, n-1 = 1
    assert "decode 4 tokens" in out and "ms/token communicating" in out
    # Memory per rank, measured after load, against the rank's plan and the single process's.
    single = r["single_process_plan"]
    for m in r["per_rank"]:
        assert abs(m["plan_weights_bytes"] - m["weights_bytes"]) <= 2 << 10  # KiB-rounded
        assert m["weights_bytes"] <= m["active_after_load_bytes"] <= m["peak_after_load_bytes"]
        assert m["active_after_load_bytes"] < single["weights"]  # a share, not the whole
        assert 0 < m["rss_after_load_bytes"] and 0 < m["peak_bytes"]
    assert "after load MLX active" in out
