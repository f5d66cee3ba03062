#!/usr/bin/env python3
"""
golden_csv.py DIR: the PyTorch reference's answers in DIR (test/golden/models/
MODEL/*.safetensors, written by test/reference/make_golden.py) as CSV lines
for COPY ... FROM PROGRAM, one per image and rank:

    image, rank, cell, probability, lat, lon, regression_rms, feature

feature is the class-token feature as a PostgreSQL array literal (rank 1
only, empty otherwise); regression_rms is the root mean square of the
regression outputs, which scales the point tolerance (see test_fidelity.c).
Only the standard library: the golden files are read as bytes.
"""

import json
import math
import os
import struct
import sys


def read_tensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    codes = {"F32": "f", "F64": "d", "I64": "q"}
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        begin, end = t["data_offsets"]
        code = codes[t["dtype"]]
        count = (end - begin) // struct.calcsize(code)
        out[name] = struct.unpack("<%d%s" % (count, code), data[begin:end])
    return out


def main():
    directory = sys.argv[1]
    w = sys.stdout.write
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".safetensors"):
            continue
        t = read_tensors(os.path.join(directory, name))
        image = name[:-len(".safetensors")]
        reg = t["regression"]
        rms = math.sqrt(sum(x * x for x in reg) / len(reg))
        feature = "{" + ",".join(repr(x) for x in t["feature"]) + "}"
        for i, cell in enumerate(t["topk_cells"]):
            w("%s,%d,%d,%r,%r,%r,%r,%s\n" % (
                image, i + 1, cell, t["topk_probs"][i],
                t["topk_latlon"][2 * i], t["topk_latlon"][2 * i + 1], rms,
                "\"" + feature + "\"" if i == 0 else ""))


if __name__ == "__main__":
    main()
