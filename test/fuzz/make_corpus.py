#!/usr/bin/python3
"""
make_corpus.py: writes the seed corpora of the fuzz harnesses,
test/fuzz/corpus/image/ and test/fuzz/corpus/model/.

Every seed is made here, deterministically (fixed seeds, synthetic pixels),
so that the corpus can be regenerated and reviewed: small JPEGs and PNGs in
every colour mode and coding the decoder must handle, the edge cases a
hostile client sends (headers claiming huge sizes, truncation, bad CRC,
other formats), and for the loader a tiny complete model (8 wide, one
layer, 4 cells) in F32/F16/BF16 with its config and quadtree, plus broken
variants.  A few small files of test/data/images and the configs and
quadtrees of test/models are copied when present.  The total stays well
under 2 MB (checked at the end).

Model seeds use the input format of fuzz_model.c: the safetensors bytes,
config.json and the quadtree CSV separated by the line SPLIT.

Usage: make_corpus.py [--out test/fuzz/corpus]
"""

import argparse
import io
import json
import os
import shutil
import struct
import sys
import zlib

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SPLIT = b"\n==osv==\n"
MAX_TOTAL = 2 * 1024 * 1024
MAX_COPIED = 16 * 1024          # copy test images only up to this size


# ---- images ------------------------------------------------------------------

def pixels(w, h, seed):
    """A smooth gradient plus noise: compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                     (x + y) * 127 // max(w + h - 2, 1)], axis=-1)
    noise = rng.integers(-20, 21, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))


def png_raw(w, h, bit_depth, color_type, rows, interlace=0):
    """A PNG written by hand, for what PIL will not write (huge headers)."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) +
            png_chunk(b"IDAT", zlib.compress(rows, 9)) + png_chunk(b"IEND", b""))


def adam7_rows(w, h):
    """Filter-0 scanlines of the seven Adam7 passes of a w x h RGB image."""
    rows = b""
    for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                           (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)):
        pw, ph = (w - x0 + dx - 1) // dx, (h - y0 + dy - 1) // dy
        if pw <= 0 or ph <= 0:
            continue
        for y in range(ph):
            rows += b"\0" + bytes((x * 29 + y * 13 + c * 71) & 255
                                   for x in range(pw) for c in range(3))
    return rows


def jpeg_set_size(data, w, h):
    """Patch the frame header (SOF0/1/2) of a JPEG to claim w x h."""
    i = 2
    while i + 4 <= len(data):
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            return data[:i + 5] + struct.pack(">HH", h, w) + data[i + 9:]
        i += 2 + length
    raise ValueError("no SOF marker")


def image_seeds(out):
    rgb = Image.fromarray(pixels(32, 24, 1))
    seeds = {
        "rgb-444.jpg": encode(rgb, "JPEG", quality=80, subsampling=0),
        "rgb-422.jpg": encode(rgb, "JPEG", quality=60, subsampling=1),
        "rgb-420.jpg": encode(rgb, "JPEG", quality=40, subsampling=2),
        "rgb-progressive.jpg": encode(rgb, "JPEG", quality=70, progressive=True),
        "rgb-optimized.jpg": encode(rgb, "JPEG", quality=70, optimize=True),
        "gray.jpg": encode(rgb.convert("L"), "JPEG", quality=75),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=75),
        "1x1.jpg": encode(Image.new("RGB", (1, 1), (200, 10, 30)), "JPEG"),
        "odd-17x5.jpg": encode(Image.fromarray(pixels(17, 5, 2)), "JPEG"),
        "tall-1x300.jpg": encode(Image.fromarray(pixels(1, 300, 3)), "JPEG"),
        "rgb.png": encode(rgb, "PNG"),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "gray.png": encode(rgb.convert("L"), "PNG"),
        "gray-alpha.png": encode(rgb.convert("LA"), "PNG"),
        "palette.png": encode(rgb.convert("P", palette=Image.ADAPTIVE, colors=16), "PNG"),
        "bilevel.png": encode(rgb.convert("1"), "PNG"),
        "gray16.png": encode(Image.fromarray((pixels(16, 8, 4)[:, :, 0].astype(np.uint16) * 257),
                                             "I;16"), "PNG"),
        "1x1.png": encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"),
        "wide-10000x1.png": png_raw(10000, 1, 8, 0, b"\0" + bytes(10000)),
        "wide-10000x1.jpg": encode(Image.new("RGB", (10000, 1), (90, 120, 200)), "JPEG", quality=50),
        "rgb16.png": png_raw(4, 2, 16, 2, b"".join(b"\0" + bytes(range(i, i + 24)) for i in range(2))),
        "interlaced.png": png_raw(9, 9, 8, 2, adam7_rows(9, 9), 1),
    }
    # palette with transparency
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=8)
    seeds["palette-trns.png"] = encode(pal, "PNG", transparency=0)
    # hostile headers: the decoder must refuse before allocating
    seeds["claims-65000x65000.jpg"] = jpeg_set_size(seeds["rgb-420.jpg"], 65000, 65000)
    seeds["claims-0x0.jpg"] = jpeg_set_size(seeds["rgb-420.jpg"], 0, 0)
    seeds["claims-huge.png"] = png_raw(0x7fffffff, 0x7fffffff, 8, 2, b"\0" * 16)
    seeds["claims-3000x3000.png"] = png_raw(3000, 3000, 8, 2, b"\0" * 64)
    bad_crc = bytearray(seeds["rgb.png"])
    bad_crc[29] ^= 0xff                       # IHDR CRC
    seeds["bad-crc.png"] = bytes(bad_crc)
    seeds["truncated.jpg"] = seeds["rgb-444.jpg"][:len(seeds["rgb-444.jpg"]) // 2]
    seeds["truncated.png"] = seeds["rgb.png"][:len(seeds["rgb.png"]) // 2]
    seeds["soi-only.jpg"] = b"\xff\xd8\xff"
    seeds["signature-only.png"] = b"\x89PNG\r\n\x1a\n"
    seeds["gif.gif"] = encode(rgb.convert("P"), "GIF")
    seeds["text.txt"] = b"this is not an image\n"
    seeds["empty"] = b""

    # a few small images of the test suite, if engineer-made ones exist
    src = os.path.join(ROOT, "test", "data", "images")
    if os.path.isdir(src):
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if os.path.isfile(path) and os.path.getsize(path) <= MAX_COPIED:
                with open(path, "rb") as f:
                    seeds["testdata-" + name] = f.read()
    write_all(out, seeds)


# ---- models ------------------------------------------------------------------

def to_dtype(a, dtype):
    a = a.astype(np.float32)
    if dtype == "F32":
        return a.tobytes()
    if dtype == "F16":
        return a.astype(np.float16).tobytes()
    # BF16: round to nearest even from float32 bits
    bits = a.view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
    return bits.astype(np.uint16).tobytes()


def safetensors(tensors, metadata=True):
    """tensors: list of (name, dtype, shape, bytes)."""
    header = {}
    if metadata:
        header["__metadata__"] = {"format": "pt"}
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in tensors)


def tiny_model(dtype="F32", prefix="backbone.clip.vision_model.", mid="mid."):
    """8 wide, 1 layer, 2 heads, MLP 16, patch 4, image 8, mid [8, 8], 4 cells."""
    rng = np.random.default_rng(7)
    d, f, p, s, h1, h2, c = 8, 16, 4, 8, 8, 8, 4
    t = (s // p) ** 2 + 1
    out = []

    def add(name, *shape, one=False):
        a = rng.normal(0, 0.2, size=shape)
        if one:
            a += 1
        out.append((name, dtype, shape, to_dtype(a, dtype)))

    out.append((prefix + "embeddings.position_ids", "I64", (1, t),
                np.arange(t, dtype=np.int64).tobytes()))
    add(prefix + "embeddings.class_embedding", d)
    add(prefix + "embeddings.patch_embedding.weight", d, 3, p, p)
    add(prefix + "embeddings.position_embedding.weight", t, d)
    add(prefix + "pre_layrnorm.weight", d, one=True)
    add(prefix + "pre_layrnorm.bias", d)
    lp = prefix + "encoder.layers.0."
    for proj in "qkv":
        add(lp + "self_attn.%s_proj.weight" % proj, d, d)
        add(lp + "self_attn.%s_proj.bias" % proj, d)
    add(lp + "self_attn.out_proj.weight", d, d)
    add(lp + "self_attn.out_proj.bias", d)
    add(lp + "layer_norm1.weight", d, one=True)
    add(lp + "layer_norm1.bias", d)
    add(lp + "mlp.fc1.weight", f, d)
    add(lp + "mlp.fc1.bias", f)
    add(lp + "mlp.fc2.weight", d, f)
    add(lp + "mlp.fc2.bias", d)
    add(lp + "layer_norm2.weight", d, one=True)
    add(lp + "layer_norm2.bias", d)
    add(prefix + "post_layernorm.weight", d, one=True)
    add(prefix + "post_layernorm.bias", d)
    for branch, width in (("classif", c), ("reg", 2 * c)):
        bp = mid + branch + "."
        add(bp + "0.weight", d, one=True)
        add(bp + "0.bias", d)
        add(bp + "1.weight", h1, d)
        add(bp + "1.bias", h1)
        add(bp + "2.weight", h1, one=True)
        add(bp + "2.bias", h1)
        add(bp + "4.weight", h2, h1)
        add(bp + "4.bias", h2)
        add(bp + "5.weight", h2, one=True)
        add(bp + "5.bias", h2)
        add(bp + "7.weight", width, h2)
        add(bp + "7.bias", width)
    return out


TINY_CONFIG = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
               "intermediate_size": 16, "patch_size": 4, "image_size": 8,
               "hidden_act": "gelu", "layer_norm_eps": 1e-5,
               "image_mean": [0.48145466, 0.4578275, 0.40821073],
               "image_std": [0.26862954, 0.26130258, 0.27577711], "scale_tanh": 1.2}

QUADTREE = (b"cluster_id,min_lat,min_lon,max_lat,max_lon,mean_lat,mean_lon\n"
            b"0,10.5,-20.25,30.0,0.0,20.0,-10.0\n"
            b"1,-45.0,100.0,-10.0,170.5,-30.0,140.0\n"
            b"2,50.0,-5.0,60.0,15.0,55.5,5.5\n"
            b"3,-89.9,-179.9,89.9,179.9,0.0,0.0\n")


def model_seed(st, config, quadtree):
    parts = [st]
    if config is not None:
        parts.append(json.dumps(config, indent=1).encode() if isinstance(config, dict) else config)
        if quadtree is not None:
            parts.append(quadtree)
    return SPLIT.join(parts)


def model_seeds(out):
    good = tiny_model()
    st = safetensors(good)
    seeds = {
        "tiny-f32": model_seed(st, TINY_CONFIG, QUADTREE),
        "tiny-f16": model_seed(safetensors(tiny_model("F16")), TINY_CONFIG, QUADTREE),
        "tiny-bf16": model_seed(safetensors(tiny_model("BF16")), TINY_CONFIG, QUADTREE),
        "tiny-prefixed": model_seed(safetensors(tiny_model(prefix="model.backbone.clip.vision_model.",
                                                           mid="model.mid.")),
                                    TINY_CONFIG, QUADTREE),
        "tiny-plain-clip": model_seed(safetensors(tiny_model(prefix="clip.")), TINY_CONFIG, QUADTREE),
        "tiny-no-metadata": model_seed(safetensors(good, metadata=False), TINY_CONFIG, QUADTREE),
        "tiny-quick-gelu": model_seed(st, dict(TINY_CONFIG, hidden_act="quick_gelu"), QUADTREE),
        "tiny-nested-config": model_seed(st, {
            "model": {"head": {"instance": {"scale_tanh": 1.0,
                                            "quadtree_path": "x/quadtree_10_1000.csv"}}},
            "transform": {"transforms": [{"size": 8}, {"size": 8},
                                         {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}]},
            "hidden_size": 8, "num_attention_heads": 2, "patch_size": 4, "image_size": 8}, QUADTREE),
        "no-config": st,
        # broken ones, one fault each
        "truncated-weights": model_seed(st[:len(st) - 100], TINY_CONFIG, QUADTREE),
        "header-past-end": model_seed(struct.pack("<Q", len(st)) + st[8:], TINY_CONFIG, QUADTREE),
        "header-huge": model_seed(struct.pack("<Q", 0xffffffffffffff00) + st[8:], TINY_CONFIG, QUADTREE),
        "bad-heads": model_seed(st, dict(TINY_CONFIG, num_attention_heads=3), QUADTREE),
        "zero-heads": model_seed(st, dict(TINY_CONFIG, num_attention_heads=0), QUADTREE),
        "wrong-image-size": model_seed(st, dict(TINY_CONFIG, image_size=12), QUADTREE),
        "config-not-json": model_seed(st, b"{\"hidden_size\": 8,", QUADTREE),
        "quadtree-short": model_seed(st, TINY_CONFIG, QUADTREE[:QUADTREE.rindex(b"3,")]),
        "quadtree-bad-number": model_seed(st, TINY_CONFIG, QUADTREE.replace(b"55.5", b"5x.5")),
        "quadtree-no-header": model_seed(st, TINY_CONFIG, QUADTREE.split(b"\n", 1)[1]),
    }
    # overlapping offsets, a missing tensor, a wrong shape, a bad dtype
    hdr_len = struct.unpack("<Q", st[:8])[0]
    header = json.loads(st[8:8 + hdr_len])
    data = st[8 + hdr_len:]

    def rewrite(h):
        text = json.dumps(h, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + data

    names = [k for k in header if k != "__metadata__"]
    h = json.loads(json.dumps(header))
    h[names[2]]["data_offsets"] = list(h[names[1]]["data_offsets"])
    h[names[2]]["shape"] = list(h[names[1]]["shape"])
    seeds["overlapping-offsets"] = model_seed(rewrite(h), TINY_CONFIG, QUADTREE)
    h = json.loads(json.dumps(header))
    del h["mid.reg.7.bias"]
    seeds["missing-tensor"] = model_seed(rewrite(h), TINY_CONFIG, QUADTREE)
    h = json.loads(json.dumps(header))
    h["mid.classif.7.weight"]["shape"] = [8, 4]
    seeds["wrong-shape"] = model_seed(rewrite(h), TINY_CONFIG, QUADTREE)
    h = json.loads(json.dumps(header))
    h["mid.classif.7.bias"]["dtype"] = "F8_E4M3"
    seeds["bad-dtype"] = model_seed(rewrite(h), TINY_CONFIG, QUADTREE)
    h = json.loads(json.dumps(header))
    h["mid.classif.7.bias"]["data_offsets"] = [0, 2 ** 63]
    seeds["offset-overflow"] = model_seed(rewrite(h), TINY_CONFIG, QUADTREE)

    # configs and quadtrees of the engineer-made test models, on the tiny weights
    src = os.path.join(ROOT, "test", "models")
    if os.path.isdir(src):
        for name in sorted(os.listdir(src)):
            d = os.path.join(src, name)
            cfg = os.path.join(d, "config.json")
            if os.path.isfile(cfg):
                with open(cfg, "rb") as f:
                    seeds["config-" + name] = model_seed(st, f.read(), QUADTREE)
            for q in sorted(os.listdir(d)):
                if q.endswith(".csv") and os.path.getsize(os.path.join(d, q)) <= MAX_COPIED:
                    with open(os.path.join(d, q), "rb") as f:
                        seeds["quadtree-" + name] = model_seed(st, TINY_CONFIG, f.read())
    write_all(out, seeds)


def write_all(out, seeds):
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    for name, data in sorted(seeds.items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out", default=os.path.join(HERE, "corpus"))
    args = ap.parse_args()
    image_seeds(os.path.join(args.out, "image"))
    model_seeds(os.path.join(args.out, "model"))
    total = sum(os.path.getsize(os.path.join(dp, f))
                for dp, _, fs in os.walk(args.out) for f in fs)
    print("corpus: %d bytes in %s" % (total, args.out))
    if total > MAX_TOTAL:
        sys.exit("corpus is over %d bytes" % MAX_TOTAL)


if __name__ == "__main__":
    main()
