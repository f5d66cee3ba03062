#!/usr/bin/python3
"""
reference.py: an independent PyTorch implementation of the OSV-5M baseline
inference pipeline, written from the model specification (docs/MODEL.md, sections 1 to 4) alone.

It is the yardstick of the C core: test/reference/make_golden.py runs it on
the test models and images and stores what it computes, and the benchmark
times it.  It deliberately shares no code with the C core and uses only plain
torch modules (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Conv2d) and the
torchvision transforms of the authors' test transform.

Invariants:
  - the network runs in float32 on the CPU under torch.no_grad();
  - precision "bf16" (Reference(..., precision="bf16"), --precision bf16)
    changes only the matrix products with a weight matrix: the patch
    embedding and each block's q, k, v, out_proj, fc1 and fc2.  Their
    weights and the activations entering them are rounded to bfloat16 (to
    nearest, ties to even) and the products computed in float32, biases
    added in float32.  Attention, norms, activations, residuals and the
    whole head stay float32 (osv5m.h, osv_precision);
  - precision "int8" (--precision int8) changes only each block's q, k, v,
    out_proj, fc1 and fc2 (the patch embedding stays float32).  Each row of
    the product's input (a token) and each row of its weight (an output
    channel) is quantized on its own: largest = max |x| over the row,
    factor = 127 / largest (0 for an all-zero row), q = nearbyint(clamp(x *
    factor, -127, 127)) (to nearest, ties to even), scale = largest / 127,
    every step a float32 operation.  The sum of q_a q_w over the row is
    taken exactly, converted to float32 (to nearest even), multiplied by the
    token's scale, then by the channel's, each in float32; the bias is then
    added in float32, and the residual as in fp32 (osv5m.h, osv_precision);
  - F16 and BF16 weights are widened to float32 exactly (every such value is
    representable), so the computation uses the stored values;
  - the head's geometry (tanh, quadtree, degrees) and the softmax are done in
    float64 from the float32 logits and regression outputs;
  - ties in the argmax and in the top-k go to the lower cell index.

Usage as a tool:
  reference.py geolocate --model DIR [--quadtree CSV] [--threads N] [--top K]
                         [--precision fp32|bf16|int8] FILE...
  reference.py embed --model DIR [--precision fp32|bf16|int8] FILE...
  reference.py info --model DIR [--precision fp32|bf16|int8]
"""

import argparse
import json
import math
import mmap
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image

DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_QUADTREE = "quadtree_10_1000.csv"
PRECISIONS = ("fp32", "bf16", "int8")


# ---- safetensors ---------------------------------------------------------

# numpy dtypes of the safetensors names; BF16 has none and is widened by hand.
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4,
             "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_safetensors(path):
    """Read a safetensors file: (dict name -> numpy array, metadata dict).

    F16 and BF16 tensors come back as float32; other dtypes as themselves,
    as read-only views of the file.
    """
    # Map the file rather than read it: the full model is 1.3 GB and the
    # F32 arrays below are views of the mapping, not copies.
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    if len(data) < 8:
        raise ValueError("%s: file too short" % path)
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("%s: header length %d past end of file" % (path, n))
    header = json.loads(data[8:8 + n].decode("utf-8"))
    base = 8 + n
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, desc in header.items():
        dtype = desc["dtype"]
        shape = tuple(int(s) for s in desc["shape"])
        begin, end = (int(o) for o in desc["data_offsets"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if dtype not in _ST_SIZES:
            raise ValueError("%s: tensor %s has unsupported dtype %s" % (path, name, dtype))
        if end - begin != count * _ST_SIZES[dtype] or base + end > len(data):
            raise ValueError("%s: tensor %s has a bad byte range" % (path, name))
        raw = memoryview(data)[base + begin:base + end]
        if dtype == "BF16":
            # bfloat16 is the top half of a float32: shift it back into place.
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif dtype == "F16":
            arr = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=np.dtype(_ST_DTYPES[dtype]).newbyteorder("<"))
        tensors[name] = arr.reshape(shape)
    return tensors, metadata


# ---- config ----------------------------------------------------------------

def _find_transform_step(node, suffix):
    """The first dict in a transform config whose _target_ ends with suffix."""
    if isinstance(node, dict):
        target = node.get("_target_", "")
        if isinstance(target, str) and target.endswith(suffix):
            return node
        for v in node.values():
            found = _find_transform_step(v, suffix)
            if found is not None:
                return found
    elif isinstance(node, list):
        for v in node:
            found = _find_transform_step(v, suffix)
            if found is not None:
                return found
    return None


def _instance(cfg, name):
    """model.<name>.instance of the authors' nested config, or {}."""
    node = cfg.get(name) if isinstance(cfg, dict) else None
    if isinstance(node, dict):
        inst = node.get("instance", node)
        if isinstance(inst, dict):
            return inst
    return {}


def read_config(path):
    """Parse config.json into a flat dict of the overrides it gives.

    Nested values ({"model": ..., "transform": ...}) are read first, then the
    flat CLIPVisionConfig keys at the top level, which win.
    """
    with open(path) as f:
        raw = json.load(f)
    out = {}
    model = raw.get("model")
    if isinstance(model, dict):
        # The activation the backbone's hub path implies: OpenAI's CLIPs use
        # quick_gelu, the laion/open_clip ones exact gelu (docs/MODEL.md).
        path = _instance(model, "backbone").get("path")
        if isinstance(path, str):
            out["hidden_act"] = "quick_gelu" if path.startswith("openai/") else "gelu"
            if path == "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K":
                out["num_attention_heads"] = 16
        head = _instance(model, "head")
        if "scale_tanh" in head:
            out["scale_tanh"] = float(head["scale_tanh"])
        if isinstance(head.get("quadtree_path"), str):
            out["quadtree_file"] = os.path.basename(head["quadtree_path"])
    transform = raw.get("transform")
    if transform is not None:
        norm = _find_transform_step(transform, "Normalize")
        if norm is not None:
            if "mean" in norm:
                out["image_mean"] = [float(v) for v in norm["mean"]]
            if "std" in norm:
                out["image_std"] = [float(v) for v in norm["std"]]
        resize = _find_transform_step(transform, "Resize")
        if resize is not None and isinstance(resize.get("size"), int):
            out["image_size"] = resize["size"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size", "patch_size", "image_size"):
        if key in raw:
            out[key] = int(raw[key])
    for key in ("layer_norm_eps", "scale_tanh"):
        if key in raw:
            out[key] = float(raw[key])
    if "hidden_act" in raw:
        out["hidden_act"] = str(raw["hidden_act"])
    for key in ("image_mean", "image_std"):
        if key in raw:
            out[key] = [float(v) for v in raw[key]]
    if isinstance(raw.get("quadtree_path"), str):
        out["quadtree_file"] = os.path.basename(raw["quadtree_path"])
    return out


def read_quadtree(path):
    """Parse the quadtree CSV into a float64 array [C, 6] of degrees:
    min_lat, min_lon, max_lat, max_lon, mean_lat, mean_lon."""
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    cols = lines[0].split(",")
    want = ["min_lat", "min_lon", "max_lat", "max_lon", "mean_lat", "mean_lon"]
    idx = [cols.index(w) for w in want]
    rows = []
    for line in lines[1:]:
        fields = line.split(",")
        rows.append([float(fields[i]) for i in idx])
    return np.array(rows, dtype=np.float64)


# ---- network -----------------------------------------------------------------

class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention without mask, heads of hidden/num_heads."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, d = x.shape
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(x).reshape(n, h, hd).transpose(0, 1)  # [h, n, hd]
        k = self.k_proj(x).reshape(n, h, hd).transpose(0, 1)
        v = self.v_proj(x).reshape(n, h, hd).transpose(0, 1)
        scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(hd)
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)  # [h, n, hd]
        return self.out_proj(ctx.transpose(0, 1).reshape(n, d))


class Block(nn.Module):
    """A pre-norm CLIP encoder layer."""

    def __init__(self, dim, heads, mlp, act, eps):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = SelfAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)
        self.act = act

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


def make_branch(dim, hidden, out):
    """MLPCentroid's branch: LN, Linear, GN(4), GELU, Linear, GN(4), GELU, Linear."""
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, hidden[0]),
        nn.GroupNorm(4, hidden[0]),
        nn.GELU(),
        nn.Linear(hidden[0], hidden[1]),
        nn.GroupNorm(4, hidden[1]),
        nn.GELU(),
        nn.Linear(hidden[1], out),
    )


class Network(nn.Module):
    """CLIP vision tower (class token of the last block) and the two MLP branches."""

    def __init__(self, h):
        super().__init__()
        d, p = h["hidden_size"], h["patch_size"]
        act = QuickGELU() if h["hidden_act"] == "quick_gelu" else nn.GELU()
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=p, stride=p, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.position_embedding = nn.Parameter(torch.zeros(h["num_tokens"], d))
        self.pre_layrnorm = nn.LayerNorm(d, eps=h["layer_norm_eps"])
        self.layers = nn.ModuleList(
            Block(d, h["num_attention_heads"], h["intermediate_size"], act,
                  h["layer_norm_eps"]) for _ in range(h["num_hidden_layers"]))
        self.classif = make_branch(d, h["mid_hidden"], h["num_cells"])
        self.reg = make_branch(d, h["mid_hidden"], 2 * h["num_cells"])

    def backbone(self, pixels):
        """[3, S, S] -> the class token of the last block, [D]."""
        patches = self.patch_embedding(pixels.unsqueeze(0))  # [1, D, g, g]
        patches = patches.flatten(2)[0].transpose(0, 1)  # [g*g, D], row-major
        x = torch.cat([self.class_embedding.unsqueeze(0), patches], dim=0)
        x = self.pre_layrnorm(x + self.position_embedding)
        for layer in self.layers:
            x = layer(x)
        return x[0]

    def forward(self, pixels):
        feature = self.backbone(pixels)
        f = feature.unsqueeze(0)
        return feature, self.classif(f)[0], self.reg(f)[0]


def round_bf16(t):
    """t rounded to the nearest bfloat16 (ties to even), as float32 again.

    torch's float32 -> bfloat16 conversion rounds to nearest even; every
    bfloat16 is a float32, so the way back is exact.
    """
    return t.to(torch.bfloat16).to(torch.float32)


def _round_input(module, inputs):
    """Forward pre-hook: the product's input, rounded to bfloat16."""
    return tuple(round_bf16(x) for x in inputs)


def use_bf16_products(net):
    """Make net's matrix products with weights bf16 products: round their
    weights now and their inputs on every call; the products themselves,
    of values that are all bfloat16, are then exact in float32 and summed
    in float32.  Biases, and every other module, are left as they are."""
    products = [net.patch_embedding]
    for layer in net.layers:
        attn = layer.self_attn
        products += [attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, layer.fc1, layer.fc2]
    with torch.no_grad():
        for module in products:
            module.weight.copy_(round_bf16(module.weight))
            module.register_forward_pre_hook(_round_input)


def quantize_int8(x):
    """Each row of the float32 matrix x quantized to int8 with its own scale:
    (q, an int8 tensor of x's shape, scale, a float32 tensor of one value
    per row).

    largest = max |x| over the row; factor = 127 / largest, 0 when the row
    is all zeros; q = x * factor clamped to [-127, 127] and rounded to
    nearest, ties to even (torch.round); scale = largest / 127.  Every step
    is one float32 operation.  The divisions are tensor by tensor: torch
    computes a scalar divided by a tensor as the scalar times the tensor's
    reciprocal, which rounds twice.
    """
    largest = x.abs().amax(dim=1)
    nonzero = largest > 0
    safe = torch.where(nonzero, largest, torch.ones_like(largest))
    factor = torch.where(nonzero, torch.full_like(largest, 127.0) / safe, torch.zeros_like(largest))
    q = torch.round(torch.clamp(x * factor[:, None], -127.0, 127.0)).to(torch.int8)
    scale = largest / torch.full_like(largest, 127.0)
    return q, scale


def int8_product(qa, scale_a, qw, scale_w):
    """(qa qw^T), taken exactly, as float32 times scale_a (per row), then
    times scale_w (per column), each multiplication rounded to float32.

    The sums are exact in float64: each term is at most 127 * 127 in
    magnitude, so any partial sum over fewer than 2^53 / 127^2 (5.6e11)
    terms is an integer float64 holds exactly, whatever order the matrix
    product adds them in.
    """
    acc = torch.matmul(qa.to(torch.float64), qw.to(torch.float64).t())
    v = acc.to(torch.float32)  # to nearest even, like the C (float) cast
    v = v * scale_a[:, None]
    return v * scale_w[None, :]


class Int8Linear(nn.Module):
    """nn.Linear's product in int8 (quantize_int8, int8_product), then its
    bias added in float32.  Holds the weight quantized once, not the
    float32 weight."""

    def __init__(self, linear):
        super().__init__()
        with torch.no_grad():
            q, scale = quantize_int8(linear.weight.detach())
        self.register_buffer("qw", q)
        self.register_buffer("scale_w", scale)
        self.bias = linear.bias

    def forward(self, x):
        qa, scale_a = quantize_int8(x)
        return int8_product(qa, scale_a, self.qw, self.scale_w) + self.bias


def use_int8_products(net):
    """Make the six linears of each of net's blocks int8 products
    (Int8Linear); the patch embedding and every other module are left as
    they are.  Returns a function that puts the float32 linears back (the
    weights are not changed, so the same network can then run in fp32 or
    bf16)."""
    swapped = []
    for layer in net.layers:
        attn = layer.self_attn
        for owner, name in ((attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"),
                            (attn, "out_proj"), (layer, "fc1"), (layer, "fc2")):
            linear = getattr(owner, name)
            setattr(owner, name, Int8Linear(linear))
            swapped.append((owner, name, linear))

    def restore():
        for owner, name, linear in swapped:
            setattr(owner, name, linear)
    return restore


# ---- loading -------------------------------------------------------------------

def find_prefixes(names):
    """(backbone prefix ending before 'embeddings.', mid prefix ending before 'classif.')."""
    bb = [n[:-len("embeddings.class_embedding")] for n in names
          if n.endswith("embeddings.class_embedding")]
    mid = [n[:-len("classif.0.weight")] for n in names if n.endswith("classif.0.weight")]
    accepted_bb = ("backbone.clip.vision_model.", "model.backbone.clip.vision_model.",
                   "vision_model.", "backbone.clip.", "model.backbone.clip.",
                   "clip.", "clip.vision_model.")
    # A published checkpoint holds every tensor twice (model.* and an alias
    # sharing its storage): take the first accepted spelling present.
    bb = [b for b in accepted_bb if b in bb]
    mid = [m for m in ("mid.", "model.mid.") if m in mid]
    if not bb:
        raise ValueError("cannot find a vision tower")
    if not mid:
        raise ValueError("cannot find a mid.classif branch")
    return bb[0], mid[0]


def read_pytorch(path):
    """Read a torch.save checkpoint with torch's own restricted loader:
    dict name -> numpy array (floats widened to float32, float64 kept)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for name, t in sd.items():
        if t.dtype == torch.float64 or not t.is_floating_point():
            out[name] = t.numpy()
        else:
            out[name] = t.float().numpy()
    return out


class Reference:
    """A loaded model directory: the network, its hyperparameters and the quadtree."""

    def __init__(self, model_dir, quadtree=None, precision="fp32"):
        if precision not in PRECISIONS:
            raise ValueError("unknown precision %s (fp32, bf16 or int8)" % precision)
        self.dir = model_dir
        self.precision = precision
        st_path = os.path.join(model_dir, "model.safetensors")
        if os.path.exists(st_path):
            w, self.metadata = read_safetensors(st_path)
        else:
            w, self.metadata = read_pytorch(os.path.join(model_dir, "pytorch_model.bin")), {}
        cfg_path = os.path.join(model_dir, "config.json")
        cfg = read_config(cfg_path) if os.path.exists(cfg_path) else {}
        bb, mid = find_prefixes(list(w))
        self.backbone_prefix, self.mid_prefix = bb, mid

        def get(name, shape=None):
            if name not in w:
                raise ValueError("missing tensor %s" % name)
            t = w[name]
            if shape is not None and tuple(t.shape) != tuple(shape):
                raise ValueError("tensor %s has shape %s, expected %s"
                                 % (name, list(t.shape), list(shape)))
            # np.array copies: the view of the read-only mapping is not writable.
            return torch.from_numpy(np.array(t, dtype=np.float32))

        # Hyperparameters: shapes first, config for what shapes cannot say.
        d = w[bb + "embeddings.class_embedding"].shape[0]
        pe = w[bb + "embeddings.patch_embedding.weight"]
        p = pe.shape[2]
        t = w[bb + "embeddings.position_embedding.weight"].shape[0]
        layers = 0
        while (bb + "encoder.layers.%d.layer_norm1.weight" % layers) in w:
            layers += 1
        grid = int(round(math.sqrt(t - 1)))
        h = {
            "hidden_size": d,
            "patch_size": p,
            "num_tokens": t,
            "num_hidden_layers": layers,
            "intermediate_size": w[bb + "encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_attention_heads": cfg.get("num_attention_heads", 16),
            "image_size": cfg.get("image_size", grid * p),
            "hidden_act": cfg.get("hidden_act", "gelu"),
            "layer_norm_eps": cfg.get("layer_norm_eps", 1e-5),
            "image_mean": cfg.get("image_mean", list(DEFAULT_MEAN)),
            "image_std": cfg.get("image_std", list(DEFAULT_STD)),
            "scale_tanh": cfg.get("scale_tanh", 1.2),
            "mid_hidden": [w[mid + "classif.1.weight"].shape[0], w[mid + "classif.4.weight"].shape[0]],
            "num_cells": w[mid + "classif.7.weight"].shape[0],
        }
        for key in ("hidden_size", "patch_size", "num_hidden_layers", "intermediate_size"):
            if key in cfg and cfg[key] != h[key]:
                raise ValueError("config.json says %s %d, the weights say %d" % (key, cfg[key], h[key]))
        if h["hidden_act"] not in ("gelu", "quick_gelu"):
            raise ValueError("unsupported hidden_act %s" % h["hidden_act"])
        if d % h["num_attention_heads"]:
            raise ValueError("hidden size %d is not a multiple of %d heads" % (d, h["num_attention_heads"]))
        if h["image_size"] % p or (h["image_size"] // p) ** 2 + 1 != t:
            raise ValueError("image size %d and patch %d do not give %d positions" % (h["image_size"], p, t))
        self.h = h

        # Copy the weights into plain modules, checking every shape.
        net = Network(h)
        c, f, m0, m1 = h["num_cells"], h["intermediate_size"], h["mid_hidden"][0], h["mid_hidden"][1]
        with torch.no_grad():
            e = bb + "embeddings."
            net.patch_embedding.weight.copy_(get(e + "patch_embedding.weight", (d, 3, p, p)))
            net.class_embedding.copy_(get(e + "class_embedding", (d,)))
            net.position_embedding.copy_(get(e + "position_embedding.weight", (t, d)))
            net.pre_layrnorm.weight.copy_(get(bb + "pre_layrnorm.weight", (d,)))
            net.pre_layrnorm.bias.copy_(get(bb + "pre_layrnorm.bias", (d,)))
            for i, layer in enumerate(net.layers):
                lp = bb + "encoder.layers.%d." % i
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                    mod = getattr(layer.self_attn, proj)
                    mod.weight.copy_(get(lp + "self_attn.%s.weight" % proj, (d, d)))
                    mod.bias.copy_(get(lp + "self_attn.%s.bias" % proj, (d,)))
                for ln in ("layer_norm1", "layer_norm2"):
                    getattr(layer, ln).weight.copy_(get(lp + ln + ".weight", (d,)))
                    getattr(layer, ln).bias.copy_(get(lp + ln + ".bias", (d,)))
                layer.fc1.weight.copy_(get(lp + "mlp.fc1.weight", (f, d)))
                layer.fc1.bias.copy_(get(lp + "mlp.fc1.bias", (f,)))
                layer.fc2.weight.copy_(get(lp + "mlp.fc2.weight", (d, f)))
                layer.fc2.bias.copy_(get(lp + "mlp.fc2.bias", (d,)))
            for name, out in (("classif", c), ("reg", 2 * c)):
                seq = getattr(net, name)
                bp = mid + name + "."
                shapes = {0: (d,), 1: (m0, d), 2: (m0,), 4: (m1, m0), 5: (m1,), 7: (out, m1)}
                for idx, wshape in shapes.items():
                    seq[idx].weight.copy_(get(bp + "%d.weight" % idx, wshape))
                    seq[idx].bias.copy_(get(bp + "%d.bias" % idx, (wshape[0],)))
        if precision == "bf16":
            use_bf16_products(net)
        elif precision == "int8":
            use_int8_products(net)
        self.net = net.eval()

        # The quadtree: an explicit path, else config's base name, else the default.
        # The checkpoint's cell buffers, when it has them, are what the
        # authors' HybridHeadCentroid uses; else the CSV, as init_quadtree.
        buffers = [n for n in ("model.head.", "head.") if n + "cell_center" in w]
        if quadtree is None:
            quadtree = os.path.join(model_dir, cfg.get("quadtree_file", DEFAULT_QUADTREE))
            if not os.path.exists(quadtree):
                quadtree = os.path.join(model_dir, DEFAULT_QUADTREE)
        norm = np.array([90.0, 180.0])
        if buffers:
            hp = buffers[0]
            self.center = np.asarray(w[hp + "cell_center"], dtype=np.float64)
            self.up = np.asarray(w[hp + "cell_size_up"], dtype=np.float64)
            self.down = np.asarray(w[hp + "cell_size_down"], dtype=np.float64)
            self.quadtree_path = None
        else:
            self.quadtree_path = quadtree
            cells = read_quadtree(quadtree)
            self.center = cells[:, 4:6] / norm
            self.up = cells[:, 2:4] / norm - self.center
            self.down = self.center - cells[:, 0:2] / norm
        if self.center.shape[0] != c:
            raise ValueError("quadtree has %d cells, the model %d" % (self.center.shape[0], c))

        s = h["image_size"]
        self.transform = T.Compose([
            T.Resize(s, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(s),
            T.ToTensor(),
            T.Normalize(h["image_mean"], h["image_std"]),
        ])

    def pixels(self, path):
        """The test transform of the image file at path: float32 [3, S, S]."""
        with Image.open(path) as im:
            return self.transform(im.convert("RGB"))

    def cell_point(self, reg, cell):
        """The point regressed inside cell, in degrees (float64)."""
        r = self.h["scale_tanh"] * np.tanh(np.asarray(reg[2 * cell:2 * cell + 2], dtype=np.float64))
        center, up, down = self.center[cell], self.up[cell], self.down[cell]
        gps = center + r * np.where(r > 0, up, down)
        gps = np.clip(gps, -1.0, 1.0)
        return float(gps[0] * 90.0), float(gps[1] * 180.0)

    def run_pixels(self, pixels, k=5):
        """Run the network and head on a preprocessed tensor; returns a dict."""
        with torch.no_grad():
            feature, logits, reg = self.net(pixels)
        logits = logits.numpy().astype(np.float32)
        reg = reg.numpy().astype(np.float32)
        # np.argmax and a stable sort both put the lower index first on ties.
        cell = int(np.argmax(logits))
        l64 = logits.astype(np.float64)
        probs = np.exp(l64 - l64.max())
        probs /= probs.sum()
        order = np.argsort(-l64, kind="stable")[:min(k, len(l64))]
        lat, lon = self.cell_point(reg, cell)
        return {
            "pixels": pixels.numpy(),
            "feature": feature.numpy(),
            "logits": logits,
            "regression": reg,
            "cell": cell,
            "lat": lat,
            "lon": lon,
            "probs": probs,
            "topk_cells": order.astype(np.int64),
            "topk_probs": probs[order],
            "topk_latlon": np.array([self.cell_point(reg, int(i)) for i in order],
                                    dtype=np.float64).reshape(-1, 2),
        }

    def run(self, path, k=5):
        """Preprocess and run the image file at path."""
        return self.run_pixels(self.pixels(path), k)


# ---- command line ---------------------------------------------------------------

def main(argv=None):
    """The reference.py command line."""
    ap = argparse.ArgumentParser(description="PyTorch reference of the OSV-5M baseline")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("geolocate", "embed", "info"):
        sp = sub.add_parser(name)
        sp.add_argument("--model", required=True, help="model directory")
        sp.add_argument("--quadtree", help="quadtree CSV (default: from the model directory)")
        sp.add_argument("--threads", type=int, default=0, help="torch intra-op threads")
        sp.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="arithmetic of the products with weights (default fp32)")
        if name != "info":
            sp.add_argument("--top", type=int, default=1, help="cells to print")
            sp.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    ref = Reference(args.model, args.quadtree, args.precision)
    if args.cmd == "info":
        print(json.dumps(dict(ref.h, quadtree=ref.quadtree_path, precision=ref.precision)))
        return 0
    for path in args.files:
        t0 = time.perf_counter()
        res = ref.run(path, max(1, args.top))
        seconds = time.perf_counter() - t0
        out = {"file": path}
        if args.cmd == "geolocate":
            out.update(lat=res["lat"], lon=res["lon"], cell=res["cell"],
                       probability=float(res["probs"][res["cell"]]))
            if args.top > 1:
                out["top"] = [{"cell": int(c), "probability": float(p), "lat": ll[0], "lon": ll[1]}
                              for c, p, ll in zip(res["topk_cells"], res["topk_probs"],
                                                  res["topk_latlon"].tolist())]
        else:
            out["embedding"] = [float(v) for v in res["feature"]]
        out["seconds"] = seconds
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
