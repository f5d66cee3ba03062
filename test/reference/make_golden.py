#!/usr/bin/python3
"""
make_golden.py: runs the PyTorch reference (reference.py) on every test model
in test/models and the test images in test/data/images, and stores what it
computes in test/golden/models/<model>/<image file name>.safetensors, and
for the models of BF16_MODELS and INT8_MODELS what its bf16 and int8 modes
compute (reference.py, precision "bf16" or "int8") in
test/golden/models/<model>/<precision>/<image>.safetensors.  It also
stores single int8 products of the reference (Int8Linear) on rows chosen
to catch a quantization that rounds apart, in
test/golden/int8_products.safetensors (int8_products below).

Each golden file holds:
  pixels       F32 [3, S, S]  the preprocessed image (see below)
  feature      F32 [D]        class token of the last block
  logits       F32 [C]        classification logits
  regression   F32 [2C]       regression outputs, (lat, lon) per cell
  cell         I64 [1]        the argmax cell
  latlon       F64 [2]        the predicted point, degrees
  topk_cells   I64 [K]        the K = min(5, C) most likely cells, best first
  topk_probs   F64 [K]        their softmax probabilities
  topk_latlon  F64 [K, 2]     the point regressed inside each of them
and __metadata__ {"image": file name, "model": model name, "pixels": ...}.

Invariants (to keep the repository small, under 8 MB of golden data):
  - tiny-gelu (224 x 224) covers every image; the other models a fixed,
    varied subset (SUBSET_SIZE images spread over the file types);
  - "pixels" is stored for every image of the small-image models, and for the
    subset only in tiny-gelu; tiny-f16 shares tiny-gelu's transform (same
    size, mean and std) and stores no pixels.  __metadata__ "pixels" says
    "stored" or names where to find them ("omitted" otherwise);
  - images that PIL cannot open (the malformed fixtures) are skipped;
  - bf16 and int8 goldens exist for the models of BF16_MODELS and
    INT8_MODELS only, on the subset, with the same tensors but no pixels
    (the preprocessing does not depend on the precision): __metadata__
    "pixels" is "same as <model>", whose fp32 golden of the image stores
    them, and "precision" is "bf16" or "int8" (about 38 KB per precision);
  - int8_products.safetensors holds two products, about 73 KB.

Usage: make_golden.py [--check] [--models DIR] [--images DIR] [--out DIR]
  --check  recompute and compare with the stored files instead of writing
"""

import argparse
import os
import sys
import warnings

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference  # noqa: E402
from make_models import write_safetensors  # noqa: E402

ALL_IMAGES_MODELS = {"tiny-gelu"}
# The published-layout twins (<name>-pt, pytorch_model.bin) hold the same
# stored values and transform as <name>: their pixels are <name>'s.
NO_PIXELS_MODELS = {"tiny-f16": "same as tiny-gelu", "tiny-f16-pt": "same as tiny-gelu",
                    "tiny-gelu-pt": "same as tiny-gelu", "tiny-bf16-pt": "same as tiny-bf16",
                    "tiny-quickgelu-pt": "same as tiny-quickgelu"}
SUBSET_SIZE = 10
# Models with bf16 and int8 goldens: the two activations, two image sizes and shapes.
BF16_MODELS = ("tiny-gelu", "tiny-quickgelu")
INT8_MODELS = ("tiny-gelu", "tiny-quickgelu")
# Taken into the subset first when present: the broadest mix of decoder paths
# (CMYK, EXIF, transparency, 16-bit, 1 x 1 upscaling, an extreme aspect ratio).
PREFERRED = ["jpeg_420_640x480.jpg", "jpeg_cmyk_320x240.jpg", "jpeg_exif_rotated_300x200.jpg",
             "jpeg_progressive_800x533.jpg", "jpeg_tiny_1x1.jpg", "jpeg_tall_120x700.jpg",
             "png_pal8_trns_200x150.png", "png_rgba8_211x317.png", "png_gray16_180x240.png",
             "png_line_10000x1.png"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
TOP_K = 5

# Tolerances of --check: the reference on another machine or thread count may
# round float32 sums differently, but not by more than this.
RTOL, ATOL = 1e-4, 1e-5


def list_images(images_dir):
    """The image files PIL can decode, sorted by name; prints the others."""
    good = []
    for name in sorted(os.listdir(images_dir)):
        path = os.path.join(images_dir, name)
        if not name.lower().endswith(IMAGE_EXTS) or not os.path.isfile(path):
            continue
        try:
            with Image.open(path) as im:
                im.convert("RGB")
        except Exception as e:  # the deliberately broken fixtures
            print("skipping %s: %s" % (name, e))
            continue
        good.append(name)
    return good


def choose_subset(names, n):
    """A deterministic, varied subset: the PREFERRED images that exist, then
    the rest shared out over the file types in turn, evenly spaced within
    each type's sorted names."""
    first = [p for p in PREFERRED if p in names][:n]
    n -= len(first)
    names = [x for x in names if x not in first]
    groups = {}
    for name in sorted(names):
        groups.setdefault(os.path.splitext(name)[1].lower(), []).append(name)
    share = {key: 0 for key in groups}
    while sum(share.values()) < min(n, len(names)) and n > 0:
        for key in sorted(groups):
            if share[key] < len(groups[key]) and sum(share.values()) < n:
                share[key] += 1
    picked = []
    for key, group in groups.items():
        picked += [group[j * len(group) // share[key]] for j in range(share[key])]
    return sorted(first + picked)


def golden_tensors(res, with_pixels):
    """The tensors of one golden file: dict name -> (array, safetensors dtype)."""
    t = {
        "feature": (res["feature"].astype(np.float32), "F32"),
        "logits": (res["logits"].astype(np.float32), "F32"),
        "regression": (res["regression"].astype(np.float32), "F32"),
        "cell": (np.array([res["cell"]], dtype=np.int64), "I64"),
        "latlon": (np.array([res["lat"], res["lon"]], dtype=np.float64), "F64"),
        "topk_cells": (res["topk_cells"].astype(np.int64), "I64"),
        "topk_probs": (res["topk_probs"].astype(np.float64), "F64"),
        "topk_latlon": (res["topk_latlon"].astype(np.float64), "F64"),
    }
    if with_pixels:
        t["pixels"] = (res["pixels"].astype(np.float32), "F32")
    return t


def int8_rows(rng, rows, k):
    """rows x k float32 values whose int8 quantization is easy to get wrong,
    in this order: ties (x * factor exactly an integer and a half, factor 1
    and 0.5), all zeros, rows whose factor 127 / largest differs from 127
    times 1 / largest by enough to round one value apart, a negative
    largest value, then random rows of magnitudes 1e-3 to 1e3."""
    x = (rng.normal(0, 1, (rows, k)) * 10.0 ** rng.uniform(-3, 3, (rows, 1))).astype(np.float32)
    halves = rng.integers(-126, 126, k).astype(np.float32) + np.float32(0.5)
    x[0] = halves
    x[0, 3] = 127.0
    x[1] = 2 * halves
    x[1, 5] = -254.0
    x[2] = 0.0
    r = 3
    while r < 6:
        largest = np.float32(abs(rng.normal(0, 1)))
        factor = np.float32(127.0) / largest
        other = (np.float32(1.0) / largest) * np.float32(127.0)
        if factor == other:
            continue
        v = np.float32((np.float32(rng.integers(0, 126)) + np.float32(0.5)) / factor)
        for _ in range(8):
            if np.rint(v * factor) != np.rint(v * other):
                x[r] = rng.uniform(-1, 1, k).astype(np.float32) * largest
                x[r, 0], x[r, 1] = largest, v
                r += 1
                break
            v = np.nextafter(v, np.float32(np.inf), dtype=np.float32)
    x[6, 7] = -np.abs(x[6]).max() * 2
    return x


def int8_products():
    """Two int8 products of the reference, C = A W^T + bias and the same
    added to a residual C0, as the blocks' linears compute them:
      small_* A [24, 200], W [20, 200]: the rows of int8_rows in both;
      long_*  A [2, 1536], W [3, 1536]: values that quantize to 100 to 127,
              so the integer sums pass 2^24 (float32 could not add them);
    each with a, w, bias, c0, out (A W^T + bias) and out_residual (c0 + out)."""
    rng = np.random.Generator(np.random.PCG64(8))
    tensors = {}
    for case, (m, n, k) in (("small", (24, 20, 200)), ("long", (2, 3, 1536))):
        if case == "small":
            a, w = int8_rows(rng, m, k), int8_rows(rng, n, k)
        else:
            a = (rng.integers(100, 128, (m, k)) * rng.choice([-1, 1], (m, 1)) / 127.0 * 3.0).astype(np.float32)
            w = (rng.integers(100, 128, (n, k)) / 127.0 * 0.05).astype(np.float32)
        bias = rng.normal(0, 1, n).astype(np.float32)
        c0 = rng.normal(0, 10, (m, n)).astype(np.float32)
        linear = reference.nn.Linear(k, n)
        with reference.torch.no_grad():
            linear.weight.copy_(reference.torch.from_numpy(w))
            linear.bias.copy_(reference.torch.from_numpy(bias))
            out = reference.Int8Linear(linear)(reference.torch.from_numpy(a))
            residual = reference.torch.from_numpy(c0) + out
        for name, arr in (("a", a), ("w", w), ("bias", bias), ("c0", c0),
                          ("out", out.numpy()), ("out_residual", residual.numpy())):
            tensors["%s_%s" % (case, name)] = (np.ascontiguousarray(arr, dtype=np.float32), "F32")
    return tensors


def compare(path, tensors):
    """Differences between a stored golden file and freshly computed tensors, as text lines."""
    stored, _ = reference.read_safetensors(path)
    problems = []
    for name, (arr, _) in tensors.items():
        if name not in stored:
            problems.append("%s: missing %s" % (path, name))
            continue
        old = stored[name]
        if old.shape != arr.shape:
            problems.append("%s: %s has shape %s, now %s" % (path, name, old.shape, arr.shape))
        elif arr.dtype.kind == "i":
            if not np.array_equal(old, arr):
                problems.append("%s: %s was %s, now %s" % (path, name, old.tolist(), arr.tolist()))
        elif not np.allclose(old, arr, rtol=RTOL, atol=ATOL):
            problems.append("%s: %s differs by up to %.3g" % (path, name, np.abs(old - arr).max()))
    return problems


def main():
    """Command line: write (or --check) the golden files."""
    ap = argparse.ArgumentParser(description="golden outputs of the PyTorch reference")
    ap.add_argument("--models", default=os.path.join(HERE, "..", "models"))
    ap.add_argument("--images", default=os.path.join(HERE, "..", "data", "images"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "golden", "models"))
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    reference.torch.set_num_threads(args.threads)
    # PIL warns about palette images with transparency; convert("RGB") is
    # still what the pipeline does.
    warnings.filterwarnings("ignore", category=UserWarning, module="PIL")

    images = list_images(args.images)
    if not images:
        sys.exit("no images in %s" % args.images)
    subset = choose_subset(images, SUBSET_SIZE)
    print("subset: %s" % ", ".join(subset))
    problems = []
    total = 0

    def store(path, tensors, metadata):
        """Write one golden file, or with --check compare it with the stored one."""
        nonlocal problems, total
        if args.check:
            problems += compare(path, tensors) if os.path.exists(path) else ["%s: missing" % path]
        else:
            write_safetensors(path, tensors, metadata)
            total += os.path.getsize(path)

    def remove_stale(out_dir, names):
        """Remove the golden files of images that are gone."""
        if args.check:
            return
        for old in os.listdir(out_dir):
            if old.endswith(".safetensors") and old[:-len(".safetensors")] not in names:
                os.unlink(os.path.join(out_dir, old))

    for model in sorted(os.listdir(args.models)):
        model_dir = os.path.join(args.models, model)
        if not (os.path.isfile(os.path.join(model_dir, "model.safetensors")) or
                os.path.isfile(os.path.join(model_dir, "pytorch_model.bin"))):
            continue
        ref = reference.Reference(model_dir)
        out_dir = os.path.join(args.out, model)
        os.makedirs(out_dir, exist_ok=True)
        names = images if model in ALL_IMAGES_MODELS else subset
        small_margins = []
        for name in names:
            res = ref.run(os.path.join(args.images, name), TOP_K)
            if model in NO_PIXELS_MODELS:
                with_pixels, note = False, NO_PIXELS_MODELS[model]
            elif model in ALL_IMAGES_MODELS and name not in subset:
                with_pixels, note = False, "omitted"
            else:
                with_pixels, note = True, "stored"
            tensors = golden_tensors(res, with_pixels)
            # Near-ties among the top K + 1 logits are where a float32
            # rounding difference could reorder cells: report them.
            gaps = -np.diff(np.sort(res["logits"])[::-1][:TOP_K + 1])
            if len(gaps) and gaps.min() < 1e-3:
                small_margins.append("%s (%.2g at rank %d)" % (name, gaps.min(), int(np.argmin(gaps)) + 1))
            store(os.path.join(out_dir, name + ".safetensors"), tensors,
                  {"image": name, "model": model, "pixels": note})
        remove_stale(out_dir, names)
        print("%s: %d images%s" % (model, len(names),
                                    ", top-k logit gaps < 1e-3: " + ", ".join(small_margins)
                                    if small_margins else ""))
        for precision, models in (("bf16", BF16_MODELS), ("int8", INT8_MODELS)):
            if model not in models:
                continue
            reduced = reference.Reference(model_dir, precision=precision)
            reduced_dir = os.path.join(out_dir, precision)
            os.makedirs(reduced_dir, exist_ok=True)
            for name in subset:
                res = reduced.run(os.path.join(args.images, name), TOP_K)
                store(os.path.join(reduced_dir, name + ".safetensors"), golden_tensors(res, False),
                      {"image": name, "model": model, "precision": precision,
                       "pixels": "same as %s" % model})
            remove_stale(reduced_dir, subset)
            print("%s %s: %d images" % (model, precision, len(subset)))
    store(os.path.join(args.out, "..", "int8_products.safetensors"), int8_products(),
          {"precision": "int8", "what": "reference.Int8Linear products; make_golden.py int8_products"})
    print("int8 products: 2")
    if args.check:
        for p in problems:
            print(p)
        print("golden check: %s" % ("FAILED" if problems else "ok"))
        return 1 if problems else 0
    print("wrote %d bytes of golden files" % total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
