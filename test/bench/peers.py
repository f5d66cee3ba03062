#!/usr/bin/python3
"""
peers.py: osv5m against the other ways to run the same network on this CPU,
and against the CPU's own float32 peak, all in the same run.

For each thread count (default 1 and 2), run after run (alternating, so that
drifting load on a shared machine hits every contender alike):
  - osv5m, end to end: `./osv5m bench --json` on generated JPEGs of photo
    sizes, one image at a time (decode, resize and the whole network),
    with its pack cache (the weights packed for the kernels once, in a
    file: osv5m.pack_cache_dir) and without it (packed on the fly), with
    bf16 products (--precision bf16, with its own pack cache file):
    AVX512_BF16 where the CPU has it, else emulated, and with int8 products
    (--precision int8, its own pack cache file): AVX512_VNNI where the CPU
    has it, else integer C; results change slightly
    (test/bench/precision_cost.py measures how much);
  - ONNX Runtime 1.20.1 (npm onnxruntime-node, CPU, its own MLAS kernels)
    on the same network exported from the PyTorch reference to ONNX
    (test/bench/onnx_setup.sh), forward pass only (no decoding), batch 1;
  - the PyTorch reference (test/reference/reference.py), end to end, with
    the thread setting a calibration found fastest for it (compare.py's);
  - the register-only FMA peak of the machine (test/bench/fma_peak.c).
Each figure is the median of --runs runs (default 3).  The table gives the
seconds per image, each peer's time over osv5m's (> 1: osv5m is faster),
ONNX Runtime's (fp32) time over osv5m bf16's and over osv5m int8's, and
each one's GFLOP/s as a fraction of the (fp32) peak measured in the same
run.

The model defaults to models/full-random (test/bench/make_full_model.py);
ONNX Runtime is installed and the model exported on first use (about a
minute and 7 GB of memory).  The environment is left as it is: osv5m and
ONNX Runtime do not use OpenBLAS, PyTorch does (OPENBLAS_CORETYPE, when set,
applies to it).

Usage: test/bench/peers.py [--model DIR] [--threads 1,2] [--runs 3]
                           [--images 4] [--no-torch] [--json OUT]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
import compare  # noqa: E402  (images, the PyTorch worker, helpers)


def build_peak(tmp):
    """fma_peak compiled for this machine (it picks its ISA at run time)."""
    out = os.path.join(tmp, "fma_peak")
    compare.run_cmd(["cc", "-std=gnu11", "-O3", "-pthread", "-o", out,
                     os.path.join(HERE, "fma_peak.c")])
    return out


def peak_run(prog, threads):
    """GFLOP/s of the register-only FMA loop on `threads` threads, 1 s."""
    return float(compare.last_json(compare.run_cmd([prog, str(threads), "1"]))["gflops"])


def osv5m_bench(tool, model, threads, files, cache=None, precision="fp32"):
    """`osv5m bench --json` over files, with the pack cache in cache: its JSON object."""
    cmd = [tool, "bench", "--json", "--model", model, "--threads", str(threads), "--iters", "1",
           "--precision", precision]
    if cache:
        cmd += ["--pack-cache", cache]
    return compare.last_json(compare.run_cmd(cmd + files))


def osv5m_run(tool, model, threads, files, cache=None, precision="fp32"):
    """Seconds per image of `osv5m bench` (median over the files), with the pack cache in cache."""
    return osv5m_bench(tool, model, threads, files, cache, precision)["median_s"]["total"]


def onnx_run(onnx, threads, images):
    """Seconds per image of ONNX Runtime's forward pass, batch 1, and its agreement."""
    out = compare.last_json(compare.run_cmd(
        ["node", os.path.join(HERE, "onnx_time.mjs"), onnx, "--threads", str(threads),
         "--runs", "1", "--images", str(images)]))
    return out["median_s_per_image"], out.get("max_rel_diff")


def main():
    ap = argparse.ArgumentParser(description="osv5m vs ONNX Runtime, PyTorch and the FMA peak")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "full-random"))
    ap.add_argument("--tool", default=os.path.join(ROOT, "osv5m"))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch out (faster)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    model = os.path.abspath(args.model)
    onnx = compare.run_cmd(["sh", os.path.join(HERE, "onnx_setup.sh"), model],
                           timeout=3600).strip().splitlines()[-1]
    gflop = compare.gflop_per_image(model)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print("\n".join(l for l in cpu.splitlines()
                    if l.split(":")[0] in ("Model name", "CPU family", "CPU(s)")))
    print("OPENBLAS_CORETYPE=%s OPENBLAS_L2_SIZE=%s (PyTorch only)" % (
        os.environ.get("OPENBLAS_CORETYPE", "unset"), os.environ.get("OPENBLAS_L2_SIZE", "unset")))
    tmp = tempfile.mkdtemp(prefix="osv5m-peers-")
    rows = []
    try:
        files = compare.make_images(tmp, args.images)
        peak = build_peak(tmp)
        cache = os.path.join(tmp, "pack-cache")
        os.mkdir(cache, 0o700)
        osv5m_run(args.tool, model, 1, files[:1], cache)    # writes the pack caches once
        bf16 = osv5m_bench(args.tool, model, 1, files[:1], cache, "bf16")
        int8 = osv5m_bench(args.tool, model, 1, files[:1], cache, "int8")
        print("model %s, %.1f GFLOP/image; %d JPEGs of %s; bf16 products %s, int8 products %s "
              "(kernels %s)" % (
                  model, gflop, len(files), ", ".join(os.path.basename(f) for f in files),
                  "native" if bf16.get("native") else "emulated",
                  "native" if int8.get("native") else "integer C", bf16["kernels"]), flush=True)
        for n in [int(x) for x in args.threads.split(",")]:
            best = (1, 1)
            if not args.no_torch and n > 1:
                trial = {s: compare.torch_run(model, s, 1, files[:1]) for s in [(n, 1), (1, n), (n, n)]}
                best = min(trial, key=trial.get)
            raw = {"osv5m_s": [], "osv5m_nocache_s": [], "osv5m_bf16_s": [], "osv5m_int8_s": [],
                   "onnx_s": [], "torch_s": [], "peak_gflops": []}
            agree = None
            for r in range(args.runs):
                raw["peak_gflops"].append(peak_run(peak, n))
                raw["osv5m_s"].append(osv5m_run(args.tool, model, n, files, cache))
                raw["osv5m_nocache_s"].append(osv5m_run(args.tool, model, n, files))
                raw["osv5m_bf16_s"].append(osv5m_run(args.tool, model, n, files, cache, "bf16"))
                raw["osv5m_int8_s"].append(osv5m_run(args.tool, model, n, files, cache, "int8"))
                s, agree = onnx_run(onnx, n, args.images)
                raw["onnx_s"].append(s)
                if not args.no_torch:
                    raw["torch_s"].append(compare.torch_run(model, best, 1, files))
                raw["peak_gflops"].append(peak_run(peak, n))
                print("threads %d run %d: osv5m %.3f s/image (%.3f without the pack cache, "
                      "%.3f in bf16, %.3f in int8), onnxruntime %.3f, pytorch %s, "
                      "peak %.0f-%.0f GFLOP/s" % (
                          n, r + 1, raw["osv5m_s"][-1], raw["osv5m_nocache_s"][-1],
                          raw["osv5m_bf16_s"][-1], raw["osv5m_int8_s"][-1], raw["onnx_s"][-1],
                          compare.fmt(raw["torch_s"][-1] if raw["torch_s"] else None, "%.3f"),
                          raw["peak_gflops"][-2], raw["peak_gflops"][-1]), flush=True)
            row = {"threads": n, "raw": raw, "onnx_max_rel_diff": agree,
                   "bf16_native": bool(bf16.get("native")),
                   "int8_native": bool(int8.get("native")),
                   "torch_setting": {"intra_op": best[0], "openblas": best[1]}}
            for key in ("osv5m_s", "osv5m_nocache_s", "osv5m_bf16_s", "osv5m_int8_s", "onnx_s",
                        "torch_s", "peak_gflops"):
                row[key] = compare.median_or_none(raw[key])
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("| threads | osv5m s/image (end to end) | without the pack cache | "
          "osv5m bf16 s/image (end to end, pack cache) | "
          "osv5m int8 s/image (end to end, pack cache) | "
          "ONNX Runtime s/image (forward only) | "
          "PyTorch s/image (end to end) | ONNX Runtime / osv5m | ONNX Runtime / osv5m bf16 | "
          "ONNX Runtime / osv5m int8 | "
          "PyTorch / osv5m | FMA peak GFLOP/s | osv5m of peak | ONNX Runtime of peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        o, b, i, x = r["osv5m_s"], r["osv5m_bf16_s"], r["osv5m_int8_s"], r["onnx_s"]
        t, p = r["torch_s"], r["peak_gflops"]
        print("| %d | %.3f | %.3f | %.3f | %.3f | %.3f | %s | %.2fx | %.2fx | %.2fx | %s | %.0f | "
              "%.0f %% | %.0f %% |" % (
                  r["threads"], o, r["osv5m_nocache_s"], b, i, x, compare.fmt(t, "%.3f"), x / o,
                  x / b, x / i, compare.fmt(t / o if t else None, "%.2fx"), p,
                  100 * gflop / o / p, 100 * gflop / x / p))
    print("medians of %d runs; a fraction of peak is the model's %.1f GFLOP per image over the "
          "time, divided by the FMA peak measured in the same run; bf16 products %s, int8 "
          "products %s" % (
              args.runs, gflop, "native (AVX512_BF16)" if rows and rows[0]["bf16_native"]
              else "emulated", "native (AVX512_VNNI)" if rows and rows[0]["int8_native"]
              else "integer C"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gflop_per_image": gflop, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
