#!/usr/bin/env python3
"""
hostile_models.py: writes broken model directories for sql/hostile_models.sql.

  hostile_models.py make SRC OUT [PT_SRC]
                                     one directory per fault under OUT, each a
                                     copy of the good model SRC with one fault;
                                     with PT_SRC (a model in the published
                                     layout: config.json + pytorch_model.bin),
                                     also one directory per fault of that
                                     layout, named pt-*
  hostile_models.py swap OUT MODEL   make OUT/live a copy of MODEL, replacing
                                     what was there atomically (a new directory
                                     renamed over the old one)
  hostile_models.py inplace OUT FILE A
                                     overwrite OUT/live/FILE in place (same
                                     inode, like cp) with A's FILE
  hostile_models.py truncate OUT FILE N
                                     truncate OUT/live/FILE in place to N bytes

Only the standard library: the faults are made on the bytes and the JSON
header of model.safetensors, or on the bytes of the zip archive that
torch.save writes (same-length edits: the reader does not check CRC-32s),
never by re-running a model generator, so each directory differs from the
good one in exactly one way.  Everything is
written with mode 0644/0755 so the server (another user) can read it.
Prints nothing on success (the calling pg_regress test compares output).
"""

import json
import os
import shutil
import struct
import sys
import zipfile

FAULTS = []


def fault(fn):
    FAULTS.append(fn)
    return fn


def read_st(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def pack_st(header, data):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def drop_tensor(header, data, name):
    """Remove a tensor and its bytes, shifting the later offsets down."""
    begin, end = header[name]["data_offsets"]
    del header[name]
    for k, v in header.items():
        if k != "__metadata__" and v["data_offsets"][0] >= end:
            v["data_offsets"] = [v["data_offsets"][0] - (end - begin),
                                 v["data_offsets"][1] - (end - begin)]
    return header, data[:begin] + data[end:]


def tensors(header):
    return sorted((k for k in header if k != "__metadata__"),
                  key=lambda k: header[k]["data_offsets"][0])


@fault
def truncated_weights(d, raw, header, data):
    write(d, "model.safetensors", raw[:len(raw) * 6 // 10])


@fault
def empty_weights(d, raw, header, data):
    write(d, "model.safetensors", b"")


@fault
def header_past_end(d, raw, header, data):
    write(d, "model.safetensors", struct.pack("<Q", len(raw)) + raw[8:])


@fault
def header_length_huge(d, raw, header, data):
    write(d, "model.safetensors", struct.pack("<Q", 2 ** 63 + 8) + raw[8:])


@fault
def header_not_json(d, raw, header, data):
    n = struct.unpack("<Q", raw[:8])[0]
    write(d, "model.safetensors", raw[:8] + b"[" * n + raw[8 + n:])


@fault
def overlapping_offsets(d, raw, header, data):
    names = tensors(header)
    a, b = header[names[5]], header[names[6]]
    # b starts inside a; sizes stay consistent with shapes
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0] + 4, a["data_offsets"][0] + 4 + size]
    write(d, "model.safetensors", pack_st(header, data))


@fault
def offsets_past_end(d, raw, header, data):
    last = header[tensors(header)[-1]]
    last["data_offsets"] = [last["data_offsets"][0] + 64, last["data_offsets"][1] + 64]
    write(d, "model.safetensors", pack_st(header, data))


@fault
def missing_tensor(d, raw, header, data):
    name = [k for k in header if k.endswith("mid.reg.7.bias")][0]
    header, data = drop_tensor(header, data, name)
    write(d, "model.safetensors", pack_st(header, data))


@fault
def missing_layer_tensor(d, raw, header, data):
    name = [k for k in header if k.endswith("encoder.layers.1.mlp.fc2.weight")][0]
    header, data = drop_tensor(header, data, name)
    write(d, "model.safetensors", pack_st(header, data))


@fault
def wrong_shape(d, raw, header, data):
    t = header[[k for k in header if k.endswith("mid.classif.7.weight")][0]]
    t["shape"] = [t["shape"][1], t["shape"][0]]     # same byte count
    write(d, "model.safetensors", pack_st(header, data))


@fault
def shape_bytes_mismatch(d, raw, header, data):
    t = header[[k for k in header if k.endswith("mid.classif.7.bias")][0]]
    t["shape"] = [t["shape"][0] * 2]
    write(d, "model.safetensors", pack_st(header, data))


@fault
def bad_dtype(d, raw, header, data):
    header[[k for k in header if k.endswith("pre_layrnorm.weight")][0]]["dtype"] = "F8_E5M2"
    write(d, "model.safetensors", pack_st(header, data))


@fault
def integer_weights(d, raw, header, data):
    header[[k for k in header if k.endswith("pre_layrnorm.weight")][0]]["dtype"] = "I32"
    write(d, "model.safetensors", pack_st(header, data))


@fault
def csv_not_numbers(d, raw, header, data):
    lines = read(d, "quadtree_10_1000.csv").split(b"\n")
    lines[3] = b"2,north,-46.6,64.8,-32.3,63.9,-38.4"
    write(d, "quadtree_10_1000.csv", b"\n".join(lines))


@fault
def csv_too_few_rows(d, raw, header, data):
    lines = read(d, "quadtree_10_1000.csv").rstrip(b"\n").split(b"\n")
    write(d, "quadtree_10_1000.csv", b"\n".join(lines[:-10]) + b"\n")


@fault
def csv_missing_column(d, raw, header, data):
    lines = read(d, "quadtree_10_1000.csv").split(b"\n")
    lines[5] = lines[5].rsplit(b",", 1)[0]
    write(d, "quadtree_10_1000.csv", b"\n".join(lines))


@fault
def csv_binary(d, raw, header, data):
    write(d, "quadtree_10_1000.csv", bytes(range(256)) * 4)


@fault
def csv_missing(d, raw, header, data):
    os.unlink(os.path.join(d, "quadtree_10_1000.csv"))


@fault
def config_not_json(d, raw, header, data):
    write(d, "config.json", b'{"hidden_size": 64, "num_attention_heads": ')


@fault
def config_heads_not_dividing(d, raw, header, data):
    cfg = json.loads(read(d, "config.json"))
    cfg["num_attention_heads"] = 3
    write(d, "config.json", json.dumps(cfg).encode())


@fault
def config_wrong_image_size(d, raw, header, data):
    cfg = json.loads(read(d, "config.json"))
    cfg["image_size"] = 448
    write(d, "config.json", json.dumps(cfg).encode())


@fault
def weights_missing(d, raw, header, data):
    os.unlink(os.path.join(d, "model.safetensors"))


@fault
def weights_is_directory(d, raw, header, data):
    os.unlink(os.path.join(d, "model.safetensors"))
    os.mkdir(os.path.join(d, "model.safetensors"))


# ---- faults of the published layout (pytorch_model.bin, a zip archive) ----

PT_FAULTS = []


def pt_fault(fn):
    PT_FAULTS.append(fn)
    return fn


def zip_entries(raw):
    """name -> (local header offset, central header offset) of each entry."""
    eocd = raw.rindex(b"PK\x05\x06")
    count, _, cd_offset = struct.unpack("<HII", raw[eocd + 10:eocd + 20])
    entries, pos = {}, cd_offset
    for _ in range(count):
        assert raw[pos:pos + 4] == b"PK\x01\x02"
        n, m, k = struct.unpack("<HHH", raw[pos + 28:pos + 34])
        local = struct.unpack("<I", raw[pos + 42:pos + 46])[0]
        entries[raw[pos + 46:pos + 46 + n].decode()] = (local, pos)
        pos += 46 + n + m + k
    return entries


def entry(entries, suffix):
    return [v for k, v in entries.items() if k.endswith(suffix)][0]


def patch(raw, offset, data):
    return raw[:offset] + data + raw[offset + len(data):]


@pt_fault
def pt_truncated(d, raw):
    write(d, "pytorch_model.bin", raw[:len(raw) * 6 // 10])


@pt_fault
def pt_empty(d, raw):
    write(d, "pytorch_model.bin", b"")


@pt_fault
def pt_forbidden_global(d, raw):
    # the state dict's class replaced by a callable of the same length
    old = b"collections\nOrderedDict\n"
    assert raw.count(old) == 1
    write(d, "pytorch_model.bin", raw.replace(old, b"subprocess\ncheck_output\n"))


@pt_fault
def pt_compressed_entry(d, raw):
    local, central = entry(zip_entries(raw), "/data.pkl")
    raw = patch(raw, local + 8, struct.pack("<H", 8))      # deflate
    write(d, "pytorch_model.bin", patch(raw, central + 10, struct.pack("<H", 8)))


@pt_fault
def pt_storage_short(d, raw):
    # a weight's storage declares 64 bytes fewer than its tensor needs
    local, central = entry(zip_entries(raw), "/data/1")
    size = struct.unpack("<I", raw[central + 24:central + 28])[0] - 64
    for offset in (local + 18, local + 22, central + 20, central + 24):
        raw = patch(raw, offset, struct.pack("<I", size))
    write(d, "pytorch_model.bin", raw)


@pt_fault
def pt_central_directory_past_end(d, raw):
    # torch.save writes the ZIP64 end record too, which readers prefer
    eocd = raw.rindex(b"PK\x05\x06")
    raw = patch(raw, eocd + 16, struct.pack("<I", len(raw) + 100))
    eocd64 = raw.rindex(b"PK\x06\x06")
    write(d, "pytorch_model.bin", patch(raw, eocd64 + 48, struct.pack("<Q", len(raw) + 100)))


@pt_fault
def pt_legacy_format(d, raw):
    # what torch.save wrote before PyTorch 1.6: a bare pickle stream
    with zipfile.ZipFile(os.path.join(d, "pytorch_model.bin")) as z:
        pkl = z.read([n for n in z.namelist() if n.endswith("/data.pkl")][0])
    write(d, "pytorch_model.bin", pkl)


@pt_fault
def pt_unknown_backbone(d, raw):
    cfg = json.loads(read(d, "config.json"))
    cfg["model"]["backbone"]["instance"]["path"] = "example/unknown-vit"
    del cfg["num_attention_heads"]
    write(d, "config.json", json.dumps(cfg).encode())


@pt_fault
def pt_csv_disagrees(d, raw):
    # the good model's CSV with one cell's bounds moved: must name the cell
    lines = read(os.environ["HOSTILE_GOOD"], "quadtree_10_1000.csv").split(b"\n")
    fields = lines[8].split(b",")
    fields[2] = b"%r" % (float(fields[2]) + 0.5)
    lines[8] = b",".join(fields)
    write(d, "quadtree_10_1000.csv", b"\n".join(lines))


@pt_fault
def pt_csv_agrees(d, raw):
    # not a fault: the good model's own CSV, which matches the buffers
    write(d, "quadtree_10_1000.csv", read(os.environ["HOSTILE_GOOD"], "quadtree_10_1000.csv"))


def read(d, name):
    with open(os.path.join(d, name), "rb") as f:
        return f.read()


def write(d, name, data):
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, 0o644)


def copy_model(src, dst):
    shutil.copytree(src, dst)
    os.chmod(dst, 0o755)
    for name in os.listdir(dst):
        os.chmod(os.path.join(dst, name), 0o644)


def make(src, out, pt_src=None):
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    os.chmod(out, 0o755)
    raw = read(src, "model.safetensors")
    for fn in FAULTS:
        d = os.path.join(out, fn.__name__.replace("_", "-"))
        copy_model(src, d)
        header, data = read_st(os.path.join(src, "model.safetensors"))
        fn(d, raw, header, data)
    if pt_src is None:
        return
    raw = read(pt_src, "pytorch_model.bin")
    for fn in PT_FAULTS:
        d = os.path.join(out, fn.__name__.replace("_", "-"))
        copy_model(pt_src, d)
        fn(d, raw)


def swap(out, model):
    """Replace out/live by a copy of model atomically (rename over it)."""
    live = os.path.join(out, "live")
    new = os.path.join(out, "live.new")
    old = os.path.join(out, "live.old")
    for p in (new, old):
        if os.path.lexists(p):
            shutil.rmtree(p)
    copy_model(model, new)
    if os.path.lexists(live):
        os.rename(live, old)
    os.rename(new, live)
    if os.path.lexists(old):
        shutil.rmtree(old)      # sessions still hold the old inodes open


def inplace(out, name, model):
    """Overwrite out/live/name keeping its inode (O_TRUNC, then write)."""
    with open(os.path.join(model, name), "rb") as f:
        data = f.read()
    with open(os.path.join(out, "live", name), "r+b") as f:
        f.truncate(0)
        f.write(data)


def truncate(out, name, size):
    with open(os.path.join(out, "live", name), "r+b") as f:
        f.truncate(int(size))


def main(argv):
    if argv[1:2] == ["make"] and len(argv) == 5:
        return make(*argv[2:5])
    cmds = {"make": (make, 2), "swap": (swap, 2), "inplace": (inplace, 3),
            "truncate": (truncate, 3)}
    if len(argv) < 2 or argv[1] not in cmds or len(argv) - 2 < cmds[argv[1]][1]:
        sys.exit(__doc__)
    fn, nargs = cmds[argv[1]]
    fn(*argv[2:2 + nargs])


if __name__ == "__main__":
    main(sys.argv)
