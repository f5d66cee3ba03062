#!/usr/bin/python3
"""
make_full_model.py: writes a random-weight model with the exact shapes of
osv5m/baseline (CLIP ViT-L/14: hidden 1024, 24 layers, 16 heads, MLP 4096,
patch 14, image 224; MLPCentroid hidden [1024, 512]; 11399 cells; F32,
about 1.3 GB) for the performance benchmark.  Its predictions mean nothing;
its cost is the real model's.

Invariants:
  - the same tensor names, layout and initialisation scheme as the small test
    models (test/reference/make_models.py), so any loader that reads those
    reads this;
  - memory stays at one tensor at a time: the header is computed from the
    shapes first, then each tensor is drawn and written in file order;
  - deterministic for a given seed.

Usage: make_full_model.py [DIR]   (default models/full-random, git-ignored)
       make_full_model.py --published [DIR]
                                  (default models/full-random-pt): the same
                                  weights and cells in the layout
                                  osv5m/baseline is published in (torch.save
                                  pytorch_model.bin with the alias keys and the
                                  float64 cell buffers, the authors' nested
                                  config.json, no CSV); needs python3-torch
                                  and about 3 GB of memory
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import make_models as mm  # noqa: E402

FULL = dict(seed=2024, image=224, patch=14, hidden=1024, heads=16, layers=24,
            mlp=4096, act="gelu", mid=[1024, 512], cells=11399, dtype="F32",
            prefix="backbone.clip.vision_model.", mid_prefix="mid.",
            config="flat", mean=mm.CLIP_MEAN, std=mm.CLIP_STD, scale_tanh=1.2)


def drawn_tensors(rng):
    """The safetensors header of the model, and a generator of its tensors
    in file order, each (name, dtype, byte size, array) drawn from rng when
    asked for: the one order both layouts draw in, so that they hold the
    same weights, and one tensor in memory at a time for the safetensors
    file."""
    specs = {name: (shape, kind, scale) for name, shape, kind, scale in mm.weight_specs(FULL)}
    entries = [(name, "I64" if kind == "ids" else "F32", shape)
               for name, (shape, kind, scale) in specs.items()]
    header, layout = mm.safetensors_header(entries, {"format": "pt"})

    def tensors():
        for name, begin, end in layout:
            shape, kind, scale = specs[name]
            dtype = "I64" if kind == "ids" else "F32"
            yield name, dtype, end - begin, mm.draw(shape, kind, scale, rng)
    return header, tensors()


def main():
    """Command line: write the model directory."""
    ap = argparse.ArgumentParser(description="random model with osv5m/baseline's shapes")
    ap.add_argument("--published", action="store_true",
                    help="write pytorch_model.bin + nested config.json, as osv5m/baseline")
    ap.add_argument("dir", nargs="?")
    args = ap.parse_args()
    default = "full-random-pt" if args.published else "full-random"
    out = os.path.normpath(args.dir or os.path.join(HERE, "..", "..", "models", default))
    if args.published:
        return write_published(out)
    os.makedirs(out, exist_ok=True)
    rng = np.random.Generator(np.random.PCG64(FULL["seed"]))
    t0 = time.time()
    header, tensors = drawn_tensors(rng)
    tmp = os.path.join(out, "model.safetensors.tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for name, dtype, size, array in tensors:
            data = mm.to_bytes(array, dtype)
            assert len(data) == size
            f.write(data)
    # Rename last so that an interrupted run never leaves a plausible file.
    os.replace(tmp, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(mm.make_config(FULL), f, indent=2)
        f.write("\n")
    mm.write_quadtree(os.path.join(out, "quadtree_10_1000.csv"), mm.make_quadtree(FULL["cells"], rng))
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    print("%s: %.2f GB of weights in %.1f s" % (out, size / 1e9, time.time() - t0))
    return 0


def write_published(out):
    """The same tensors, drawn in the same order, and the same cells, written
    by make_models.write_published as the -pt test models are."""
    if mm.torch is None:
        sys.exit("python3-torch is needed for --published (apt-get install python3-torch)")
    if not os.path.basename(out).endswith("-pt"):
        sys.exit("the directory of a published-layout model must end in -pt: %s" % out)
    rng = np.random.Generator(np.random.PCG64(FULL["seed"]))
    t0 = time.time()
    _, tensors = drawn_tensors(rng)
    weights = {name: array for name, _, _, array in tensors}
    rows = mm.make_quadtree(FULL["cells"], rng)
    mm.write_published(os.path.basename(out)[:-3], FULL, weights, rows, os.path.dirname(out))
    size = os.path.getsize(os.path.join(out, "pytorch_model.bin"))
    print("%s: %.2f GB of weights in %.1f s" % (out, size / 1e9, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
