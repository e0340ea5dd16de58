"""CPU decode at the memory-bandwidth limit: bf16 (eager step vs the compiled whole step), int8, int4, against
the memory-read limit measured in the same run, transformers bf16 and llama.cpp.

    python benchmarks/bench_quant.py                     # 2 decoder layers of the 7B shape, 3 repeats
    python benchmarks/bench_quant.py --repeats 1 --no-llamacpp

Model and inputs as benchmarks/bench_cpu.py: the LLaVA-NeXT-Video-7B-shaped random checkpoint (2 decoder
layers of the 7B shape, real vocabulary), one generate of 65 tokens over the same ~1,200 prompt
embeddings; decode = tokens 2..65 (tokens/s), and GB/s = (decoder weights in the provider's format + the
KV cache at the mean length) x tokens/s. The int8 / int4 checkpoints are written by ``convert
--quantize`` from the same bf16 checkpoint (cached beside it). Providers alternate run by run with the
memory-read probe (a 512 MB ``sum``), so a busy spell slows the limit as much as the providers.

The whole-step compiled decode is measured for each format in ``--compiled-steps``. Its compile cost:
"cold" is the first compile with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR set to a fresh
directory for this process), "warm" (bf16) a fresh child process compiling the same graph with that
cache filled. Load rows include the CPU prepack (bf16) / the int4 repack: what a process pays before
its first prompt.

Agreement (a mechanics figure: random weights, not a quality claim): relative max error of the
prefill's last logits against the bf16 model, and greedy agreement over 64 tokens with the bf16 eager
step (positions equal / 64, the first position that differs, and there: the bf16 run's top-1 - top-2
logit margin against the largest logit difference between the two runs, same prefix; a margin below
the difference is a near-tie flipped by rounding).

Decode products: each format decodes with the one-row product ``policy.gemv_choice`` measured fastest on
this CPU at first use (model/policy.py; the report's first lines give the choice and the rates it was
made on); the providers "... (torch's decode)" run the same model with ``LLAVA_NEXT_GEMV=torch`` (bf16: a
second copy loaded that way, oneDNN-prepacked), "... (C decode)" with ``LLAVA_NEXT_GEMV=kernel``, so both
paths are timed in the same alternation whichever one the policy picked.

llama.cpp: ../shared/tools/llamacpp-anchor.sh builds llama-bench and the GGUF files (BF16 / Q8_0 / Q4_0 at the
same shapes; once, ~5 minutes). Its llama-bench of each format is a provider of the alternation, run right
beside our run of that format in every round (one prefill of the prompt, one 64-token decode at that depth,
--threads threads): the table gives the ratio per round, since this machine's memory speed moves by tens of
percent from one minute to the next. Results: benchmarks/results/quant.csv and quant.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__" and "--child" not in sys.argv:  # a fresh inductor cache: the first compile is cold
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="llava-next-inductor-"))

import torch

from bench_cpu import alternate
from cpu_limits import ReadProbe
from cpu_models import bench_config, load_hf, load_ours, make_checkpoints, prompt_ids
from common import append_csv
from cpu_report import FIELDS, Report

# ../shared/tools/ beside the repository (/work/main -> /work/shared), also from a worktree (/work/wt/NAME)
ANCHOR = next((p for p in (Path(__file__).resolve().parents[n] / "shared" / "tools" / "llamacpp-anchor.sh"
                           for n in (2, 3)) if p.is_file()), Path("llamacpp-anchor.sh"))


@contextlib.contextmanager
def gemv(setting: str):
    """``LLAVA_NEXT_GEMV`` set to ``setting`` for the block (read at load for bf16, per call for int8 / int4)."""
    old = os.environ.get("LLAVA_NEXT_GEMV")
    os.environ["LLAVA_NEXT_GEMV"] = setting
    try:
        yield
    finally:
        if old is None:
            del os.environ["LLAVA_NEXT_GEMV"]
        else:
            os.environ["LLAVA_NEXT_GEMV"] = old


A8 = ("int8, int8 activations", "int4, int8 activations")  # the runs with --activations int8


def with_int8_activations(model, fn):
    """``fn`` with ``model``'s int8 / int4 layers taking int8 activations (model/quant.py), then back."""
    from llava_next.model.quant import set_activations

    def run():
        set_activations(model, "int8")
        try:
            return fn()
        finally:
            set_activations(model, "float")
    return run


def with_gemv(setting: str, fn):
    def run():
        with gemv(setting):
            return fn()
    return run


def decode_bytes(cfg, kv_len: float, method: str | None) -> float:
    """Bytes read per decoded token: decoder linears in the format, norms, one embedding row, KV cache (bf16)."""
    from llava_next.model.quant_model import weight_bytes
    t = cfg.text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    shapes = [(q, t.hidden_size), (kv, t.hidden_size), (kv, t.hidden_size), (t.hidden_size, q),
              (t.intermediate_size, t.hidden_size), (t.intermediate_size, t.hidden_size),
              (t.hidden_size, t.intermediate_size)]
    linears = t.num_layers * sum(weight_bytes(s, method, 2) for s in shapes)
    linears += weight_bytes((t.vocab_size, t.hidden_size), method, 2)
    other = 2 * (t.num_layers * 2 * t.hidden_size + 2 * t.hidden_size)
    return linears + other + 2 * t.num_layers * kv_len * kv * 2


def quantized_dir(ours_dir: Path, method: str) -> Path:
    from llava_next_weights.convert import convert
    out = ours_dir.parent / f"llava-next-{method}"
    if not (out / "config.json").is_file():
        convert(ours_dir, out, quantize=method, overwrite=True, progress=False)
    return out


def load_quantized(path: Path):
    from llava_next.model.llava import LlavaNextModel
    from llava_next_weights.load import load_into, read_config
    from llava_next_weights.quantize import prepare_quantized
    with torch.device("meta"):
        model = LlavaNextModel(read_config(path))
    prepare_quantized(model, path, torch.bfloat16)
    load_into(model, path, dtype=torch.bfloat16).eval()
    model.pack_for_cpu()  # the float layers left (vision, projector)
    return model


def ours_generate(model, embeds, n: int, compile_step: bool, logits: list | None = None) -> list[float]:
    """Time stamps (start, then one per token) and the greedy tokens; ``logits`` collects each step's
    (V,) fp32 logits through the decoder's forward hook (which both decode paths call)."""
    from llava_next.model.generate import stream
    dec = model.language_model
    handle = None if logits is None else dec.register_forward_hook(
        lambda m, a, out: logits.append(out[0, -1].float().clone()))
    stamps, tokens = [time.perf_counter()], []
    try:
        for tok in stream(dec, input_embeds=embeds, max_new_tokens=n, eos_token_id=(), compile_step=compile_step):
            stamps.append(time.perf_counter())
            tokens.append(int(tok[0]))
    finally:
        if handle is not None:
            handle.remove()
    return stamps, tokens


def divergence(ref_tokens: list[int], ref_logits: list, tokens: list[int], logits: list) -> dict:
    """Where two greedy runs first differ, and why: the reference's top-1 - top-2 logit margin there
    against the largest difference between the two runs' logits at that step (same prefix up to it).
    A margin smaller than the difference is a near-tie flipped by rounding, not a wrong computation."""
    same = [a == b for a, b in zip(tokens, ref_tokens)]
    first = same.index(False) if False in same else len(same)
    out = {"agreement": sum(same) / len(same), "first": first}
    if first < len(same):  # logits[0] is the prefill's (token 0), logits[i] chose token i
        top2 = ref_logits[first].topk(2).values
        out["margin"] = float(top2[0] - top2[1])
        out["diff"] = float((logits[first] - ref_logits[first]).abs().max())
    return out


def theirs_generate(model, embeds, n: int):
    from transformers import LogitsProcessor

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    stamps = [time.perf_counter()]
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, logits_processor=[Stamp()],
                             pad_token_id=0)
    return stamps, out[0, -n:].tolist()


def child_compile(args) -> None:
    """In a fresh process: load, prefill, time the first compiled step (warm: the parent filled the cache)."""
    from llava_next.model.engines import CompiledStepEngine
    _, ours_dir = make_checkpoints(bench_config(args.layers))
    model = load_ours(ours_dir, torch.bfloat16)
    dec = model.language_model
    T, n = 1200, args.decode_tokens + 1
    engine = CompiledStepEngine()
    engine.setup_caches(dec, 1, T, n, torch.bfloat16, torch.device("cpu"))
    embeds = torch.randn(1, T, dec.config.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        tok = engine.prefill(dec, embeds, torch.arange(T)[None], None).argmax(-1)
    t = time.perf_counter()
    engine.decode(dec, tok, 0, torch.tensor([[T]]))
    print(json.dumps({"compile_s": time.perf_counter() - t}))


LLAMACPP_FORMATS = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}  # ours -> the anchor's GGUF format


def llamacpp_bench(layers: int, prompt: int) -> Path | None:
    """The anchor's llama-bench, built (with the GGUF files of every format) by running the anchor script once
    (~5 minutes the first time, then cached); None when it cannot be built (its error printed)."""
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "llamacpp-anchor"  # the script's default WORKDIR
    bench = work / "src/vendor/llama.cpp/build/bin/llama-bench"
    if not (bench.is_file() and all((work / f"model-{layers}l-{t}.gguf").is_file() for t in LLAMACPP_FORMATS.values())):
        out = subprocess.run(["bash", str(ANCHOR), str(layers), str(prompt)], capture_output=True, text=True)
        if out.returncode:
            print(f"llama.cpp anchor failed: {out.stderr[-300:]}", file=sys.stderr)
            return None
    return bench


class LlamaBench:
    """One call: llama.cpp's prefill of ``prompt`` tokens and its 64-token decode at that depth, one repetition
    each, on the anchor's GGUF file of one format with ``threads`` threads. A provider of the alternation, so
    each of its runs sits beside ours in the same round: the ratio is taken per round, in the same minute of
    this machine (whose memory speed swings by tens of percent between minutes)."""

    def __init__(self, bench: Path, layers: int, fmt: str, prompt: int, threads: int) -> None:
        self.bench, self.prompt, self.threads = bench, prompt, threads
        self.model = bench.parents[5] / f"model-{layers}l-{fmt}.gguf"
        self.env = dict(os.environ, LD_LIBRARY_PATH=str(bench.parent))

    def rate(self, *flags: str) -> float:
        r = subprocess.run([str(self.bench), "-m", str(self.model), "-t", str(self.threads), "-r", "1", *flags,
                            "-o", "csv"], capture_output=True, text=True, env=self.env, check=True)
        return float(r.stdout.strip().splitlines()[-1].replace('"', "").split(",")[-2])  # avg_ts

    def __call__(self) -> dict[str, float]:
        return {"prefill": self.rate("-p", str(self.prompt), "-n", "0"),
                "decode": self.rate("-p", "0", "-n", "64", "-d", str(self.prompt))}


def prefill_s(entry) -> float:
    """Seconds to the first token of one alternation entry (seconds, (time stamps, tokens))."""
    stamps = entry[1][0]
    return stamps[1] - stamps[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--compiled-steps", default="bf16,int8,int4",
                   help="formats whose whole-step compiled decode is measured ('' for none)")
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from llava_next.model import policy
    if "LLAVA_NEXT_COMPILE" not in os.environ:  # steady-state decode attention: the C loop where the policy picks
        # it (no compile), else the compiled formula (compiled during the warm-up, not timed)
        os.environ["LLAVA_NEXT_COMPILE"] = "auto" if policy.attention_in_c(torch.bfloat16) else "1"
    if args.child:
        return child_compile(args)
    cfg = bench_config(args.layers)
    hf_dir, ours_dir = make_checkpoints(cfg)
    report = Report()
    n = args.decode_tokens + 1
    steps = [f for f in args.compiled_steps.split(",") if f]

    t = time.perf_counter()
    models = {"bf16": load_ours(ours_dir, torch.bfloat16)}  # mmap + assign, then the oneDNN prepack
    report.add("load + prepack (2-layer checkpoint, page cache warm)", "llava-next", "bf16", time.perf_counter() - t, "s")
    for method in ("int8", "int4"):
        t = time.perf_counter()
        path = quantized_dir(ours_dir, method)
        report.add(f"convert --quantize {method} (0 when cached)", "llava-next", method, time.perf_counter() - t, "s")
        t = time.perf_counter()
        models[method] = load_quantized(path)
        report.add("load + repack", "llava-next", method, time.perf_counter() - t, "s")
    # the decode product this CPU uses per format (measured now if it has no entry yet), and the other one
    other = {fmt: "torch" if policy.gemv_choice(fmt) == "kernel" else "kernel" for fmt in policy.GEMV_FORMATS}
    label = {"torch": "torch's decode", "kernel": "C decode"}
    with gemv(other["bf16"]):
        models["bf16 other"] = load_ours(ours_dir, torch.bfloat16)
    hf = None if args.no_transformers else load_hf(hf_dir, torch.bfloat16)

    ids = prompt_ids(cfg)
    T = ids.shape[1]
    embeds = torch.randn(1, T, cfg.text.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16() * 0.5

    # warm-ups: the decode attention compile (eager path), the whole-step compiles (bf16 cold, timed)
    for name in ("bf16", "int8", "int4"):
        ours_generate(models[name], embeds[:, :32], 3, compile_step=False)
        with gemv(other[name]):  # the other decode product (int4 with torch's: its layout is built here)
            ours_generate(models["bf16 other" if name == "bf16" else name], embeds[:, :32], 3, compile_step=False)
    for name in steps:
        t = time.perf_counter()
        ours_generate(models[name], embeds, 2, compile_step=True)
        report.add("compile whole step, cold (+ prefill + 1 token)", "llava-next", name, time.perf_counter() - t, "s")
    if "bf16" in steps:
        out = subprocess.run([sys.executable, __file__, "--child", "--layers", str(args.layers),
                              "--decode-tokens", str(args.decode_tokens)], capture_output=True, text=True,
                             cwd=Path(__file__).parent, env=dict(os.environ))
        if out.returncode == 0:
            report.add("compile whole step, warm (fresh process)", "llava-next", "bf16",
                       json.loads(out.stdout.strip().splitlines()[-1])["compile_s"], "s")
        else:
            print(out.stderr[-2000:], file=sys.stderr)
    if hf is not None:
        theirs_generate(hf, embeds[:, :32], 3)

    alt = {fmt: f"{'bf16 eager' if fmt == 'bf16' else fmt} ({label[other[fmt]]})" for fmt in policy.GEMV_FORMATS}
    # llama.cpp's run of a format right after ours in each round (before it in the reversed rounds)
    bench = None if args.no_llamacpp or not ANCHOR.is_file() else llamacpp_bench(args.layers, T)
    theirs = {fmt: {} if bench is None else {f"llama.cpp {g}": LlamaBench(bench, args.layers, g, T, args.threads)}
              for fmt, g in LLAMACPP_FORMATS.items()}
    fns = {"bf16 eager": lambda: ours_generate(models["bf16"], embeds, n, False), **theirs["bf16"],
           alt["bf16"]: lambda: ours_generate(models["bf16 other"], embeds, n, False),
           "int8": lambda: ours_generate(models["int8"], embeds, n, False), **theirs["int8"],
           alt["int8"]: with_gemv(other["int8"], lambda: ours_generate(models["int8"], embeds, n, False)),
           "int8, int8 activations": with_int8_activations(models["int8"],
                                                           lambda: ours_generate(models["int8"], embeds, n, False)),
           "int4": lambda: ours_generate(models["int4"], embeds, n, False), **theirs["int4"],
           "int4, int8 activations": with_int8_activations(models["int4"],
                                                           lambda: ours_generate(models["int4"], embeds, n, False)),
           alt["int4"]: with_gemv(other["int4"], lambda: ours_generate(models["int4"], embeds, n, False)),
           "memory read": ReadProbe()}
    for name in steps:
        fns[f"{name} compiled step"] = lambda name=name: ours_generate(models[name], embeds, n, True)
    if hf is not None:
        fns["transformers bf16"] = lambda: theirs_generate(hf, embeds, n)
    runs = alternate(fns, args.repeats)
    read = [fns["memory read"].bytes / s / 1e9 for s, _ in runs["memory read"]]
    report.add("memory read", "torch", "-", read, "GB/s")
    fmt = {"bf16 eager": None, alt["bf16"]: None, "bf16 compiled step": None, "int8": "int8", alt["int8"]: "int8",
           "int8, int8 activations": "int8",
           "int8 compiled step": "int8", "int4": "int4", alt["int4"]: "int4", "int4, int8 activations": "int4",
           "int4 compiled step": "int4",
           "transformers bf16": None}
    decode, prefill_tok = {}, {}
    for name, method in fmt.items():
        if name not in runs:
            continue
        per_token = decode_bytes(cfg, T + n / 2, method)
        tok_s = [(n - 1) / (st[-1] - st[1]) for _, (st, _) in runs[name]]
        pre = [st[1] - st[0] for _, (st, _) in runs[name]]
        report.add("prefill", name, method or "bf16", pre, "s")
        prefill_tok[name] = report.add("prefill", name, method or "bf16", [T / x for x in pre], "tokens/s")
        decode[name] = report.add("decode", name, method or "bf16", tok_s, "tokens/s")
        report.add("decode", name, method or "bf16", [per_token * x / 1e9 for x in tok_s], "GB/s")
        report.add("decode, share of the memory read", name, method or "bf16",
                   [per_token * x / 1e9 / r for x, r in zip(tok_s, read)], "fraction")

    for name in ("int8", *A8[:1], "int4", *A8[1:]):  # quantized prompts against ours in bf16, same rounds
        report.add("prefill time of bf16 eager / this, paired by round", name, fmt[name],
                   [prefill_s(a) / prefill_s(b) for a, b in zip(runs["bf16 eager"], runs[name])],
                   "x")

    # llama.cpp at the same shapes, its runs paired with ours round by round
    paired = {}  # ours -> (llama.cpp format, [(our decode, theirs, our prefill, theirs) per round])
    for ours_name, g, name in (("bf16", "BF16", "bf16 eager"), ("int8", "Q8_0", "int8"),
                               ("int8", "Q8_0", "int8, int8 activations"), ("int4", "Q4_0", "int4"),
                               ("int4", "Q4_0", "int4, int8 activations")):
        if f"llama.cpp {g}" not in runs:
            continue
        rates = [out for _, out in runs[f"llama.cpp {g}"]]
        if name not in A8:  # (the same llama.cpp runs as the weight-only format's)
            report.add("prefill", f"llama.cpp {g}", ours_name, [r["prefill"] for r in rates], "tokens/s")
            report.add("decode", f"llama.cpp {g}", ours_name, [r["decode"] for r in rates], "tokens/s")
        paired[name] = (g, [((n - 1) / (st[-1] - st[1]), r["decode"], T / (st[1] - st[0]), r["prefill"])
                            for (_, (st, _)), r in zip(runs[name], rates)])
        report.add("decode ratio to llama.cpp, paired by round", name, ours_name,
                   [a / b for a, b, _, _ in paired[name][1]], "x")
        report.add("prefill ratio to llama.cpp, paired by round", name, ours_name,
                   [c / d for _, _, c, d in paired[name][1]], "x")

    # agreement with the bf16 eager model, and why tokens differ (mechanics on random weights)
    from llava_next.model.engines import EagerEngine
    recorded = {}
    for name, (model, step) in {"bf16 eager": (models["bf16"], False), "int8": (models["int8"], False),
                                "int8, int8 activations": (models["int8"], False), "int4": (models["int4"], False),
                                "int4, int8 activations": (models["int4"], False),
                                **{f"{m} compiled step": (models[m], True) for m in steps}}.items():
        lg: list = []
        gen = lambda: ours_generate(model, embeds, n - 1, step, lg)  # noqa: E731 (model, step, lg: this pass's)
        _, toks = (with_int8_activations(model, gen) if name in A8 else gen)()
        recorded[name] = (toks, lg)
    ref_tokens, ref_logits = recorded["bf16 eager"]
    for name, method in (("int8", "int8"), ("int8, int8 activations", "int8"), ("int4", "int4"),
                         ("int4, int8 activations", "int4")):
        dec = models[method].language_model
        dec.setup_caches(1, T)
        ref_dec = models["bf16"].language_model
        ref_dec.setup_caches(1, T)
        prefill = lambda: EagerEngine().prefill(dec, embeds, torch.arange(T)[None], None).float()  # noqa: E731
        with torch.no_grad():
            q = (with_int8_activations(models[method], prefill) if name in A8 else prefill)()
            ref = EagerEngine().prefill(ref_dec, embeds, torch.arange(T)[None], None).float()
        report.add("logit error vs bf16 (rel. max)", name, method, ((q - ref).abs().max() / ref.abs().max()).item(), "rel")
    divergences = {}
    for name, (toks, lg) in recorded.items():
        if name == "bf16 eager":
            continue
        d = divergences[name] = divergence(ref_tokens, ref_logits, toks, lg)
        report.add(f"greedy agreement vs bf16 eager, {n - 1} tokens", name, fmt[name] or "bf16", d["agreement"], "fraction")
        report.add("first differing token", name, fmt[name] or "bf16", d["first"], "index")
        if "margin" in d:
            report.add("  there: bf16 eager's top-1 - top-2 logit margin", name, fmt[name] or "bf16", d["margin"], "logit")
            report.add("  there: largest logit difference from bf16 eager", name, fmt[name] or "bf16", d["diff"], "logit")

    csv = append_csv("quant.csv", FIELDS, report.rows)
    load = os.getloadavg()[0]
    lines = [f"`python benchmarks/bench_quant.py` — {args.layers} decoder layers of the 7B shape, random weights, "
             f"~{T}-token prompt, {args.decode_tokens} decoded tokens, {args.repeats} repeats, "
             f"{torch.get_num_threads()} threads; {report.context['machine']}; commit {report.context['commit']}; "
             f"load average {load:.1f} at the end", ""]
    if paired:
        lines += ["llama.cpp's run of each format sits beside ours in every round; the ratio is taken per round "
                  "(median, and the lowest and highest round):", "",
                  "| format | llava-next decode tok/s | llama.cpp | decode ratio (min-max) | llava-next prefill tok/s "
                  "| llama.cpp | prefill ratio (min-max) |", "|---|---|---|---|---|---|---|"]
        for name, (g, rounds) in paired.items():
            ours_dec, their_dec, ours_pre, their_pre = (statistics.median(col) for col in zip(*rounds))
            dec, pre = [a / b for a, b, _, _ in rounds], [c / d for _, _, c, d in rounds]
            lines.append(f"| {name} vs {g} | {ours_dec:.1f} | {their_dec:.1f} | {statistics.median(dec):.2f} "
                         f"({min(dec):.2f}-{max(dec):.2f}) | {ours_pre:.0f} | {their_pre:.0f} | "
                         f"{statistics.median(pre):.2f} ({min(pre):.2f}-{max(pre):.2f}) |")
        lines.append("")
    lines += ["| stage | provider | format | p50 | unit | p20 | p80 |", "|---|---|---|---|---|---|---|"]
    for r in report.rows:
        lines.append(f"| {r['stage']} | {r['provider']} | {r['dtype']} | {r['value']:.4g} | {r['unit']} | "
                     f"{r['p20'] if r['p20'] == '' else format(r['p20'], '.4g')} | "
                     f"{r['p80'] if r['p80'] == '' else format(r['p80'], '.4g')} |")
    md = "\n".join(lines) + "\n"
    (csv.parent / "quant.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
