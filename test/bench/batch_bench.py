#!/usr/bin/python3
"""
batch_bench.py: what running several images through the network at once
(osv_run_images, `osv5m bench --batch B`, osv5m.images_per_run) is worth on
the full-size model, and that it changes no result.

  1. seconds per image of `osv5m bench --batch B --threads 1` for each B of
     --batches (default 1,2,4,8), alternated run after run, median of --runs;
  2. images per second of the whole machine's two usual layouts, at batch 1
     and at --layout-batch (default 4): two processes of one thread each
     (what osv5m_enrich(workers => 2) runs) and one process of two threads
     (osv5m.threads = 2), alternated, median of --runs;
  3. the results: `osv5m geolocate --top 5` on the same images with
     (1 thread, batch 1), (2 threads, batch 4), (1 thread, batch 3) and
     (2 threads, batch 8) must print the same bytes.

The images are 8 generated JPEGs of camera sizes (640x480 to 2048x1536), as
compare.py makes them; the model defaults to models/full-random and is
generated when missing.  Run after `make`; about 12 minutes on 2 cores.

Usage: test/bench/batch_bench.py [--model DIR] [--runs 3] [--batches 1,2,4,8]
                                 [--layout-batch 4] [--json OUT]
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
PYTHON = "/usr/bin/python3"
TOOL = os.path.join(ROOT, "osv5m")

sys.path.insert(0, HERE)
import compare  # noqa: E402  (make_images, gflop_per_image)


def bench(model, files, threads, batch):
    """Seconds per image (median over the runs of one process) of osv5m bench."""
    out = subprocess.run([TOOL, "bench", "--json", "--model", model, "--threads", str(threads),
                          "--batch", str(batch), "--iters", "1", "--warmup", "1"] + files,
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_s"]["total"]


def layout(model, files, procs, threads, batch):
    """Images per second of procs concurrent `osv5m bench` processes."""
    cmd = [TOOL, "bench", "--json", "--model", model, "--threads", str(threads),
           "--batch", str(batch), "--iters", "1", "--warmup", "1"] + files
    running = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
               for _ in range(procs)]
    per_image = []
    for p in running:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError("osv5m bench failed")
        per_image.append(json.loads(out.strip().splitlines()[-1])["median_s"]["total"])
    # each process does its images one after another: its rate is 1 / s per image
    return sum(1.0 / s for s in per_image)


def geolocate(model, files, threads, batch):
    """The bytes `osv5m geolocate --top 5` prints."""
    return subprocess.run([TOOL, "geolocate", "--model", model, "--threads", str(threads),
                           "--batch", str(batch), "--top", "5"] + files,
                          cwd=ROOT, check=True, capture_output=True).stdout


def main():
    """Command line."""
    ap = argparse.ArgumentParser(description="batched runs of the network: speed and results")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "full-random"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--layout-batch", type=int, default=4)
    ap.add_argument("--json", default=os.path.join(ROOT, "build", "bench", "batch_bench.json"))
    args = ap.parse_args()
    model = os.path.abspath(args.model)
    if not os.access(TOOL, os.X_OK):
        sys.exit("%s not found: run make first" % TOOL)
    if not os.path.exists(os.path.join(model, "model.safetensors")):
        print("generating %s ..." % model, flush=True)
        subprocess.run([PYTHON, os.path.join(HERE, "make_full_model.py"), model], check=True)
    gflop = compare.gflop_per_image(model)
    batches = [int(b) for b in args.batches.split(",")]
    tmp = tempfile.mkdtemp(prefix="osv5m-batch-")
    results = {"model": model, "runs": args.runs, "gflop_per_image": gflop}
    try:
        files = compare.make_images(tmp, 8)

        per_batch = {b: [] for b in batches}
        for r in range(args.runs):
            for b in batches:
                per_batch[b].append(bench(model, files, 1, b))
            print("run %d: %s" % (r + 1, ", ".join("batch %d %.3f s/image" % (b, per_batch[b][-1])
                                                   for b in batches)), flush=True)
        results["one_thread"] = {str(b): per_batch[b] for b in batches}

        shapes = [(2, 1, 1), (1, 2, 1), (2, 1, args.layout_batch), (1, 2, args.layout_batch)]
        rates = {s: [] for s in shapes}
        for r in range(args.runs):
            for s in shapes:
                rates[s].append(layout(model, files, *s))
            print("run %d: %s" % (r + 1, ", ".join("%dx%d batch %d %.3f images/s" % (s + (rates[s][-1],))
                                                   for s in shapes)), flush=True)
        results["layouts"] = {"%dx%d batch %d" % s: rates[s] for s in shapes}

        outputs = {(t, b): geolocate(model, files, t, b) for t, b in [(1, 1), (2, 4), (1, 3), (2, 8)]}
        same = all(v == outputs[(1, 1)] for v in outputs.values())
        results["identical_results"] = same
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = statistics.median(per_batch[batches[0]])
    print()
    print("one process, 1 thread, 8 JPEGs, median of %d runs" % args.runs)
    print("%8s %12s %10s %14s" % ("batch", "s/image", "speed-up", "GFLOP/s"))
    for b in batches:
        m = statistics.median(per_batch[b])
        print("%8d %12.3f %9.2fx %14.1f" % (b, m, base / m, gflop / m))
    print()
    print("whole machine (procs x threads), images per second, median of %d runs" % args.runs)
    ref = statistics.median(rates[(1, 2, 1)])
    for s in shapes:
        m = statistics.median(rates[s])
        print("  %d x %d, batch %d: %.3f images/s (%.2fx of 1 x 2, batch 1)" % (s + (m, m / ref)))
    print()
    print("results of (threads, batch) = (1, 1), (2, 4), (1, 3), (2, 8): %s"
          % ("bit for bit identical" if same else "DIFFERENT"))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
