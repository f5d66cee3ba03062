#!/usr/bin/python3
"""
onnx_export.py: exports the network of test/reference/reference.py (CLIP
vision tower and the two MLP branches) for a model directory to ONNX, for
the ONNX Runtime peer benchmark (test/bench/onnx_time.mjs).

The graph maps preprocessed pixels "pixels" [N, 3, S, S] float32 (N dynamic)
to "feature" [N, D] (class token of the last block), "logits" [N, C] and
"regression" [N, 2C]: everything the head needs.  The head itself (softmax,
tanh, quadtree) is not in the graph.

The network is reference.py's own, loaded by its Reference class.  Its
modules work on one image; to give the graph a batch axis, only the token
assembly and the head split of the attention are restated here for a
leading batch axis, and everything else (layer norms, projections, MLPs,
activations, branches, weights) is reference.py's.  The exported forward is
checked against reference.py's run_pixels before export.  torch 1.13
cannot export GroupNorm of the branches' [N, C] input, so group_norm gets
its own symbolic (InstanceNormalization, as torch's own for 3-D and up).

Next to FILE.onnx it writes the check data for ONNX Runtime:
  FILE.ref.bin   float32 little-endian arrays, one after another:
                 pixels [2,3,S,S] (two seeded random images, normalised),
                 and reference.py's feature, logits, regression for them;
  FILE.ref.json  {"arrays": [{"name", "shape", "offset"}...], ...}.

Usage: test/bench/onnx_export.py --model DIR --out FILE.onnx [--opset 17]
(models/full-random: about 1.3 GB of weights; peak memory about 7 GB)
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch.onnx import symbolic_helper, symbolic_opset9

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import reference  # noqa: E402

SEED = 20240


def batched_attention(attn, x):
    """reference.SelfAttention's computation on x [N, T, D]."""
    _, t, d = x.shape
    h, hd = attn.num_heads, attn.head_dim

    def heads(y):
        return y.reshape(-1, t, h, hd).transpose(1, 2)  # [N, h, T, hd]

    q, k, v = heads(attn.q_proj(x)), heads(attn.k_proj(x)), heads(attn.v_proj(x))
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hd)
    ctx = torch.matmul(torch.softmax(scores, dim=-1), v)  # [N, h, T, hd]
    return attn.out_proj(ctx.transpose(1, 2).reshape(-1, t, d))


class Batched(torch.nn.Module):
    """reference.Network with a leading batch axis: pixels [N,3,S,S] ->
    (feature [N,D], logits [N,C], regression [N,2C])."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        for layer in net.layers:
            # Block.forward stays reference.py's; only its attention is batched.
            attn = layer.self_attn
            attn.forward = lambda x, attn=attn: batched_attention(attn, x)

    def forward(self, pixels):
        net = self.net
        patches = net.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [N, g*g, D]
        cls = net.class_embedding.reshape(1, 1, -1).expand(pixels.shape[0], 1, -1)
        x = net.pre_layrnorm(torch.cat([cls, patches], dim=1) + net.position_embedding)
        for layer in net.layers:
            x = layer(x)
        feature = x[:, 0]
        return feature, net.classif(feature), net.reg(feature)


@symbolic_helper.parse_args("v", "i", "v", "v", "f", "i")
def group_norm_symbolic(g, x, groups, weight, bias, eps, cudnn_enabled):
    """aten::group_norm for the branches' [N, C] input, which torch 1.13's
    own symbolic cannot take: as that one, InstanceNormalization over
    [N, groups, C/groups], then the affine on the last axis."""
    if symbolic_helper._get_tensor_rank(x) != 2:
        return symbolic_opset9.group_norm(g, x, groups, weight, bias, eps, cudnn_enabled)
    grouped = g.op("Reshape", x, g.op("Constant", value_t=torch.tensor([0, groups, -1])))
    norm = g.op("InstanceNormalization", grouped, g.op("Constant", value_t=torch.ones(groups)),
                g.op("Constant", value_t=torch.zeros(groups)), epsilon_f=eps)
    norm = g.op("Reshape", norm, g.op("Shape", x))
    return g.op("Add", g.op("Mul", norm, weight), bias)


def check_pixels(ref, count=2):
    """count seeded random images [count,3,S,S], normalised as the transform does."""
    s = ref.h["image_size"]
    g = torch.Generator().manual_seed(SEED)
    rgb = torch.rand(count, 3, s, s, generator=g)
    mean = torch.tensor(ref.h["image_mean"]).reshape(1, 3, 1, 1)
    std = torch.tensor(ref.h["image_std"]).reshape(1, 3, 1, 1)
    return ((rgb - mean) / std).float()


def write_check_data(base, arrays, info):
    """base.ref.bin (arrays concatenated, float32 LE) and base.ref.json."""
    entries, offset = [], 0
    with open(base + ".ref.bin", "wb") as f:
        for name, a in arrays:
            a = np.ascontiguousarray(a, dtype="<f4")
            f.write(a.tobytes())
            entries.append({"name": name, "shape": list(a.shape), "offset": offset})
            offset += a.nbytes
    with open(base + ".ref.json", "w") as f:
        json.dump(dict(info, arrays=entries), f, indent=1)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description="export reference.py's network to ONNX")
    ap.add_argument("--model", required=True, help="model directory")
    ap.add_argument("--out", required=True, help="output .onnx file")
    ap.add_argument("--opset", type=int, default=17, help="highest opset to try")
    args = ap.parse_args()

    t0 = time.time()
    ref = reference.Reference(args.model)
    print("loaded %s in %.1f s" % (args.model, time.time() - t0), file=sys.stderr)

    # Reference outputs, one image at a time through reference.py itself.
    pixels = check_pixels(ref)
    t0 = time.time()
    runs = [ref.run_pixels(p) for p in pixels]
    want = {k: np.stack([r[k] for r in runs]) for k in ("feature", "logits", "regression")}
    print("reference.py: %.2f s per image" % ((time.time() - t0) / len(runs)), file=sys.stderr)

    model = Batched(ref.net).eval()
    with torch.no_grad():
        got = dict(zip(("feature", "logits", "regression"), model(pixels)))
    for k in want:
        diff = float(np.abs(got[k].numpy() - want[k]).max())
        print("batched forward vs reference.py, %s: max abs diff %.3g" % (k, diff), file=sys.stderr)
        if not diff <= 1e-3 * max(1.0, float(np.abs(want[k]).max())):
            sys.exit("the batched forward disagrees with reference.py")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.time()
    for opset in range(args.opset, 12, -1):
        try:
            torch.onnx.register_custom_op_symbolic("aten::group_norm", group_norm_symbolic, opset)
            with torch.no_grad():
                torch.onnx.export(
                    model, (pixels[:1],), args.out, opset_version=opset,
                    input_names=["pixels"], output_names=["feature", "logits", "regression"],
                    dynamic_axes={n: {0: "batch"} for n in ("pixels", "feature", "logits", "regression")},
                    do_constant_folding=True)
            break
        except Exception as e:  # an opset this torch cannot export: try the next lower
            print("opset %d failed: %s" % (opset, e), file=sys.stderr)
    else:
        sys.exit("export failed at every opset")
    seconds = time.time() - t0
    print("exported %s (opset %d, %.2f GB) in %.1f s"
          % (args.out, opset, os.path.getsize(args.out) / 1e9, seconds), file=sys.stderr)

    base = args.out[:-5] if args.out.endswith(".onnx") else args.out
    write_check_data(base, [("pixels", pixels.numpy())] + list(want.items()),
                     {"model": args.model, "opset": opset, "seed": SEED,
                      "torch": torch.__version__, "export_seconds": round(seconds, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
