#!/usr/bin/python3
"""
make_models.py: writes the small random-weight test models into test/models/.

Each model is a directory in the layout of the real osv5m/baseline checkpoint:
model.safetensors (tensor names of docs/MODEL.md section 1, [out, in] linear
weights, the unused position_ids and post_layernorm included), config.json
and a quadtree CSV.  The models differ in what a loader must get right: the
tensor-name prefix, the storage dtype, the config form, the activation, the
image size, normalisation and scale_tanh.

Invariants:
  - deterministic: every model has its own fixed seed, and the output bytes
    depend only on this file (numpy's PCG64 stream is stable across versions);
  - weights are drawn like CLIP's initialisation, with LayerNorm and
    GroupNorm weights near 1 and non-zero biases, so that activations are of
    a realistic scale and the logits of different images differ;
  - F16/BF16 models store the float32 draws rounded to nearest-even; the
    reference widens exactly those stored values.

Every model is written twice: <name>/ as above (safetensors, the CSV), and
<name>-pt/ the way osv5m/baseline is actually published on Hugging Face
(docs/MODEL.md section 1): pytorch_model.bin written by torch.save (Debian's
python3-torch) of an OrderedDict with the model.* keys, the alias keys
backbone.*, mid.*, head.* sharing the same storages, the float64 cell
buffers head.cell_center/cell_size_up/cell_size_down computed from the
quadtree as the authors' init_quadtree does, an I64 position_ids, the
authors' nested config.json, and no CSV.  Both hold the same stored values.
torch.save's output is deterministic for the same tensors and torch
version (the zip entries carry no timestamps that change).

Usage: make_models.py [--out test/models] [name...]
"""

import argparse
import collections
import json
import os
import struct
import sys

import numpy as np

try:
    import torch
except ImportError:  # the -pt models need it; the others do not
    torch = None

HERE = os.path.dirname(os.path.abspath(__file__))
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

MODELS = {
    "tiny-gelu": dict(seed=101, image=224, patch=14, hidden=64, heads=2, layers=2,
                      mlp=128, act="gelu", mid=[64, 32], cells=100, dtype="F32",
                      prefix="backbone.clip.vision_model.", mid_prefix="mid.",
                      config="flat", mean=CLIP_MEAN, std=CLIP_STD, scale_tanh=1.2),
    "tiny-quickgelu": dict(seed=202, image=64, patch=16, hidden=48, heads=3, layers=3,
                           mlp=96, act="quick_gelu", mid=[32, 16], cells=37, dtype="F32",
                           prefix="model.backbone.clip.vision_model.", mid_prefix="model.mid.",
                           config="flat", mean=[0.5, 0.45, 0.4], std=[0.25, 0.3, 0.2],
                           scale_tanh=1.0),
    "tiny-bf16": dict(seed=303, image=56, patch=14, hidden=64, heads=4, layers=2,
                      mlp=256, act="gelu", mid=[64, 32], cells=50, dtype="BF16",
                      prefix="backbone.clip.", mid_prefix="mid.",
                      config="nested", mean=CLIP_MEAN, std=CLIP_STD, scale_tanh=1.2,
                      quadtree="quadtree_custom.csv"),
    "tiny-f16": dict(seed=404, image=224, patch=14, hidden=32, heads=1, layers=1,
                     mlp=64, act="gelu", mid=[32, 16], cells=20, dtype="F16",
                     prefix="backbone.clip.vision_model.", mid_prefix="mid.",
                     config="flat", mean=CLIP_MEAN, std=CLIP_STD, scale_tanh=1.2),
}


# ---- safetensors writer ----------------------------------------------------

ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2,
            "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_header(entries, metadata=None):
    """Lay out tensors as the safetensors library does.

    entries: list of (name, dtype, shape).  Returns (header bytes including
    the 8-byte length, list of (name, begin, end) in file order).  Tensors are
    ordered by item size (largest first, so every tensor stays aligned to its
    own size) then by name, and the JSON is padded with spaces to a multiple
    of 8 bytes so that the data starts 8-byte aligned.
    """
    order = sorted(entries, key=lambda e: (-ITEMSIZE[e[1]], e[0]))
    header = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    layout = []
    offset = 0
    for name, dtype, shape in order:
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype] if shape else ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": [int(s) for s in shape],
                        "data_offsets": [offset, offset + nbytes]}
        layout.append((name, offset, offset + nbytes))
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, layout


def to_bytes(arr, dtype):
    """The little-endian bytes of arr stored as dtype (BF16 rounded to nearest even)."""
    if dtype == "BF16":
        bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32).astype(np.uint64)
        # Round to nearest, ties to even, on the 16 bits that are dropped.
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.astype("<u2").tobytes()
    npdt = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
            "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}[dtype]
    return np.ascontiguousarray(arr).astype(npdt).tobytes()


def write_safetensors(path, tensors, metadata=None):
    """Write tensors, a dict name -> (numpy array, safetensors dtype), to path."""
    entries = [(n, dt, a.shape) for n, (a, dt) in tensors.items()]
    header, layout = safetensors_header(entries, metadata)
    with open(path, "wb") as f:
        f.write(header)
        for name, begin, end in layout:
            arr, dtype = tensors[name]
            data = to_bytes(arr, dtype)
            assert len(data) == end - begin
            f.write(data)


# ---- random weights ----------------------------------------------------------

def weight_specs(spec):
    """How to draw each tensor of a model, in checkpoint layout: a list of
    (name, shape, kind, scale), kind "normal" (N(0, scale)), "gain"
    (1 + N(0, scale)) or "ids" (0, 1, 2, ... as I64)."""
    d, p, f, s = spec["hidden"], spec["patch"], spec["mlp"], spec["image"]
    t = (s // p) ** 2 + 1
    bb, mid = spec["prefix"], spec["mid_prefix"]
    out = []

    def normal(name, shape, std):
        out.append((name, shape, "normal", std))

    def norm(name, n):
        # LayerNorm/GroupNorm gains near 1 and biases near 0, as trained ones are.
        out.append((name + ".weight", (n,), "gain", 0.1))
        normal(name + ".bias", (n,), 0.05)

    e = bb + "embeddings."
    normal(e + "class_embedding", (d,), d ** -0.5)
    # A patch embedding stronger than CLIP's 0.02 init so that image content,
    # not the position embedding, dominates the tokens.
    normal(e + "patch_embedding.weight", (d, 3, p, p), (3 * p * p) ** -0.5)
    normal(e + "position_embedding.weight", (t, d), 0.02)
    out.append((e + "position_ids", (1, t), "ids", 0))
    norm(bb + "pre_layrnorm", d)
    for i in range(spec["layers"]):
        lp = bb + "encoder.layers.%d." % i
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            # q and k at d^-0.5 give attention scores of order 1: neither
            # uniform nor one-hot attention.
            normal(lp + "self_attn.%s.weight" % proj, (d, d), d ** -0.5)
            normal(lp + "self_attn.%s.bias" % proj, (d,), 0.02)
        norm(lp + "layer_norm1", d)
        normal(lp + "mlp.fc1.weight", (f, d), d ** -0.5)
        normal(lp + "mlp.fc1.bias", (f,), 0.02)
        normal(lp + "mlp.fc2.weight", (d, f), 0.5 * f ** -0.5)
        normal(lp + "mlp.fc2.bias", (d,), 0.02)
        norm(lp + "layer_norm2", d)
    norm(bb + "post_layernorm", d)
    h0, h1 = spec["mid"]
    for branch, n_out in (("classif", spec["cells"]), ("reg", 2 * spec["cells"])):
        mp = mid + branch + "."
        norm(mp + "0", d)
        normal(mp + "1.weight", (h0, d), d ** -0.5)
        normal(mp + "1.bias", (h0,), 0.02)
        norm(mp + "2", h0)
        normal(mp + "4.weight", (h1, h0), h0 ** -0.5)
        normal(mp + "4.bias", (h1,), 0.02)
        norm(mp + "5", h1)
        # Logits of spread about 2: a clear argmax, yet image-dependent.
        normal(mp + "7.weight", (n_out, h1), 2.5 * h1 ** -0.5)
        normal(mp + "7.bias", (n_out,), 0.1)
    return out


def draw(shape, kind, scale, rng):
    """One tensor of weight_specs, float32 (int64 for "ids")."""
    if kind == "ids":
        return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(scale)
    if kind == "gain":
        a += np.float32(1)
    return a


def make_weights(spec, rng):
    """The tensors of one model: dict name -> float32/int64 numpy array."""
    return {name: draw(shape, kind, scale, rng) for name, shape, kind, scale in weight_specs(spec)}


def make_quadtree(n, rng):
    """n plausible quadtree cells: rows of (min_lat, min_lon, max_lat, max_lon, mean_lat, mean_lon)."""
    rows = []
    for i in range(n):
        lat_size = rng.uniform(0.05, 12.0)
        lon_size = rng.uniform(0.05, 24.0)
        lat0 = rng.uniform(-56.0, 72.0 - lat_size)
        lon0 = rng.uniform(-180.0, 180.0 - lon_size)
        if i == n - 1:
            # The last cell touches the north pole and the antimeridian, to
            # exercise the edges of the degree range.
            lon0 = 180.0 - lon_size
            lat0 = 90.0 - lat_size
        lat1, lon1 = lat0 + lat_size, lon0 + lon_size
        mlat = lat0 + lat_size * rng.uniform(0.15, 0.85)
        mlon = lon0 + lon_size * rng.uniform(0.15, 0.85)
        rows.append([round(v, 7) for v in (lat0, lon0, lat1, lon1, mlat, mlon)])
    return rows


def write_quadtree(path, rows):
    """Write the quadtree CSV with the header of quadtree_10_1000.csv."""
    with open(path, "w") as f:
        f.write("cluster_id,min_lat,min_lon,max_lat,max_lon,mean_lat,mean_lon\n")
        for i, r in enumerate(rows):
            f.write("%d,%s\n" % (i, ",".join(repr(float(v)) for v in r)))


def make_config(spec):
    """config.json for spec, in flat or the authors' nested form."""
    flat = {
        "hidden_size": spec["hidden"],
        "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"],
        "intermediate_size": spec["mlp"],
        "patch_size": spec["patch"],
        "image_size": spec["image"],
        "hidden_act": spec["act"],
        "layer_norm_eps": 1e-05,
    }
    if spec["config"] == "flat":
        flat.update(image_mean=spec["mean"], image_std=spec["std"], scale_tanh=spec["scale_tanh"])
        return flat
    s = spec["image"]
    nested = {
        "model": {
            "_target_": "models.networks.network.ContrastiveHybridUnFrozenBackbone",
            "backbone": {"instance": {"_target_": "models.networks.backbones.CLIP",
                                      "path": "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"},
                         "output_dim": spec["hidden"]},
            "mid": {"instance": {"_target_": "models.networks.mlp.MLPCentroid",
                                 "initial_dim": spec["hidden"], "hidden_dim": spec["mid"],
                                 "final_dim": 3 * spec["cells"]}},
            "head": {"instance": {"_target_": "models.networks.heads.hybrid.HybridHeadCentroid",
                                  "final_dim": spec["cells"], "use_tanh": True,
                                  "scale_tanh": spec["scale_tanh"],
                                  "quadtree_path": "some/dir/" + spec["quadtree"]}},
        },
        "transform": {
            "_target_": "torchvision.transforms.Compose",
            "transforms": [
                {"_target_": "torchvision.transforms.Resize", "size": s,
                 "interpolation": 3, "antialias": True},
                {"_target_": "torchvision.transforms.CenterCrop", "size": s},
                {"_target_": "torchvision.transforms.ToTensor"},
                {"_target_": "torchvision.transforms.Normalize",
                 "mean": spec["mean"], "std": spec["std"]},
            ],
        },
    }
    nested.update(flat)
    return nested


# ---- the published layout (pytorch_model.bin) --------------------------------

# The backbone paths the nested configs name: the laion tower uses exact
# gelu, OpenAI's quick_gelu.  Neither implies the tiny models' head counts,
# so those are given as the explicit top-level key.
PT_BACKBONE = {"gelu": "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K",
               "quick_gelu": "openai/clip-vit-base-patch32"}


def published_config(spec):
    """The authors' nested config.json, as save_as_huggingface writes it, plus
    num_attention_heads (a tiny model's head count no backbone path implies)."""
    s = spec["image"]
    return {
        "model": {
            "_target_": "models.networks.network.ContrastiveHybridUnFrozenBackbone",
            "mode": "eval",
            "backbone": {"instance": {"_target_": "models.networks.backbones.CLIP",
                                      "path": PT_BACKBONE[spec["act"]]},
                         "output_dim": spec["hidden"]},
            "mid": {"instance": {"_target_": "models.networks.mlp.MLPCentroid",
                                 "initial_dim": spec["hidden"], "hidden_dim": spec["mid"],
                                 "final_dim": 3 * spec["cells"],
                                 "norm": {"_target_": "torch.nn.GroupNorm", "_partial_": True,
                                          "num_groups": 4},
                                 "activation": {"_target_": "torch.nn.GELU", "_partial_": True}}},
            "head": {"instance": {"_target_": "models.networks.heads.hybrid.HybridHeadCentroid",
                                  "final_dim": spec["cells"], "use_tanh": True,
                                  "scale_tanh": spec["scale_tanh"],
                                  "quadtree_path": "utils/quadtree_10_1000.csv"}},
        },
        "transform": {
            "_target_": "torchvision.transforms.Compose",
            "transforms": [
                {"_target_": "torchvision.transforms.Resize", "size": s,
                 "interpolation": 3, "antialias": True},
                {"_target_": "torchvision.transforms.CenterCrop", "size": s},
                {"_target_": "torchvision.transforms.ToTensor"},
                {"_target_": "torchvision.transforms.Normalize",
                 "mean": spec["mean"], "std": spec["std"]},
            ],
        },
        "num_attention_heads": spec["heads"],
    }


def cell_buffers(rows):
    """HybridHeadCentroid's buffers from quadtree rows, as init_quadtree computes
    them: float64 [C, 2] center, size up, size down, normalised (lat/90, lon/180)."""
    q = np.array(rows, dtype=np.float64)
    norm = np.array([90.0, 180.0])
    center = np.stack([q[:, 4], q[:, 5]], axis=1) / norm
    up = np.stack([q[:, 2], q[:, 3]], axis=1) / norm - center
    down = center - np.stack([q[:, 0], q[:, 1]], axis=1) / norm
    return center, up, down


def canonical_name(name, spec):
    """The osv5m/baseline name of a tensor, without the model. prefix."""
    for old, new in ((spec["prefix"], "backbone.clip.vision_model."), (spec["mid_prefix"], "mid.")):
        if name.startswith(old):
            return new + name[len(old):]
    raise ValueError(name)


def torch_tensor(arr, dtype):
    """arr as a torch tensor stored as dtype; the same values to_bytes stores."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if arr.dtype == np.int64:
        return t
    conv = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    out = t.to(conv)
    assert out.numpy().tobytes() == to_bytes(arr, dtype) if dtype != "BF16" else \
        out.view(torch.int16).numpy().astype("<i2").tobytes() == to_bytes(arr, dtype)
    return out


def write_published(name, spec, weights, rows, out_dir):
    """<name>-pt/: pytorch_model.bin + the nested config.json, no CSV."""
    d = os.path.join(out_dir, name + "-pt")
    os.makedirs(d, exist_ok=True)
    for old in os.listdir(d):
        os.unlink(os.path.join(d, old))
    tensors = {}
    for n, a in weights.items():
        tensors[canonical_name(n, spec)] = torch_tensor(a, spec["dtype"])
    center, up, down = cell_buffers(rows)
    tensors["head.cell_center"] = torch.from_numpy(center.copy())
    tensors["head.cell_size_up"] = torch.from_numpy(up.copy())
    tensors["head.cell_size_down"] = torch.from_numpy(down.copy())
    # Geolocalizer registers the network as "model" and its parts again as
    # backbone, mid and head: every tensor twice, the same storage.
    sd = collections.OrderedDict()
    for part in ("backbone.", "mid.", "head."):
        for n, t in tensors.items():
            if n.startswith(part):
                sd["model." + n] = t
    for part in ("backbone.", "mid.", "head."):
        for n, t in tensors.items():
            if n.startswith(part):
                sd[n] = t
    sd._metadata = collections.OrderedDict(
        [("", {"version": 1}), ("model", {"version": 1}), ("backbone", {"version": 1})])
    torch.save(sd, os.path.join(d, "pytorch_model.bin"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(published_config(spec), f, indent=2)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
    print("%s: %d bytes" % (d, size))


def write_model(name, spec, out_dir):
    """Generate one model directory."""
    rng = np.random.Generator(np.random.PCG64(spec["seed"]))
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    weights = make_weights(spec, rng)
    tensors = {n: (a, "I64" if a.dtype == np.int64 else spec["dtype"]) for n, a in weights.items()}
    write_safetensors(os.path.join(d, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(make_config(spec), f, indent=2)
        f.write("\n")
    rows = make_quadtree(spec["cells"], rng)
    write_quadtree(os.path.join(d, spec.get("quadtree", "quadtree_10_1000.csv")), rows)
    size = sum(os.path.getsize(os.path.join(d, x)) for x in os.listdir(d))
    print("%s: %d bytes" % (d, size))
    if torch is None:
        sys.exit("python3-torch is needed for %s-pt (apt-get install python3-torch)" % name)
    write_published(name, spec, weights, rows, out_dir)


def main():
    """Command line: generate the named models, or all."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "models"))
    ap.add_argument("names", nargs="*")
    args = ap.parse_args()
    for name in args.names or sorted(MODELS):
        if name not in MODELS:
            sys.exit("unknown model %s (have %s)" % (name, ", ".join(sorted(MODELS))))
        write_model(name, MODELS[name], os.path.normpath(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
