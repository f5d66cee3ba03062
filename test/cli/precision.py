#!/usr/bin/python3
"""
precision.py: the osv5m tool's --precision, --feature and the precision
members of `osv5m info`, on the test model tiny-gelu.

  - a precision that is not fp32, bf16 or int8, --precision with convert
    and --feature with --batch 2 are usage errors: exit status 2 and a
    message;
  - info says fp32 is native and whether bf16 and int8 are (booleans), and
    names no pack cache file without --pack-cache; with --pack-cache DIR
    --precision bf16 (int8) it names the bf16 (int8) file, which exists in
    DIR, and no other;
  - geolocate --precision bf16 (int8) --feature gives the feature of the
    reference's bf16 (int8) mode (test/golden/models/tiny-gelu/bf16, int8)
    to the tolerance of test/unit/test_fidelity.c, and not the fp32 one;
    the same cell; in int8, at least one image as close as fp32 (as most
    of test_fidelity's runs are: see INT8_CLOSE_SHARE there);
  - bf16 and int8 with the pack cache are the same without it, byte for
    byte, and embed prints the same feature as geolocate --feature; fp32
    is the default;
  - bench --json --precision bf16 (int8) says so.

Usage: test/cli/precision.py [TOOL]   (default ./osv5m, built by make)
Prints "ok - NAME" or "FAIL - NAME: why"; the last line is
"tool precision: N passed, N failed".
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "test", "reference"))
import reference  # noqa: E402  (read_safetensors)

MODEL = os.path.join(ROOT, "test", "models", "tiny-gelu")
GOLDEN = os.path.join(ROOT, "test", "golden", "models", "tiny-gelu")
IMAGES = ["jpeg_420_640x480.jpg", "jpeg_cmyk_320x240.jpg", "png_rgba8_211x317.png"]
# test_fidelity.c's tolerances (see why there): the feature's relative
# error against the reference in the same precision, and its least
# relative distance to the fp32 reference
FEATURE_RTOL = {"fp32": 1e-4, "bf16": 3e-3, "int8": 1.5e-2}
MIN_DISTANCE = {"bf16": 5e-4, "int8": 1.25e-3}
REDUCED = ("bf16", "int8")

passed = 0
failed = 0


def check(ok, name, why=""):
    """Count and print one assertion."""
    global passed, failed
    if ok:
        passed += 1
        print("ok - %s" % name)
    else:
        failed += 1
        print("FAIL - %s: %s" % (name, why))


def tool(*args):
    """Run the tool: (exit status, stdout, stderr)."""
    p = subprocess.run([TOOL] + list(args), capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def lines(out):
    """The JSON objects of a tool's output, one per line."""
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def relative(a, b):
    """||a - b|| / ||b||."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    """Run the checks."""
    files = [os.path.join(ROOT, "test", "data", "images", name) for name in IMAGES]

    # ---- usage errors
    rc, _, err = tool("geolocate", "--model", MODEL, "--precision", "fp16", files[0])
    check(rc == 2 and 'invalid --precision "fp16" (fp32, bf16 or int8)' in err,
          "an unknown precision is a usage error", "exit %d, %r" % (rc, err))
    rc, _, err = tool("convert", "--model", MODEL, "--precision", "bf16", "--out", "/nonexistent")
    check(rc == 2 and "--precision is not an option of convert" in err,
          "convert has no --precision", "exit %d, %r" % (rc, err))
    rc, _, err = tool("geolocate", "--model", MODEL, "--feature", "--batch", "2", files[0])
    check(rc == 2 and "--feature needs --batch 1" in err, "--feature needs --batch 1",
          "exit %d, %r" % (rc, err))
    rc, out, _ = tool("geolocate", "--help")
    check(rc == 0 and "--precision P" in out and "--feature" in out,
          "geolocate --help names --precision and --feature", out[-300:])

    # ---- info
    rc, out, err = tool("info", "--model", MODEL, "--no-fingerprint")
    info = json.loads(out) if rc == 0 else {}
    native = info.get("precisions_native", {})
    check(native.get("fp32") is True and isinstance(native.get("bf16"), bool) and
          info.get("pack_cache_path") == "" and info.get("pack_cache_path_bf16") == "" and
          info.get("pack_cache_path_int8") == "",
          "info: precisions_native, no pack cache", "exit %d, %r %r" % (rc, out[-400:], err))
    check(isinstance(native.get("int8"), bool), "info: int8 in precisions_native",
          repr(native))
    with tempfile.TemporaryDirectory(prefix="osv5m-precision-") as cache:
        os.chmod(cache, 0o700)
        for precision in REDUCED:
            member = "pack_cache_path_" + precision
            others = [m for m in ("pack_cache_path", "pack_cache_path_bf16",
                                  "pack_cache_path_int8") if m != member]
            rc, out, err = tool("info", "--model", MODEL, "--no-fingerprint", "--pack-cache", cache,
                                "--precision", precision)
            info = json.loads(out) if rc == 0 else {}
            path = info.get(member, "")
            check(rc == 0 and path.startswith(cache + "/") and os.path.isfile(path) and
                  all(info.get(m) == "" for m in others) and "not using" not in err,
                  "info --pack-cache --precision %s opens the %s file only" % (precision, precision),
                  "exit %d, %r %r" % (rc, out[-400:], err))

        # ---- geolocate and embed
        rc, out, err = tool("geolocate", "--model", MODEL, "--feature", *files)
        fp32 = lines(out) if rc == 0 else []
        check(len(fp32) == len(files) and all(len(r.get("feature", [])) == 64 for r in fp32),
              "geolocate --feature prints the features", err)
        rc4, out4, _ = tool("geolocate", "--model", MODEL, "--feature", "--precision", "fp32", *files)
        check(rc4 == 0 and out4 == out, "fp32 is the default")
        reduced = {}
        for precision in REDUCED:
            rc2, out2, err2 = tool("geolocate", "--model", MODEL, "--feature", "--precision",
                                   precision, *files)
            reduced[precision] = lines(out2) if rc2 == 0 else []
            check(len(reduced[precision]) == len(files) and
                  all(len(r.get("feature", [])) == 64 for r in reduced[precision]),
                  "geolocate --feature --precision %s prints the features" % precision, err2)
            rc3, out3, err3 = tool("geolocate", "--model", MODEL, "--feature", "--precision",
                                   precision, "--pack-cache", cache, *files)
            check(rc3 == 0 and out3 == out2 and "not using" not in err3,
                  "%s with the pack cache is %s without it, byte for byte" % (precision, precision),
                  err3)
            rc5, out5, _ = tool("embed", "--model", MODEL, "--precision", precision, *files)
            check(rc5 == 0 and [r["embedding"] for r in lines(out5)] ==
                  [r["feature"] for r in reduced[precision]],
                  "embed --precision %s prints geolocate's %s feature" % (precision, precision))

    for i, (name, a) in enumerate(zip(IMAGES, fp32)):
        g32, _ = reference.read_safetensors(os.path.join(GOLDEN, name + ".safetensors"))
        check(relative(a["feature"], g32["feature"]) <= FEATURE_RTOL["fp32"] and
              a["cell"] == int(g32["cell"][0]), "%s: fp32 is the reference's fp32" % name)
        for precision in REDUCED:
            if i >= len(reduced[precision]):
                continue
            b = reduced[precision][i]
            g, _ = reference.read_safetensors(os.path.join(GOLDEN, precision, name + ".safetensors"))
            e = relative(b["feature"], g["feature"])
            d = relative(b["feature"], g32["feature"])
            check(e <= FEATURE_RTOL[precision] and d >= MIN_DISTANCE[precision] and
                  b["cell"] == int(g["cell"][0]),
                  "%s: %s is the reference's %s (feature %.3g), not fp32 (%.3g)" % (
                      name, precision, precision, e, d),
                  "cell %d, reference %d" % (b["cell"], int(g["cell"][0])))
    # where no quantization flip reached the feature, int8 agrees as fp32 does
    close = [relative(b["feature"], reference.read_safetensors(
        os.path.join(GOLDEN, "int8", name + ".safetensors"))[0]["feature"])
        for name, b in zip(IMAGES, reduced["int8"])]
    check(len(close) == len(IMAGES) and min(close) <= FEATURE_RTOL["fp32"],
          "int8: an image within %g of the reference's int8 feature" % FEATURE_RTOL["fp32"],
          repr(close))

    # ---- bench
    for precision in REDUCED:
        rc, out, err = tool("bench", "--json", "--model", MODEL, "--iters", "1", "--warmup", "0",
                            "--precision", precision, files[0])
        b = json.loads(out) if rc == 0 else {}
        check(b.get("precision") == precision and isinstance(b.get("native"), bool),
              "bench --json --precision %s says so" % precision, "exit %d, %r" % (rc, err))

    print("tool precision: %d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    TOOL = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.join(ROOT, "osv5m")
    sys.exit(main())
