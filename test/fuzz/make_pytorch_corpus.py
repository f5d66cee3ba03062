#!/usr/bin/python3
"""
make_pytorch_corpus.py: writes the seed corpus of fuzz_pytorch.c,
test/fuzz/corpus/pytorch/.

Each seed is <pytorch_model.bin> SPLIT <config.json> (fuzz_pytorch.c's input
format): the tiny 8-wide model of make_corpus.py saved by torch.save the way
osv5m/baseline is published (model.* keys and alias keys sharing storages,
float64 cell buffers, I64 position_ids, the nested config), in F32, F16 and
BF16, with pickle protocols 2 (torch's default) and 4 (FRAME, MEMOIZE,
STACK_GLOBAL), a transposed (strided) weight, and without a config.
Deterministic for a given torch version.  Needs python3-torch.

Usage: make_pytorch_corpus.py [--out test/fuzz/corpus/pytorch]
"""

import argparse
import collections
import io
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_corpus import QUADTREE, SPLIT, tiny_model  # noqa: E402

TORCH_DTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def state_dict(dtype, transpose=False):
    """The tiny model as Geolocalizer.state_dict() would hold it."""
    tensors = collections.OrderedDict()
    for name, dt, shape, data in tiny_model("F32"):
        arr = np.frombuffer(data, dtype=np.int64 if dt == "I64" else np.float32).reshape(shape)
        t = torch.from_numpy(arr.copy())
        if dt != "I64":
            t = t.to(TORCH_DTYPE[dtype])
        tensors[name] = t
    if transpose:
        # a weight stored transposed: the same values through strides (1, n)
        n = "backbone.clip.vision_model.encoder.layers.0.mlp.fc1.weight"
        tensors[n] = tensors[n].t().contiguous().t()
    rows = [[float(v) for v in line.split(b",")[1:]] for line in QUADTREE.splitlines()[1:]]
    q = np.array(rows)
    norm = np.array([90.0, 180.0])
    center = q[:, 4:6] / norm
    tensors["head.cell_center"] = torch.from_numpy(center.copy())
    tensors["head.cell_size_up"] = torch.from_numpy(q[:, 2:4] / norm - center)
    tensors["head.cell_size_down"] = torch.from_numpy(center - q[:, 0:2] / norm)
    sd = collections.OrderedDict()
    for prefix in ("model.", ""):
        for n, t in tensors.items():
            sd[prefix + n] = t
    return sd


CONFIG = {
    "model": {"backbone": {"instance": {"path": "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"}},
              "mid": {"instance": {"initial_dim": 8, "hidden_dim": [8, 8], "final_dim": 12}},
              "head": {"instance": {"final_dim": 4, "use_tanh": True, "scale_tanh": 1.2,
                                    "quadtree_path": "utils/quadtree_10_1000.csv"}}},
    "transform": {"transforms": [{"_target_": "torchvision.transforms.Resize", "size": 8},
                                 {"_target_": "torchvision.transforms.CenterCrop", "size": 8},
                                 {"_target_": "torchvision.transforms.Normalize",
                                  "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}]},
    "num_attention_heads": 2,
}


def saved(sd, protocol=2):
    f = io.BytesIO()
    torch.save(sd, f, pickle_protocol=protocol)
    return f.getvalue()


def main():
    ap = argparse.ArgumentParser(description="seeds of fuzz_pytorch")
    ap.add_argument("--out", default=os.path.join(HERE, "corpus", "pytorch"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = json.dumps(CONFIG, indent=1).encode()
    seeds = {
        "pt-f32": saved(state_dict("F32")) + SPLIT + cfg,
        "pt-f16": saved(state_dict("F16")) + SPLIT + cfg,
        "pt-bf16": saved(state_dict("BF16")) + SPLIT + cfg,
        "pt-protocol4": saved(state_dict("F32"), 4) + SPLIT + cfg,
        "pt-strided": saved(state_dict("F32", transpose=True)) + SPLIT + cfg,
        "pt-no-config": saved(state_dict("F32")),
    }
    for name, data in seeds.items():
        with open(os.path.join(args.out, name), "wb") as f:
            f.write(data)
    print("wrote %d seeds, %d bytes" % (len(seeds), sum(len(d) for d in seeds.values())))


if __name__ == "__main__":
    main()
