#!/usr/bin/python3
"""
compare.py: side-by-side speed of the osv5m tool and the PyTorch reference
on the full-size model, with the SGEMM rate of the machine as the yardstick.

For each thread count (default 1 and 2) it alternates, run after run:
  - `./osv5m bench --json --model DIR --threads N --iters K FILES`
    (its median_s.total is the seconds per image, "gflops" its rate);
  - the PyTorch reference (test/reference/reference.py) in a fresh process
    timing the same files read into memory, decode included, after one
    warm-up image, with the torch/OpenBLAS thread setting that was fastest
    for N threads in a calibration run (fair to PyTorch);
  - test/bench/sgemm_rate (OpenBLAS SGEMM on the model's own shapes).
Each figure is the median over --runs runs (default 3).  It then prints:
threads, osv5m s/image, pytorch s/image, ratio (pytorch / osv5m, > 1 means
osv5m is faster), osv5m GFLOP/s, sgemm GFLOP/s, fraction (osv5m / sgemm).

The images are generated JPEGs of photo sizes (640x480 to 2048x1536) in a
temporary folder.  The model defaults to models/full-random and is generated
with make_full_model.py when missing.  On 2 cores the default run takes
about 5-10 minutes; --runs 1 --images 2 gives a quick look.

Usage: test/bench/compare.py [--model DIR] [--threads 1,2] [--runs 3]
                             [--images 4] [--iters 1] [--json OUT]
"""

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
PYTHON = "/usr/bin/python3"     # the interpreter with torch, numpy and PIL

IMAGE_SIZES = [(640, 480), (2048, 1536), (1024, 768), (1536, 2048), (1600, 1200), (800, 600)]


# ---- inputs ----------------------------------------------------------------

def make_images(folder, count):
    """Write count photo-like JPEGs (smooth colour fields, edges and grain)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.Generator(np.random.PCG64(7))
    paths = []
    for i in range(count):
        w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        coarse = rng.uniform(0, 255, (max(2, h // 64), max(2, w // 64), 3)).astype(np.uint8)
        im = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(40):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(10, w // 3)), y0 + int(rng.integers(10, h // 3))
            draw.rectangle([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        a = np.asarray(im, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
        path = os.path.join(folder, "photo%d_%dx%d.jpg" % (i, w, h))
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def gflop_per_image(model_dir):
    """Multiply-adds x 2 of one forward pass, from the model's shapes."""
    sys.path.insert(0, os.path.join(ROOT, "test", "reference"))
    import reference

    w, _ = reference.read_safetensors(os.path.join(model_dir, "model.safetensors"))
    bb, mid = reference.find_prefixes(list(w))
    d = w[bb + "embeddings.class_embedding"].shape[0]
    pe = w[bb + "embeddings.patch_embedding.weight"]
    t = w[bb + "embeddings.position_embedding.weight"].shape[0]
    f = w[bb + "encoder.layers.0.mlp.fc1.weight"].shape[0]
    layers = sum(1 for n in w if n.startswith(bb + "encoder.layers.") and n.endswith("layer_norm1.weight"))
    flop = 2.0 * (t - 1) * pe[0].size * d
    flop += layers * (2.0 * t * d * d * 4 + 2.0 * t * d * f * 2 + 2.0 * t * t * d * 2)
    for branch in ("classif", "reg"):
        for i in (1, 4, 7):
            out, inp = w[mid + "%s.%d.weight" % (branch, i)].shape
            flop += 2.0 * out * inp
    return flop / 1e9


# ---- the three contenders -------------------------------------------------------

def run_cmd(cmd, env=None, timeout=900):
    """Run cmd, returning stdout; raises with stderr on failure."""
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError("%s failed (exit %d): %s" % (" ".join(cmd), p.returncode,
                                                       p.stderr.strip()[-2000:]))
    return p.stdout


def last_json(text):
    """The last line of text that is a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    try:
        return json.loads(text)
    except ValueError:
        raise RuntimeError("no JSON object in output: %r" % text[-500:])


def osv5m_run(tool, model, threads, iters, files):
    """One run of `osv5m bench --json`: (seconds per image, GFLOP/s)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads))
    out = last_json(run_cmd([tool, "bench", "--json", "--model", model, "--threads", str(threads),
                             "--iters", str(iters)] + files, env))
    total = out["median_s"]["total"]
    return total, out.get("gflops") or out["gflop_per_image"] / total


def torch_env(torch_threads, blas_threads):
    """The environment of a PyTorch worker."""
    return dict(os.environ, OMP_NUM_THREADS=str(torch_threads),
                OPENBLAS_NUM_THREADS=str(blas_threads), MKL_NUM_THREADS=str(blas_threads))


def torch_run(model, setting, iters, files):
    """One run of the PyTorch worker: seconds per image (median over files x iters)."""
    t, b = setting
    cmd = [PYTHON, os.path.abspath(__file__), "--torch-worker", "--model", model,
           "--torch-threads", str(t), "--iters", str(iters)] + files
    return last_json(run_cmd(cmd, torch_env(t, b)))["median_s"]


def torch_worker(args):
    """In a fresh process: load the reference, time each file (bytes in memory)."""
    sys.path.insert(0, os.path.join(ROOT, "test", "reference"))
    import reference
    import torch

    torch.set_num_threads(args.torch_threads)
    ref = reference.Reference(args.model)
    blobs = []
    for path in args.files:
        with open(path, "rb") as f:
            blobs.append(f.read())
    ref.run(io.BytesIO(blobs[0]))     # warm-up: first-call allocations
    times = []
    for _ in range(args.iters):
        for blob in blobs:
            t0 = time.perf_counter()
            ref.run(io.BytesIO(blob))
            times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times), "times": times,
                      "torch_threads": torch.get_num_threads()}))
    return 0


def find_sgemm(tmp):
    """The sgemm_rate program: an existing build, else compiled into tmp; None if absent."""
    for rel in ("test/bench/sgemm_rate", "build/sgemm_rate", "build/bench/sgemm_rate"):
        path = os.path.join(ROOT, rel)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    src = os.path.join(ROOT, "test", "bench", "sgemm_rate.c")
    if not os.path.exists(src):
        return None
    out = os.path.join(tmp, "sgemm_rate")
    for cmd in (["make", "-s", "build/sgemm_rate"],
                ["cc", "-std=gnu11", "-O2", "-march=native", "-Isrc/core", "-o", out, src,
                 "-lopenblas", "-lm"],
                ["cc", "-std=gnu11", "-O2", "-march=native", "-Isrc/core", "-o", out, src,
                 "src/core/blas.c", "src/core/util.c", "-ldl", "-lm"]):
        try:
            run_cmd(cmd)
        except (RuntimeError, OSError):
            continue
        for path in (out, os.path.join(ROOT, "build", "sgemm_rate")):
            if os.path.isfile(path):
                return path
    return None


def sgemm_run(prog, threads):
    """One run of sgemm_rate: GFLOP/s (its JSON "gflops", else the last number before GFLOP)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads))
    try:
        text = run_cmd([prog, "--threads", str(threads)], env)
    except RuntimeError:
        text = run_cmd([prog], env)
    try:
        obj = last_json(text)
        for key in ("gflops", "weighted_gflops", "gflops_weighted"):
            if isinstance(obj.get(key), (int, float)):
                return float(obj[key])
        nums = [v for k, v in obj.items() if "gflop" in k.lower() and isinstance(v, (int, float))]
        if nums:
            return float(nums[-1])
    except RuntimeError:
        pass
    found = re.findall(r"([0-9.]+)\s*GFLOP", text)
    if not found:
        raise RuntimeError("cannot read a GFLOP/s figure from sgemm_rate: %r" % text[-300:])
    return float(found[-1])


# ---- driver ----------------------------------------------------------------------

def median_or_none(values):
    """The median of the values that are not None, or None."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, pattern):
    """Format v with pattern, or '-' when it is missing."""
    return pattern % v if v is not None else "-"


def blas_coretype():
    """The OPENBLAS_CORETYPE PyTorch and sgemm_rate run with.

    OpenBLAS 0.3.21 falls back to its AVX2 kernels on AVX-512 CPUs it does
    not recognise; both get its AVX-512 ones there, as src/core/blas.c asks
    for in the tests.  osv5m itself does not use OpenBLAS.
    """
    if os.environ.get("OPENBLAS_CORETYPE"):
        return os.environ["OPENBLAS_CORETYPE"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    except OSError:
        flags = []
    if all(x in flags for x in ("avx512f", "avx512bw", "avx512dq", "avx512vl")):
        return "SkylakeX"
    return None


def main():
    """Command line."""
    ap = argparse.ArgumentParser(description="osv5m vs PyTorch speed on the full-size model")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "full-random"))
    ap.add_argument("--tool", default=os.path.join(ROOT, "osv5m"), help="the osv5m binary")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--images", type=int, default=4, help="number of generated JPEGs")
    ap.add_argument("--iters", type=int, default=1, help="passes over the images per run")
    ap.add_argument("--json", help="also write the results to this file")
    # internal: the PyTorch side runs in its own process, with its own thread settings
    ap.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--torch-threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("files", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        return torch_worker(args)

    coretype = blas_coretype()
    if coretype:
        os.environ["OPENBLAS_CORETYPE"] = coretype
    print("OpenBLAS kernels for every contender: %s" % (coretype or "OpenBLAS's own choice"))

    model = os.path.abspath(args.model)
    if not os.path.exists(os.path.join(model, "model.safetensors")):
        print("generating %s ..." % model, flush=True)
        run_cmd([PYTHON, os.path.join(HERE, "make_full_model.py"), model])
    gflop = gflop_per_image(model)
    tmp = tempfile.mkdtemp(prefix="osv5m-bench-")
    try:
        files = make_images(tmp, args.images)
        tool = args.tool if os.access(args.tool, os.X_OK) else None
        sgemm = find_sgemm(tmp)
        print("model %s, %.1f GFLOP/image; images: %s" % (model, gflop,
              ", ".join(os.path.basename(f) for f in files)))
        if tool is None:
            print("note: %s not found (run make): osv5m columns left empty" % args.tool)
        if sgemm is None:
            print("note: no sgemm_rate program: sgemm columns left empty")
        rows = []
        for n in [int(x) for x in args.threads.split(",")]:
            # Calibrate: the fastest way to give PyTorch n threads, intra-op
            # (OpenMP) threads or OpenBLAS threads, on one image.
            settings = [(n, 1), (1, n), (n, n)] if n > 1 else [(1, 1)]
            best = settings[0]
            if len(settings) > 1:
                trial = {s: torch_run(model, s, 1, files[:1]) for s in settings}
                best = min(trial, key=trial.get)
                print("threads %d: torch calibration %s -> intra-op %d, OpenBLAS %d" % (
                    n, ", ".join("(%d,%d) %.2fs" % (s[0], s[1], v) for s, v in trial.items()),
                    best[0], best[1]), flush=True)
            o_s, o_g, t_s, s_g = [], [], [], []
            for r in range(args.runs):
                # Alternate the contenders so that drifting load hits all of them.
                if tool:
                    s, g = osv5m_run(tool, model, n, args.iters, files)
                    o_s.append(s)
                    o_g.append(g)
                t_s.append(torch_run(model, best, args.iters, files))
                if sgemm:
                    s_g.append(sgemm_run(sgemm, n))
                print("threads %d run %d: osv5m %s s/image, pytorch %.3f s/image, sgemm %s GFLOP/s" % (
                    n, r + 1, fmt(o_s[-1] if o_s else None, "%.3f"), t_s[-1],
                    fmt(s_g[-1] if s_g else None, "%.1f")), flush=True)
            row = {"threads": n, "osv5m_s": median_or_none(o_s), "pytorch_s": median_or_none(t_s),
                   "osv5m_gflops": median_or_none(o_g), "sgemm_gflops": median_or_none(s_g),
                   "torch_setting": {"intra_op": best[0], "openblas": best[1]},
                   "raw": {"osv5m_s": o_s, "pytorch_s": t_s, "sgemm_gflops": s_g}}
            row["pytorch_gflops"] = gflop / row["pytorch_s"]
            row["ratio"] = row["pytorch_s"] / row["osv5m_s"] if row["osv5m_s"] else None
            row["fraction"] = (row["osv5m_gflops"] / row["sgemm_gflops"]
                               if row["osv5m_gflops"] and row["sgemm_gflops"] else None)
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("%7s %14s %16s %7s %14s %14s %9s" % ("threads", "osv5m s/image", "pytorch s/image",
                                              "ratio", "osv5m GFLOP/s", "sgemm GFLOP/s", "fraction"))
    for r in rows:
        print("%7d %14s %16s %7s %14s %14s %9s" % (
            r["threads"], fmt(r["osv5m_s"], "%.3f"), fmt(r["pytorch_s"], "%.3f"),
            fmt(r["ratio"], "%.2f"), fmt(r["osv5m_gflops"], "%.1f"),
            fmt(r["sgemm_gflops"], "%.1f"), fmt(r["fraction"], "%.2f")))
    print("ratio = pytorch / osv5m (> 1: osv5m faster); fraction = osv5m GFLOP/s / sgemm GFLOP/s;"
          " medians of %d runs, %.1f GFLOP/image" % (args.runs, gflop))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gflop_per_image": gflop, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
