#!/usr/bin/python3
"""
enrich_bench.py: bulk enrichment throughput, memory and first-call latency.

Measures, on the full-size random-weight model (make_full_model.py) and a
table of generated JPEGs of camera sizes (640x480 to 2048x1536):

  - rows per second of
      update      UPDATE photos SET loc = geolocate(img) WHERE loc IS NULL
      enrich_1    CALL osv5m_enrich(..., workers => 1), THREADS BLAS threads
      enrich_N    CALL osv5m_enrich(..., workers => N), THREADS / N each
      enrich_1_bf16, enrich_1_int8
                  enrich_1 with osv5m.precision = bf16 or int8
      pytorch     the pipeline beside the database: psycopg2 reads the rows,
                  PIL decodes, test/reference/reference.py runs the network
                  (1 intra-op thread, THREADS OpenBLAS threads: PyTorch's
                  fastest thread setting here), psycopg2 writes back, on the
                  kernels OpenBLAS picks for this CPU by itself
      pytorch_tuned  the same on the OpenBLAS kernels that are fastest for
                  PyTorch here (OPENBLAS_CORETYPE, found by a calibration on
                  2 images); left out when that is OpenBLAS's own choice
    the median of --runs runs each, side by side, with the ratios to both
    PyTorch rows; osv5m_enrich runs osv5m.images_per_run images per run of
    the network (--images-per-run, default the server's);
  - private memory per busy backend (USS = Private_Clean + Private_Dirty,
    and PSS, from /proc/PID/smaps_rollup) with 2 and 4 backends running
    geolocate() at once, and of the background workers of enrich_N while
    they all run (with Anonymous, the memory they allocated themselves):
    the weights are mmap'ed, so they show as shared;
  - first-call latency in a fresh backend: the first geolocate() minus the
    second (model open, OpenBLAS load, run state allocation).

It starts its own throwaway cluster (test/pg/cluster.sh) in build/bench/pg,
so run it after `make install`, as root or as a user that may read the
server processes' /proc/PID/smaps_rollup.  Targets: throughput >= 1.3x the
PyTorch pipeline's, < 100 MB private memory per busy backend, < 100 ms
first-call overhead.

The server uses a pack cache (osv5m.pack_cache_dir, in the cluster's
folder; --no-pack-cache: none), as a production server should.

  test/bench/enrich_bench.py                        # full: 200 rows, 3 runs (30-60 min)
  test/bench/enrich_bench.py --rows 20 --runs 1     # a quick look
"""

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import psycopg2
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
PYTHON = "/usr/bin/python3"     # the interpreter with torch, numpy and PIL
SIZES = [(640, 480), (1024, 768), (1280, 960), (1600, 1200), (2048, 1536)]


def log(msg):
    """Progress on stderr, so that stdout is only the results."""
    print(msg, file=sys.stderr, flush=True)


def make_images(folder, rows):
    """Write rows JPEGs of camera sizes (portrait and landscape), once."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(rows):
        path = os.path.join(folder, "img_%04d.jpg" % i)
        paths.append(path)
        if os.path.exists(path):
            continue
        w, h = SIZES[i % len(SIZES)]
        if i % 7 == 3:
            w, h = h, w
        # smooth colour fields plus grain: compresses like a photo
        low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        im = Image.fromarray(low, "RGB").resize((w, h), Image.BICUBIC)
        grain = rng.normal(0, 12, size=(h, w, 3))
        arr = np.clip(np.asarray(im, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(path, "JPEG", quality=88)
    return paths


def start_cluster(folder, port, pack_cache):
    """initdb and start a cluster with test/pg/cluster.sh; returns PGHOST.
    With pack_cache, the server's osv5m.pack_cache_dir is FOLDER/pack, made
    by the server's OS user with mode 0700 (what the setting requires)."""
    pack = os.path.abspath(os.path.join(folder, "pack"))
    script = ('source test/pg/cluster.sh && cluster_init "$1" "$2" '
              '"max_worker_processes = 16" "shared_buffers = 256MB" "$3" >/dev/null && '
              '{ [ "$4" = 0 ] || as_pguser mkdir -m 700 "$4"; } && '
              'cluster_start "$1" && echo "$PGHOST"')
    conf = ("osv5m.pack_cache_dir = '%s'" % pack) if pack_cache else "# no pack cache"
    out = subprocess.run(["bash", "-c", script, "bench", folder, str(port), conf,
                          pack if pack_cache else "0"], cwd=ROOT,
                         check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def stop_cluster(folder):
    """Stop the cluster started by start_cluster."""
    subprocess.run(["bash", "-c", 'source test/pg/cluster.sh && cluster_stop "$1"',
                    "bench", folder], cwd=ROOT, check=False)


class Bench:
    """The cluster connection details and the measurements."""

    def __init__(self, args, host):
        self.args = args
        self.dsn = dict(host=host, port=args.port, user="postgres", dbname="bench")
        self.worker_samples = []

    def connect(self, threads=None, autocommit=True):
        """A new session with the model set (and osv5m.threads if given)."""
        conn = psycopg2.connect(**self.dsn)
        conn.autocommit = autocommit
        with conn.cursor() as cur:
            cur.execute("SET client_min_messages = warning")
            if threads is not None:
                cur.execute("SET osv5m.threads = %s", (threads,))
        return conn

    def setup(self, paths):
        """The database, the extension and the photos table."""
        conn = psycopg2.connect(**dict(self.dsn, dbname="postgres"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE bench")
            cur.execute("ALTER DATABASE bench SET osv5m.model_path = %s", (self.args.model,))
        conn.close()
        conn = self.connect()
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION osv5m CASCADE")
            cur.execute("CREATE TABLE photos (id int PRIMARY KEY, img bytea, loc geography)")
            for i, p in enumerate(paths):
                with open(p, "rb") as f:
                    cur.execute("INSERT INTO photos VALUES (%s, %s, NULL)", (i + 1, f.read()))
            cur.execute("VACUUM ANALYZE photos")
        conn.close()

    def reset(self):
        """Every loc back to NULL, dead rows gone."""
        conn = self.connect()
        with conn.cursor() as cur:
            cur.execute("UPDATE photos SET loc = NULL")
            cur.execute("VACUUM photos")
        conn.close()

    def located(self):
        """How many rows have a location."""
        conn = self.connect()
        with conn.cursor() as cur:
            cur.execute("SELECT count(loc) FROM photos")
            n = cur.fetchone()[0]
        conn.close()
        return n

    def warm(self, conn):
        """One inference, so the timed part has the model loaded."""
        with conn.cursor() as cur:
            cur.execute("SELECT geolocate(img) FROM photos WHERE id = 1")

    def run_update(self):
        """The plain UPDATE, in one transaction, THREADS BLAS threads."""
        conn = self.connect(self.args.threads)
        self.warm(conn)
        t = time.time()
        with conn.cursor() as cur:
            cur.execute("UPDATE photos SET loc = geolocate(img) WHERE loc IS NULL")
        dt = time.time() - t
        conn.close()
        return dt

    def run_enrich(self, workers, precision=None):
        """osv5m_enrich with 1 or N workers; threads split among workers;
        in precision (osv5m.precision) when given.  While it runs, the peak
        USS of its background workers is kept."""
        threads = max(1, self.args.threads // workers)
        conn = self.connect(threads)
        if precision:
            with conn.cursor() as cur:
                cur.execute("SET osv5m.precision = %s", (precision,))
        if self.args.images_per_run:
            with conn.cursor() as cur:
                cur.execute("SET osv5m.images_per_run = %s", (self.args.images_per_run,))
        if workers == 1:
            self.warm(conn)  # the caller itself infers; workers load their own
        stop = threading.Event()
        sampler = threading.Thread(target=self.sample_workers, args=(stop, workers))
        sampler.start()
        t = time.time()
        try:
            with conn.cursor() as cur:
                cur.execute("CALL osv5m_enrich('photos', 'img', 'loc', batch_size => %s, workers => %s)",
                            (self.args.batch_size, workers))
        finally:
            dt = time.time() - t
            stop.set()
            sampler.join()
        conn.close()
        return dt

    def sample_workers(self, stop, workers):
        """Until stop, twice a second while all `workers` background workers
        run: each one's memory (smaps_rollup).  Kept in self.worker_samples."""
        conn = self.connect()
        with conn.cursor() as cur:
            while not stop.wait(0.5):
                cur.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'osv5m enrich worker'")
                pids = [pid for (pid,) in cur.fetchall()]
                if len(pids) == workers:
                    sample = [smaps_rollup(pid) for pid in pids]
                    if all(sample):
                        self.worker_samples.extend(sample)
        conn.close()

    def kernels(self):
        """The matrix kernels the server's backends run."""
        conn = self.connect()
        with conn.cursor() as cur:
            cur.execute("SELECT osv5m_model_info()->>'kernels'")
            core = cur.fetchone()[0]
        conn.close()
        return core

    def run_pytorch(self, coretype):
        """The PyTorch pipeline in a fresh process (OpenBLAS reads its
        kernel and thread settings when torch loads it): seconds."""
        env = torch_env(self.args.threads, coretype)
        cmd = [PYTHON, os.path.abspath(__file__), "--pytorch-worker", "--model", self.args.model,
               "--port", str(self.args.port), "--host", self.dsn["host"]]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["seconds"]

    def memory(self, backends):
        """USS, PSS, RSS (MB) of each of `backends` sessions busy with geolocate."""
        conns = [self.connect(1) for _ in range(backends)]
        pids = []
        for c in conns:
            with c.cursor() as cur:
                cur.execute("SELECT pg_backend_pid()")
                pids.append(cur.fetchone()[0])
            self.warm(c)
        n = min(self.args.rows, 2)
        threads = [threading.Thread(target=lambda c=c: c.cursor().execute(
            "SELECT count(geolocate(img)) FROM photos WHERE id <= %s", (n,))) for c in conns]
        for th in threads:
            th.start()
        time.sleep(1.0)
        peak = {}
        while any(th.is_alive() for th in threads):
            for pid in pids:
                m = smaps_rollup(pid)
                if m and m["uss"] > peak.get(pid, {"uss": 0})["uss"]:
                    peak[pid] = m
            time.sleep(0.2)
        for th in threads:
            th.join()
        for c in conns:
            c.close()
        return list(peak.values())

    def first_call(self):
        """Seconds of the first and second geolocate() in a fresh backend,
        and the model load time the backend itself measured (ms)."""
        conn = self.connect(self.args.threads)
        times = []
        with conn.cursor() as cur:
            # the first JIT compilation of a backend loads LLVM (tens of
            # ms): PostgreSQL's cost, not osv5m's, so out of this figure
            cur.execute("SET jit = off")
            for _ in range(2):
                t = time.time()
                cur.execute("SELECT geolocate(img) FROM photos WHERE id = 1")
                cur.fetchall()
                times.append(time.time() - t)
            cur.execute("SELECT (osv5m_model_info()::jsonb->>'load_ms')::float8")
            times.append(cur.fetchone()[0])
        conn.close()
        return times


def torch_env(threads, coretype):
    """The environment of a PyTorch process: 1 intra-op thread, `threads`
    OpenBLAS threads (PyTorch's fastest split here, as compare.py's
    calibration finds: N of each oversubscribes the cores and runs about 2.5
    times slower), and OPENBLAS_CORETYPE = coretype (None: OpenBLAS's own
    choice for this CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    env.pop("OPENBLAS_CORETYPE", None)
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    return env


def pytorch_worker(args):
    """In a fresh process: read, decode, run reference.py, write back.  The
    model is loaded before the clock starts, as the database side's is."""
    sys.path.insert(0, os.path.join(ROOT, "test", "reference"))
    import reference
    import torch

    torch.set_num_threads(1)
    ref = reference.Reference(args.model)
    conn = psycopg2.connect(host=args.host, port=args.port, user="postgres", dbname="bench")
    t = time.time()
    with conn.cursor() as cur:
        cur.execute("SELECT id, img FROM photos WHERE loc IS NULL ORDER BY id")
        rows = cur.fetchall()
    out = []
    for rid, img in rows:
        with Image.open(io.BytesIO(bytes(img))) as im:
            pixels = ref.transform(im.convert("RGB"))
        r = ref.run_pixels(pixels, k=1)
        out.append((r["lon"], r["lat"], rid))
    with conn.cursor() as cur:
        cur.executemany("UPDATE photos SET loc = ST_SetSRID(ST_MakePoint(%s, %s), 4326)::geography "
                        "WHERE id = %s", out)
    conn.commit()
    dt = time.time() - t
    conn.close()
    print(json.dumps({"seconds": dt, "rows": len(rows)}))
    return 0


def calibrate_coretype(model, threads, files):
    """The OpenBLAS kernels fastest for PyTorch here: each candidate times
    the reference on 2 images (decode included) in a fresh process.
    Returns (best, {candidate: seconds per image}); None is OpenBLAS's own
    choice."""
    candidates = [None]
    with open("/proc/cpuinfo") as f:
        flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
    if "avx2" in flags:
        candidates.append("Haswell")
    if all(x in flags for x in ("avx512f", "avx512bw", "avx512dq", "avx512vl")):
        candidates.append("SkylakeX")
    trial = {}
    for c in candidates:
        cmd = [PYTHON, os.path.join(HERE, "compare.py"), "--torch-worker", "--model", model,
               "--torch-threads", "1", "--iters", "1"] + files[:2]
        out = subprocess.run(cmd, env=torch_env(threads, c), check=True, capture_output=True,
                             text=True).stdout
        trial[c] = json.loads(out.strip().splitlines()[-1])["median_s"]
    return min(trial, key=trial.get), trial


def smaps_rollup(pid):
    """RSS, PSS, USS and shared memory of a process, in MB, or None."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            kb = {}
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                    kb[parts[0][:-1]] = int(parts[1])
    except OSError:
        return None
    mb = lambda k: kb.get(k, 0) / 1024.0
    return {"rss": mb("Rss"), "pss": mb("Pss"),
            "uss": mb("Private_Clean") + mb("Private_Dirty"),
            "shared": mb("Shared_Clean") + mb("Shared_Dirty"),
            "anon": mb("Anonymous")}


def main():
    """Command line: measure and print the table."""
    ap = argparse.ArgumentParser(description="osv5m bulk enrichment benchmark")
    ap.add_argument("--rows", type=int, default=200, help="photos in the table (default 200)")
    ap.add_argument("--runs", type=int, default=3, help="runs per configuration; the median is kept")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="threads in all (BLAS or torch); default: the number of cores")
    ap.add_argument("--workers", type=int, default=2, help="N of the enrich_N configuration")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "full-random"))
    ap.add_argument("--port", type=int, default=54396)
    ap.add_argument("--dir", default=os.path.join(ROOT, "build", "bench"))
    ap.add_argument("--images-per-run", type=int, default=0,
                    help="osv5m.images_per_run for osv5m_enrich (default: the server's)")
    ap.add_argument("--only",
                    default="update,enrich_1,enrich_N,enrich_1_bf16,enrich_1_int8,pytorch,"
                    "pytorch_tuned,memory,first_call",
                    help="comma-separated subset of the measurements")
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    ap.add_argument("--no-pack-cache", action="store_true",
                    help="no osv5m.pack_cache_dir: weights packed on the fly")
    # internal: the PyTorch pipeline runs in its own process
    ap.add_argument("--pytorch-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--host", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = os.path.abspath(args.model)
    if args.pytorch_worker:
        return pytorch_worker(args)
    only = set(args.only.split(","))

    if not os.path.exists(os.path.join(args.model, "model.safetensors")):
        sys.exit("no model in %s: run test/bench/make_full_model.py first" % args.model)
    paths = make_images(os.path.join(args.dir, "images"), args.rows)
    host = start_cluster(os.path.join(args.dir, "pg"), args.port, not args.no_pack_cache)
    results = {"rows": args.rows, "runs": args.runs, "threads": args.threads,
               "workers": args.workers, "batch_size": args.batch_size,
               "images_per_run": args.images_per_run or "server default",
               "model": args.model, "cpus": os.cpu_count(),
               "pack_cache": not args.no_pack_cache}
    try:
        b = Bench(args, host)
        b.setup(paths)
        results["server_kernels"] = b.kernels()
        configs = [("update", "UPDATE ... SET loc = geolocate(img)", "1 x %d" % args.threads,
                    b.run_update),
                   ("enrich_1", "CALL osv5m_enrich(workers => 1)", "1 x %d" % args.threads,
                    lambda: b.run_enrich(1)),
                   ("enrich_N", "CALL osv5m_enrich(workers => %d)" % args.workers,
                    "%d x %d" % (args.workers, max(1, args.threads // args.workers)),
                    lambda: b.run_enrich(args.workers)),
                   ("enrich_1_bf16", "the same as workers => 1, precision bf16",
                    "1 x %d" % args.threads, lambda: b.run_enrich(1, "bf16")),
                   ("enrich_1_int8", "the same as workers => 1, precision int8",
                    "1 x %d" % args.threads, lambda: b.run_enrich(1, "int8"))]
        if "pytorch" in only or "pytorch_tuned" in only:
            log("calibrating PyTorch's OpenBLAS kernels")
            best, trial = calibrate_coretype(args.model, args.threads, paths)
            results["pytorch_kernels"] = {str(k or "OpenBLAS's own choice"): v for k, v in trial.items()}
            print("PyTorch kernel calibration (s/image, 2 images): %s -> %s" % (
                ", ".join("%s %.3f" % (k or "own choice", v) for k, v in trial.items()),
                best or "OpenBLAS's own choice"), flush=True)
            configs.append(("pytorch", "psycopg2 + PIL + PyTorch reference.py",
                            "1 x %d" % args.threads, lambda: b.run_pytorch(None)))
            if best is not None:
                configs.append(("pytorch_tuned", "the same, OPENBLAS_CORETYPE=%s" % best,
                                "1 x %d" % args.threads, lambda: b.run_pytorch(best)))
        configs = [c for c in configs if c[0] in only]
        # alternate the pipelines run after run, so that drifting load on a
        # shared machine hits all of them alike
        times = {key: [] for key, _, _, _ in configs}
        for r in range(args.runs):
            for key, _, _, fn in configs:
                b.reset()
                log("%s, run %d of %d" % (key, r + 1, args.runs))
                times[key].append(fn())
                if b.located() != args.rows:
                    sys.exit("%s left %d rows without a location" % (key, args.rows - b.located()))
        rates = {}
        for key, label, shape, _ in configs:
            rates[key] = args.rows / statistics.median(times[key])
            results[key] = {"label": label, "processes_x_threads": shape,
                            "seconds": times[key], "rows_per_second": rates[key]}

        print("osv5m bulk enrichment: %d rows, %d run(s) each, alternated, median; %d cores, "
              "%d threads in all; server on its %s kernels, %s"
              % (args.rows, args.runs, os.cpu_count(), args.threads, results["server_kernels"],
                 "no pack cache" if args.no_pack_cache else "with a pack cache"))
        print("%-44s %-9s %10s %10s %10s" % ("pipeline", "procs x thr", "rows/s", "vs pytorch",
                                             "vs tuned"))
        for key, label, shape, _ in configs:
            ratio = ("%.2fx" % (rates[key] / rates["pytorch"])) if "pytorch" in rates else "-"
            tuned = ("%.2fx" % (rates[key] / rates["pytorch_tuned"])) if "pytorch_tuned" in rates else "-"
            print("%-44s %-9s %10.3f %10s %10s" % (label, shape, rates[key], ratio, tuned))
        if b.worker_samples:
            # the median over the samples taken while every worker ran: a
            # worker's USS counts weight pages no other process has mapped
            # yet as private, so its peak says more about timing than memory
            w = b.worker_samples
            med = {k: statistics.median(x[k] for x in w) for k in ("uss", "pss", "rss", "anon")}
            results["enrich_worker_memory"] = {"median": med, "max_anon": max(x["anon"] for x in w),
                                               "samples": len(w)}
            print("osv5m_enrich background workers while all ran (median of %d samples): private "
                  "(USS) %.0f MB, of it anonymous %.0f MB (max %.0f), PSS %.0f MB, RSS %.0f MB"
                  % (len(w), med["uss"], med["anon"], max(x["anon"] for x in w), med["pss"],
                     med["rss"]))

        if "memory" in only:
            for n in (2, 4):
                log("memory with %d busy backends" % n)
                m = b.memory(n)
                results["memory_%d" % n] = m
                if m:
                    print("%d busy backends: private (USS) %s MB, of it anonymous %s MB, PSS %s MB, "
                          "RSS %s MB, shared %s MB"
                          % (n, "/".join("%.0f" % x["uss"] for x in m),
                             "/".join("%.0f" % x["anon"] for x in m),
                             "/".join("%.0f" % x["pss"] for x in m),
                             "/".join("%.0f" % x["rss"] for x in m),
                             "/".join("%.0f" % x["shared"] for x in m)))
                else:
                    print("%d busy backends: /proc/PID/smaps_rollup not readable (run as root)" % n)
        if "first_call" in only:
            runs = [b.first_call() for _ in range(max(1, args.runs))]
            first = statistics.median(r[0] for r in runs)
            second = statistics.median(r[1] for r in runs)
            load_ms = statistics.median(r[2] for r in runs)
            results["first_call"] = {"first": first, "second": second, "load_ms": load_ms}
            print("first call in a fresh backend: %.3f s, second: %.3f s, overhead %.0f ms "
                  "(of which model open %.0f ms)" % (first, second, 1000 * (first - second), load_ms))
        out = os.path.join(args.dir, "enrich_bench.json")
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        log("results in %s" % out)
    finally:
        if not args.keep:
            stop_cluster(os.path.join(args.dir, "pg"))


if __name__ == "__main__":
    sys.exit(main())
