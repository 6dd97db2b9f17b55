"""Which decode-shaped quantized matmul does XLA:CPU run without a float copy of the weight (issue 18, item 1)?

    python benchmarks/cpu_int8_dot.py                      # F 2048 [D, F] and the 270M unembedding [V, D]
    python benchmarks/cpu_int8_dot.py --sizes 2048 --rounds 100
    python benchmarks/cpu_int8_dot.py --hlo CASE           # print one case's compiled entry computation

x [B, D] float32 (B 1 and 8, D 640) times a weight stored as float32, bfloat16, float16, int8 or int4
with one float32 scale per output channel. "2048" is a projection stored [D, F]; "262144" is the
270M's tied embedding [V, D] used as the unembedding (contracting D on both sides, as the model does).

Each case is a formulation (how the product is written) x compiler options (`jax.jit(...,
compiler_options=...)`). For each, the compiled HLO is read back: "weight copy" is an instruction of
the entry computation, other than the parameter, with the weight's element count (a convert of the
whole weight into f32 / s32 / s8 that the dot then reads: what decode pays every step). "reads"
names the instruction that consumes the stored weight: a YNNPACK library fusion (`__ynn_fusion`,
XLA:CPU's default for dots in this jaxlib), a oneDNN one, or XLA's own `dot`; "+convert" when a
convert of the whole weight sits inside that library fusion (no XLA buffer; YNNPACK tiles it).

Times are medians of `--rounds` calls per case after warm-up, the cases of one (size, batch)
interleaved in a fresh random order every round, so that a shared CPU loads them alike and no case
always follows the same neighbour; the ratio is to the float32 case of the same rounds. A weight that
fits this CPU's L3 (the 2048 size) is evicted before each call by reading 96 MiB (`--warm`: not),
since a decode step finds each layer's weight in DRAM. One call includes jax's dispatch (~10-20 us), the same for every case. Errors are
max |out - ref| with ref = x @ w in float64 on the float weight ("err") and on the format's own
dequantized weight ("arith": what the formulation adds beyond the weight's rounding), both over
max |ref|.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

D = 640
YNN = "xla_cpu_experimental_ynn_fusion_type"
XNN = "xla_cpu_experimental_xnn_fusion_type"
ONEDNN = "xla_cpu_experimental_onednn_fusion_type"
DOT, IDOT = "LIBRARY_FUSION_TYPE_DOT", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"

OPTIONS = {  # name -> compiler options
    "default": {},
    "ynn off": {YNN: ""},
    "ynn=DOT": {YNN: DOT},
    "ynn=DOT,INDIVIDUAL_DOT": {YNN: f"{DOT},{IDOT}"},
    "onednn=DOT (ynn off)": {YNN: "", ONEDNN: DOT, "xla_cpu_use_onednn": True},
    "xnn=DOT (ynn off)": {YNN: "", XNN: DOT, "xla_cpu_use_xnnpack": True},
}


# -- formulations: f(x [B, D] f32, w, scale [F] f32) -> [B, F] f32; `nt` when w is [F, D] ----------
def _dims(nt: bool):
    return (((1,), (1 if nt else 0,)), ((), ()))


def _quantize_rows(x):
    """Dynamic symmetric int8 per row: x ~ xq * xs, xq int8 [B, D], xs [B, 1]."""
    xs = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
    xq = jnp.clip(jnp.round(x / jnp.where(xs > 0, xs, 1.0)), -127, 127).astype(jnp.int8)
    return xq, xs


def f32_dot(x, w, s, nt):
    return lax.dot_general(x, w, _dims(nt))


def weight_only(x, w, s, nt):  # (a): qeinsum's weight-only form; also (d) on an int4 weight
    return lax.dot_general(x, w.astype(jnp.float32), _dims(nt)) * s


def int8_dot(x, w, s, nt):  # (b): int8 activations x int8 weight, int32 accumulation
    xq, xs = _quantize_rows(x)
    y = lax.dot_general(xq, w, _dims(nt), preferred_element_type=jnp.int32)
    return y.astype(jnp.float32) * xs * s


def int4_as_int8_dot(x, w, s, nt):  # (d): the int4 weight widened to int8, then (b)
    return int8_dot(x, w.astype(jnp.int8), s, nt)


def int4_dot(x, w, s, nt):  # (d): int8 activations x the int4 weight as stored
    xq, xs = _quantize_rows(x)
    y = lax.dot_general(xq, w, _dims(nt), preferred_element_type=jnp.int32)
    return y.astype(jnp.float32) * xs * s


def half_dot(x, w, s, nt):  # (e): x cast to the weight's 16-bit type, f32 accumulation
    return lax.dot_general(x.astype(w.dtype), w, _dims(nt), preferred_element_type=jnp.float32)


def half_upcast(x, w, s, nt):  # (e): the 16-bit weight cast to f32 in the program
    return lax.dot_general(x, w.astype(jnp.float32), _dims(nt))


def two_rows(fn):
    """fn with a 1-row x padded to 2 rows (and the output sliced back): YNNPACK takes no dot with
    m == 1 (`IsDotSupportedByYnn`: "YNNPACK does not handle vectors in dots"), so at B 1 XLA's own
    matrix-vector dot runs instead, on a converted copy of a quantized weight."""
    def padded(x, w, s, nt):
        if x.shape[0] != 1:
            return fn(x, w, s, nt)
        return fn(jnp.concatenate([x, jnp.zeros_like(x)]), w, s, nt)[:1]
    padded.__name__ = fn.__name__ + "_2rows"
    return padded


# (label, formulation, weight format, options)
CASES = [
    ("f32  x @ w", f32_dot, "f32", "default"),
    ("f32  x @ w", f32_dot, "f32", "ynn off"),
    ("f32  x @ w, B 1 padded to 2", two_rows(f32_dot), "f32", "default"),
    ("(a) int8 x @ w8.astype(f32) * s", weight_only, "int8", "default"),
    ("(a) int8 x @ w8.astype(f32) * s", weight_only, "int8", "ynn=DOT"),
    ("(a) int8 x @ w8.astype(f32) * s, B 1 padded", two_rows(weight_only), "int8", "ynn=DOT"),
    ("(a) int8 x @ w8.astype(f32) * s", weight_only, "int8", "onednn=DOT (ynn off)"),
    ("(b) int8 xq . w8 -> s32", int8_dot, "int8", "default"),
    ("(b) int8 xq . w8 -> s32, B 1 padded", two_rows(int8_dot), "int8", "default"),
    ("(b) int8 xq . w8 -> s32", int8_dot, "int8", "ynn=DOT"),
    ("(b) int8 xq . w8 -> s32, B 1 padded", two_rows(int8_dot), "int8", "ynn=DOT,INDIVIDUAL_DOT"),
    ("(b) int8 xq . w8 -> s32", int8_dot, "int8", "onednn=DOT (ynn off)"),
    ("(b) int8 xq . w8 -> s32", int8_dot, "int8", "xnn=DOT (ynn off)"),
    ("(d) int4 x @ w4.astype(f32) * s", weight_only, "int4", "default"),
    ("(d) int4 x @ w4.astype(f32) * s, B 1 padded", two_rows(weight_only), "int4", "ynn=DOT"),
    ("(d) int4 xq . w4.astype(s8) -> s32, B 1 padded", two_rows(int4_as_int8_dot), "int4", "default"),
    ("(d) int4 xq . w4 -> s32", int4_dot, "int4", "default"),
    ("(e) bf16 x.astype(bf16) . w -> f32", half_dot, "bf16", "default"),
    ("(e) bf16 x.astype(bf16) . w -> f32, B 1 padded", two_rows(half_dot), "bf16", "default"),
    ("(e) bf16 x @ w.astype(f32), B 1 padded", two_rows(half_upcast), "bf16", "ynn=DOT"),
    ("(e) f16 x.astype(f16) . w -> f32", half_dot, "f16", "default"),
    ("(e) f16 x @ w.astype(f32), B 1 padded", two_rows(half_upcast), "f16", "ynn=DOT"),
]


# -- weights ---------------------------------------------------------------------------------------
def make_weights(w: np.ndarray, nt: bool) -> dict:
    """{format: (stored weight, scale [F] f32 or None, deq(lo, hi) -> output channels lo:hi of the
    format's dequantized weight in float64, laid out as w)} for a float32 weight w."""
    axis = 1 if nt else 0  # the contracted axis

    def channels(a, lo, hi):
        return a[lo:hi] if nt else a[:, lo:hi]

    out = {"f32": (jnp.asarray(w), None, lambda lo, hi: channels(w, lo, hi).astype(np.float64))}
    for name, dt in (("bf16", jnp.bfloat16), ("f16", jnp.float16)):
        h = jnp.asarray(w, dt)
        out[name] = (h, None, lambda lo, hi, h=h: np.asarray(channels(h, lo, hi).astype(jnp.float32), np.float64))
    for name, qmax, dt in (("int8", 127, jnp.int8), ("int4", 7, jnp.int4)):
        s = (np.max(np.abs(w), axis=axis, keepdims=True) / qmax).astype(np.float32)
        q = np.clip(np.round(w / np.where(s > 0, s, 1)), -qmax, qmax).astype(np.int8)
        out[name] = (jnp.asarray(q).astype(dt), jnp.asarray(s.reshape(-1)),
                     lambda lo, hi, q=q, s=s: channels(q, lo, hi).astype(np.float64) * channels(s, lo, hi))
    return out


def product64(x: np.ndarray, deq, f: int, nt: bool, chunk: int = 16384) -> np.ndarray:
    """x @ the weight that `deq` yields, in float64, a chunk of output channels at a time."""
    x64 = x.astype(np.float64)
    return np.concatenate([x64 @ (deq(lo, lo + chunk).T if nt else deq(lo, lo + chunk))
                           for lo in range(0, f, chunk)], axis=1)


# -- reading the compiled HLO ----------------------------------------------------------------------
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\S+?)\((.*)$")


def _computations(text: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
        if m:
            name = "ENTRY" if line.startswith("ENTRY") else m.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name:
            comps[name].append(line)
    return comps


def weight_reads(text: str, weight_elems: int) -> tuple[str, str]:
    """(weight copy, reader) of a compiled module whose parameter 1 is the weight."""
    comps = _computations(text)
    instrs = [m.groups() for m in map(_INSTR.match, comps["ENTRY"]) if m]
    wname = next(n for n, _, _, op, rest in instrs if op == "parameter" and rest.startswith("1)"))
    copies = [f"{n} {dt}[{dims}]" for n, dt, dims, op, _ in instrs
              if op != "parameter" and dims and np.prod([int(d) for d in dims.split(",")]) == weight_elems]
    reader = "?"
    for n, dt, dims, op, rest in instrs:
        if re.search(rf"%{re.escape(wname)}[,)]", rest):
            kind = re.search(r'"kind":"(__\w+)"', rest)
            reader = kind.group(1) if kind else (re.search(r"kind=(\w+)", rest) or [None, op])[1] + f" {n}"
            called = re.search(r"calls=%([\w.\-]+)", rest)
            if kind and called and any(" convert(" in l and re.search(r"\[[\d,]+\]", l) and
                                       np.prod([int(d) for d in re.search(r"\[([\d,]+)\]", l).group(1).split(",")]) == weight_elems
                                       for l in comps.get(called.group(1), [])):
                reader += " +convert"
            break
    return ("yes: " + ", ".join(copies)) if copies else "no", reader


# -- the run ---------------------------------------------------------------------------------------
_FLUSH = np.ones(96 << 18, np.float32)  # 96 MiB, 3x this CPU's L3: read before each timed call (cold)


def run_size(f: int, batches, rounds: int, rng, cold: bool = True) -> list[dict]:
    nt = f > D * 16  # the unembedding is stored [V, D]; a projection [D, F]
    shape = (f, D) if nt else (D, f)
    w = (rng.standard_normal(shape, np.float32) * 0.05).astype(np.float32)
    weights = make_weights(w, nt)
    rows = {i: {"case": c, "size": f"{f} [{'V, D' if nt else 'D, F'}]"} for i, c in enumerate(CASES)}
    for b in batches:
        x = rng.standard_normal((b, D), np.float32)
        ref = product64(x, weights["f32"][2], f, nt)
        scale = np.max(np.abs(ref))
        fns, arith_refs = {}, {}
        for i, (label, fn, fmt, opt) in enumerate(CASES):
            wq, s, deq = weights[fmt]
            s = s if s is not None else jnp.ones((f,), jnp.float32)
            jf = jax.jit(lambda x, w, s, fn=fn: fn(x, w, s, nt), compiler_options=OPTIONS[opt])
            args = (jnp.asarray(x), wq, s)
            try:
                text = jf.lower(*args).compile().as_text()
            except Exception as e:  # an option this jaxlib rejects
                rows[i][f"B{b}"] = None
                rows[i]["note"] = str(e).splitlines()[0][:60]
                continue
            copy, reader = weight_reads(text, f * D)
            out = np.asarray(jf(*args), np.float64)
            if fmt not in arith_refs:
                arith_refs[fmt] = product64(x, deq, f, nt)
            arith = np.max(np.abs(out - arith_refs[fmt])) / scale
            rows[i].setdefault("copy", {})[b] = copy
            rows[i].setdefault("reader", {})[b] = reader
            rows[i][f"err{b}"] = (np.max(np.abs(out - ref)) / scale, arith)
            for _ in range(3):
                jf(*args).block_until_ready()
            fns[i] = (jf, args)
        times = {i: [] for i in fns}
        flush = cold and f * D * 4 < _FLUSH.nbytes
        for r in range(rounds):
            for i in rng.permutation(list(fns)):
                jf, args = fns[i]
                if flush:
                    _FLUSH.sum()
                t0 = time.perf_counter()
                jf(*args).block_until_ready()
                times[i].append(time.perf_counter() - t0)
        base = statistics.median(times[0])
        for i, t in times.items():
            rows[i][f"B{b}"] = (statistics.median(t) * 1e6, statistics.median(t) / base)
        del fns
    return list(rows.values())


def _one(d: dict):
    vals = list(d.values())
    return vals[0] if all(v == vals[0] for v in vals) else "; ".join(f"B{k}: {v}" for k, v in d.items())


def print_table(rows, batches) -> None:
    head = ["size", "formulation", "options", "weight copy (entry HLO)", "weight read by"]
    for b in batches:
        head += [f"B={b} us", f"B={b} x f32"]
    head += ["err (vs f32 w)", "arith"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        label, _, fmt, opt = r["case"]
        cells = [r["size"], label, opt, _one(r.get("copy", {0: r.get("note", "-")})), _one(r.get("reader", {0: "-"}))]
        for b in batches:
            t = r.get(f"B{b}")
            cells += [f"{t[0]:,.0f}", f"{t[1]:.2f}"] if t else ["-", "-"]
        e = r.get(f"err{batches[-1]}")
        cells += [f"{e[0]:.1e}", f"{e[1]:.1e}"] if e else ["-", "-"]
        print("| " + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 262144], help="F (or V for the [V, D] unembedding)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=60, help="timed calls per case (median)")
    p.add_argument("--warm", action="store_true", help="time with the weight left in the caches (default: read "
                   "96 MiB before each call, as a decode step finds a layer's weight in DRAM)")
    p.add_argument("--hlo", type=int, default=None, metavar="CASE", help="print the entry HLO of case CASE (0-based) at the first size and batch")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, D {D}; cases interleaved, {args.rounds} calls each")
    if args.hlo is not None:
        label, fn, fmt, opt = CASES[args.hlo]
        f = args.sizes[0]
        nt = f > D * 16
        wq, s, _ = make_weights(np.zeros((f, D) if nt else (D, f), np.float32), nt)[fmt]
        s = s if s is not None else jnp.ones((f,), jnp.float32)
        text = jax.jit(lambda x, w, s: fn(x, w, s, nt), compiler_options=OPTIONS[opt]).lower(
            jnp.zeros((args.batches[0], D)), wq, s).compile().as_text()
        print(f"{label} / {opt}:\n" + text[text.index("ENTRY"):])
        return 0
    rows = []
    for f in args.sizes:
        rows += run_size(f, args.batches, args.rounds, rng, cold=not args.warm)
    print_table(rows, args.batches)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
