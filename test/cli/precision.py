#!/usr/bin/python3
"""
precision.py: the osv5m tool's --precision, --feature and the precision
members of `osv5m info`, on the test model tiny-gelu.

  - a precision that is not fp32 or bf16, --precision with convert and
    --feature with --batch 2 are usage errors: exit status 2 and a message;
  - info says fp32 is native and whether bf16 is (a boolean), and names no
    pack cache file without --pack-cache; with --pack-cache DIR --precision
    bf16 it names the bf16 file, which exists in DIR, and no fp32 one;
  - geolocate --precision bf16 --feature gives the feature of the reference's
    bf16 mode (test/golden/models/tiny-gelu/bf16) to the tolerance of
    test/unit/test_fidelity.c, and not the fp32 one; the same cell;
  - bf16 with the pack cache is bf16 without it, byte for byte, and embed
    prints the same feature as geolocate --feature; fp32 is the default;
  - bench --json --precision bf16 says so.

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
# test_fidelity.c's BF16_FEATURE_RTOL and BF16_MIN_DISTANCE (see why there)
BF16_FEATURE_RTOL = 3e-3
BF16_MIN_DISTANCE = 5e-4

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
    with tempfile.TemporaryDirectory(prefix="osv5m-precision-") as cache:
        os.chmod(cache, 0o700)
        rc, out, err = tool("info", "--model", MODEL, "--no-fingerprint", "--pack-cache", cache,
                            "--precision", "bf16")
        info = json.loads(out) if rc == 0 else {}
        path = info.get("pack_cache_path_bf16", "")
        check(rc == 0 and path.startswith(cache + "/") and os.path.isfile(path) and
              info.get("pack_cache_path") == "" and info.get("pack_cache_path_int8") == "" and
              "not using" not in err,
              "info --pack-cache --precision bf16 opens the bf16 file only",
              "exit %d, %r %r" % (rc, out[-400:], err))

        # ---- geolocate and embed
        rc, out, err = tool("geolocate", "--model", MODEL, "--feature", *files)
        fp32 = lines(out) if rc == 0 else []
        rc2, out2, err2 = tool("geolocate", "--model", MODEL, "--feature", "--precision", "bf16",
                               *files)
        bf16 = lines(out2) if rc2 == 0 else []
        check(len(fp32) == len(files) and len(bf16) == len(files) and
              all(len(r.get("feature", [])) == 64 for r in fp32 + bf16),
              "geolocate --feature prints the features", "%r %r" % (err, err2))
        rc3, out3, err3 = tool("geolocate", "--model", MODEL, "--feature", "--precision", "bf16",
                               "--pack-cache", cache, *files)
        check(rc3 == 0 and out3 == out2 and "not using" not in err3,
              "bf16 with the pack cache is bf16 without it, byte for byte", err3)
        rc4, out4, _ = tool("geolocate", "--model", MODEL, "--feature", "--precision", "fp32", *files)
        check(rc4 == 0 and out4 == out, "fp32 is the default")
        rc5, out5, _ = tool("embed", "--model", MODEL, "--precision", "bf16", *files)
        check(rc5 == 0 and [r["embedding"] for r in lines(out5)] == [r["feature"] for r in bf16],
              "embed --precision bf16 prints geolocate's bf16 feature")

    for name, a, b in zip(IMAGES, fp32, bf16):
        g16, _ = reference.read_safetensors(os.path.join(GOLDEN, "bf16", name + ".safetensors"))
        g32, _ = reference.read_safetensors(os.path.join(GOLDEN, name + ".safetensors"))
        e = relative(b["feature"], g16["feature"])
        d = relative(b["feature"], g32["feature"])
        check(e <= BF16_FEATURE_RTOL and d >= BF16_MIN_DISTANCE and b["cell"] == int(g16["cell"][0]),
              "%s: bf16 is the reference's bf16 (feature %.3g), not fp32 (%.3g)" % (name, e, d),
              "cell %d, reference %d" % (b["cell"], int(g16["cell"][0])))
        check(relative(a["feature"], g32["feature"]) <= 1e-4 and a["cell"] == int(g32["cell"][0]),
              "%s: fp32 is the reference's fp32" % name)

    # ---- bench
    rc, out, err = tool("bench", "--json", "--model", MODEL, "--iters", "1", "--warmup", "0",
                        "--precision", "bf16", files[0])
    b = json.loads(out) if rc == 0 else {}
    check(b.get("precision") == "bf16" and isinstance(b.get("native"), bool),
          "bench --json --precision bf16 says so", "exit %d, %r" % (rc, err))

    print("tool precision: %d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    TOOL = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.join(ROOT, "osv5m")
    sys.exit(main())
