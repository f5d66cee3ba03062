#!/usr/bin/python3
"""
precision_cost.py: what bf16 and int8 products cost in accuracy, against
fp32, on the full-size model: how often the top-1 cell changes, how far the
predicted point moves and how the feature turns.

It runs the osv5m tool three times over the same images, `geolocate
--feature --precision fp32`, then `--precision bf16` and `--precision int8`
(one process each: opening the 1.3 GB model takes seconds, a forward pass
about a second), and compares each reduced precision's answers with fp32's
image by image:
  - the share of images whose top-1 cell is the same;
  - the great-circle distance between the two predicted points (haversine on
    a sphere of 6371 km, as the OSV-5M metrics): median, 95th percentile, max;
  - the cosine similarity of the two 1024-d features (the class token of the
    last block, before the head): min and median.
Then, for calibration, the PyTorch reference (test/reference/reference.py)
in its own fp32, int8 and bf16 modes on the first --reference-images images
(about 2 s per image in fp32 and bf16, several times that in int8, whose
exact integer sums it takes in float64): the same statistics for the
reference's bf16 and int8 against its fp32, which say whether osv5m's bf16
and int8 cost what bf16 and int8 themselves cost; and on those images
osv5m against the reference in each precision.  Both round (or quantize)
the same values but sum in another order, so where a value lies at a
rounding boundary they round it apart: osv5m's bf16 and int8 answers are
expected to be about as far from the reference's in the same precision as
they are from their own fp32 ones, not as close as the two fp32 answers
are.

The images are generated (deterministic): photo-like colour fields with
shapes and grain, gradients, textures and stripes, grey and colour, JPEG and
PNG, from 64 pixels to 2048 on a side and aspect ratios from 1:4 to 4:1.
--test-images adds the decodable images of test/data/images.

The model defaults to models/full-random (test/bench/make_full_model.py):
random weights with the shapes of osv5m/baseline.  IT IS NOT THE PUBLISHED
MODEL: its predictions mean nothing, and how far bf16 or int8 moves them
says how sensitive a network of this depth and width is to that rounding,
not how much geolocation accuracy the published model would lose.  For that, point
--model at a directory holding the published osv5m/baseline (the tool and
the reference both read its pytorch_model.bin) and use real photos.

Usage: test/bench/precision_cost.py [--model DIR] [--tool PATH] [--images 50]
                                    [--test-images] [--reference-images 10]
                                    [--threads N] [--json OUT]
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
EARTH_RADIUS_KM = 6371.0

# (width, height): photo sizes, small ones, and extreme aspect ratios
IMAGE_SIZES = [(640, 480), (2048, 1536), (1024, 768), (1536, 2048), (1600, 1200), (800, 600),
               (480, 640), (224, 224), (300, 200), (64, 96), (1200, 300), (256, 1024),
               (1920, 1080), (97, 61)]
KINDS = ("shapes", "gradient", "texture", "stripes", "horizon")
REDUCED = ("bf16", "int8")


# ---- inputs ---------------------------------------------------------------------

def make_image(rng, kind, w, h):
    """One generated picture of the given kind, as a uint8 [h, w, 3] array."""
    from PIL import Image, ImageDraw

    if kind == "shapes":
        # coarse colour fields, rectangles and ellipses, grain: compare.py's photos
        coarse = rng.uniform(0, 255, (max(2, h // 64), max(2, w // 64), 3)).astype(np.uint8)
        im = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(30):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1 = x0 + int(rng.integers(2, max(3, w // 3)))
            y1 = y0 + int(rng.integers(2, max(3, h // 3)))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x0, y0, x1, y1], fill=fill)
        a = np.asarray(im, dtype=np.float64) + rng.normal(0, 6, (h, w, 3))
    elif kind == "gradient":
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        a = np.stack([255 * (c0 + c1 * x + c2 * y) for c0, c1, c2 in rng.uniform(-0.5, 1.0, (3, 3))],
                     axis=-1)
    elif kind == "texture":
        # smooth noise at several scales
        a = np.zeros((h, w, 3))
        for scale in (4, 16, 64):
            small = rng.normal(0, 1, (max(2, h // scale), max(2, w // scale), 3))
            up = np.asarray(Image.fromarray(((small + 4) * 32).clip(0, 255).astype(np.uint8))
                            .resize((w, h), Image.BILINEAR), dtype=np.float64) - 128
            a += up * (scale / 64)
        a = 128 + a * rng.uniform(0.5, 1.5) + rng.uniform(-60, 60, 3)
    elif kind == "stripes":
        y, x = np.mgrid[0:h, 0:w]
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.02, 0.2) * max(w, h)   # still there at 224 x 224
        t = np.sin((x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        a = c0 + (c1 - c0) * (t[..., None] + 1) / 2 + rng.normal(0, 3, (h, w, 3))
    else:
        # sky over ground with a horizon somewhere in the middle third
        sky, ground = rng.uniform(100, 255, 3), rng.uniform(20, 160, 3)
        line = int(h * rng.uniform(0.33, 0.66))
        y = np.arange(h)[:, None, None]
        a = np.where(y < line, sky * (0.7 + 0.3 * y / max(line, 1)), ground)
        a = np.broadcast_to(a, (h, w, 3)) + rng.normal(0, 8, (h, w, 3))
    return np.clip(a, 0, 255).astype(np.uint8)


def make_images(folder, count):
    """Write count varied images (JPEG and PNG, colour and grey) into folder."""
    from PIL import Image

    rng = np.random.Generator(np.random.PCG64(11))
    paths = []
    for i in range(count):
        w, h = IMAGE_SIZES[i % len(IMAGE_SIZES)]
        kind = KINDS[i % len(KINDS)]
        im = Image.fromarray(make_image(rng, kind, w, h))
        if i % 7 == 3:
            im = im.convert("L")
        ext = "png" if i % 4 == 1 else "jpg"
        path = os.path.join(folder, "img%02d_%s_%dx%d.%s" % (i, kind, w, h, ext))
        if ext == "jpg":
            im.save(path, quality=int(rng.integers(60, 96)))
        else:
            im.save(path)
        paths.append(path)
    return paths


def test_images():
    """The images of test/data/images that PIL decodes (the malformed ones are left out)."""
    from PIL import Image

    folder = os.path.join(ROOT, "test", "data", "images")
    good = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        try:
            with Image.open(path) as im:
                im.convert("RGB")
        except Exception:
            continue
        good.append(path)
    return good


# ---- the two implementations ------------------------------------------------------

def tool_run(tool, model, threads, precision, files):
    """`osv5m geolocate --feature` over files: dict file -> (lat, lon, cell, feature)."""
    cmd = [tool, "geolocate", "--model", model, "--threads", str(threads),
           "--precision", precision, "--feature"] + files
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = {}
    for line in p.stdout.splitlines():
        r = json.loads(line)
        if "error" in r:
            raise RuntimeError("osv5m: %s: %s" % (r["file"], r["error"]))
        out[r["file"]] = (r["lat"], r["lon"], r["cell"], np.array(r["feature"], dtype=np.float64))
    if p.returncode != 0 or len(out) != len(files):
        raise RuntimeError("%s failed (exit %d): %s" % (" ".join(cmd[:9]), p.returncode,
                                                       p.stderr.strip()[-2000:]))
    return out


def reference_run(model, threads, files):
    """The PyTorch reference in fp32, then int8, then bf16, on one copy of the
    weights: (dict precision -> dict file -> (lat, lon, cell, feature), dict
    precision -> seconds).

    What Reference(model, precision=...) does for each, without a second
    1.3 GB copy: int8 swaps the blocks' linears for quantized ones and puts
    them back; bf16, last, rounds the weights in place."""
    sys.path.insert(0, os.path.join(ROOT, "test", "reference"))
    import reference

    reference.torch.set_num_threads(threads)
    ref = reference.Reference(model)
    out, seconds = {}, {}
    for precision in ("fp32", "int8", "bf16"):
        t0 = time.perf_counter()
        restore = None
        if precision == "int8":
            restore = reference.use_int8_products(ref.net)
        elif precision == "bf16":
            reference.use_bf16_products(ref.net)
        res = {}
        for path in files:
            r = ref.run(path, 1)
            res[path] = (r["lat"], r["lon"], r["cell"], r["feature"].astype(np.float64))
        if restore is not None:
            restore()
        out[precision] = res
        seconds[precision] = time.perf_counter() - t0
    return out, seconds


# ---- statistics ----------------------------------------------------------------------

def haversine_km(lat1, lon1, lat2, lon2):
    """Great-circle distance in km between two points in degrees."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def compare(a, b, files):
    """The statistics of answers b against answers a over files."""
    same, km, cos = 0, [], []
    for f in files:
        lat1, lon1, cell1, f1 = a[f]
        lat2, lon2, cell2, f2 = b[f]
        same += cell1 == cell2
        km.append(haversine_km(lat1, lon1, lat2, lon2))
        cos.append(float(np.dot(f1, f2) / (np.linalg.norm(f1) * np.linalg.norm(f2))))
    return {
        "images": len(files),
        "same_cell": same / len(files),
        "km_median": float(np.median(km)),
        "km_p95": float(np.percentile(km, 95)),
        "km_max": float(max(km)),
        "cosine_min": float(min(cos)),
        "cosine_median": float(np.median(cos)),
    }


def print_table(rows):
    """The rows as a Markdown table."""
    print("| compared | images | same top-1 cell | km median | km p95 | km max | "
          "feature cosine min | feature cosine median |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, s in rows:
        print("| %s | %d | %.1f %% | %.3g | %.3g | %.3g | %.7f | %.7f |" % (
            name, s["images"], 100 * s["same_cell"], s["km_median"], s["km_p95"], s["km_max"],
            s["cosine_min"], s["cosine_median"]))


def main():
    """Command line."""
    ap = argparse.ArgumentParser(description="the accuracy cost of bf16 and int8 products against fp32")
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "full-random"))
    ap.add_argument("--tool", default=os.path.join(ROOT, "osv5m"), help="the osv5m binary")
    ap.add_argument("--images", type=int, default=50, help="generated images (default 50)")
    ap.add_argument("--test-images", action="store_true", help="also test/data/images")
    ap.add_argument("--reference-images", type=int, default=10,
                    help="images also run through the PyTorch reference (0: none)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    model = os.path.abspath(args.model)
    tmp = tempfile.mkdtemp(prefix="osv5m-precision-")
    try:
        files = make_images(tmp, args.images) + (test_images() if args.test_images else [])
        info = json.loads(subprocess.run([args.tool, "info", "--model", model, "--no-fingerprint"],
                                         capture_output=True, text=True, check=True).stdout)
        native = info["precisions_native"]
        print("model %s (%d layers, hidden %d), %d images; bf16 products %s, int8 products %s "
              "(kernels %s), %d threads" % (
                  model, info["num_layers"], info["hidden_size"], len(files),
                  "native" if native["bf16"] else "emulated",
                  "native" if native["int8"] else "integer C", info["kernels"], args.threads),
              flush=True)
        answers, seconds = {}, {}
        for precision in ("fp32",) + REDUCED:
            t0 = time.perf_counter()
            answers[precision] = tool_run(args.tool, model, args.threads, precision, files)
            seconds[precision] = time.perf_counter() - t0
            print("osv5m %s: %.1f s for %d images (model opening included)" % (
                precision, seconds[precision], len(files)), flush=True)
        rows = [("osv5m %s vs osv5m fp32" % p, compare(answers["fp32"], answers[p], files))
                for p in REDUCED]

        subset = files[:max(0, min(args.reference_images, len(files)))]
        ref_seconds = {}
        if subset:
            ref, ref_seconds = reference_run(model, args.threads, subset)
            print("reference: %s for %d images" % (", ".join(
                "%s %.1f s" % (p, ref_seconds[p]) for p in ("fp32",) + REDUCED), len(subset)),
                flush=True)
            for p in REDUCED:
                rows += [
                    ("reference %s vs reference fp32" % p, compare(ref["fp32"], ref[p], subset)),
                    ("osv5m %s vs osv5m fp32, same images" % p,
                     compare(answers["fp32"], answers[p], subset)),
                    ("osv5m %s vs reference %s" % (p, p), compare(ref[p], answers[p], subset)),
                ]
            rows.append(("osv5m fp32 vs reference fp32", compare(ref["fp32"], answers["fp32"], subset)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print_table(rows)
    print("distances: haversine on a sphere of %g km between the two predicted points; cosine "
          "of the %d-d features%s" % (EARTH_RADIUS_KM, info["hidden_size"],
                                      "; random weights, not the published model"
                                      if os.path.basename(model) == "full-random" else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, "threads": args.threads, "kernels": info["kernels"],
                       "bf16_native": info["precisions_native"]["bf16"],
                       "int8_native": info["precisions_native"]["int8"], "seconds": seconds,
                       "reference_seconds": ref_seconds,
                       "rows": [dict(s, compared=name) for name, s in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
