#!/usr/bin/python3
"""Write what Pillow and torchvision make of the test images.

Usage (from the repository root, after make_images.py):
    /usr/bin/python3 test/reference/image_golden.py [imagedir] [outdir]

For each image in test/data/images this records, in test/golden/images:
  - the decoded RGB image, Image.open(f).convert("RGB");
  - torchvision's Resize(224, BICUBIC, antialias=True) of it (a PIL image)
    and the box CenterCrop(224) takes from it;
  - for a few images, Image.resize((w, h), BICUBIC) at other sizes;
  - for a few images cut short at several points, whether Pillow (with
    LOAD_TRUNCATED_IMAGES off, its default) still decodes them.
Pixels go to binary PPM (P6) files; large results are recorded as the
64-bit FNV-1a hash of their bytes.  MANIFEST lists everything, one line per
check, so the C test needs no JSON and none of our own decoders:

  decode FILE W H REF
  preprocess FILE RW RH LEFT TOP RESIZED_REF CROP_REF
  resize FILE W H REF
  cut FILE NBYTES ok REF | cut FILE NBYTES fail

FILE is relative to the repository root; REF is a PPM path relative to the
repository root, fnv:HEX16 (FNV-1a of the RGB bytes, rows top to bottom),
or "-" when not recorded.
"""
import io
import os
import sys

import numpy as np
import PIL
import torchvision
from PIL import Image, ImageFile
from torchvision import transforms as T

IMAGES = sys.argv[1] if len(sys.argv) > 1 else "test/data/images"
OUT = sys.argv[2] if len(sys.argv) > 2 else "test/golden/images"
SIZE = 224
MAX_PPM_PIXELS = 40000          # larger decoded images: hash only
MAX_RESIZED_PIXELS = 4_000_000  # Pillow would need gigabytes for 10000x1

RESIZES = {
    "jpeg_420_640x480.jpg": [(97, 61), (640, 17), (13, 480), (1, 1), (333, 250)],
    "png_rgb8_300x200.png": [(301, 199), (300, 97), (150, 200), (900, 40)],
    "jpeg_small_50x37.jpg": [(171, 129), (50, 111), (7, 5)],
    "png_tiny_1x1.png": [(5, 3)],
    "png_line_10000x1.png": [(100, 3)],
}

CUTS = ["jpeg_420_640x480.jpg", "jpeg_progressive_800x533.jpg",
        "jpeg_cmyk_320x240.jpg", "jpeg_restart_rows_290x210.jpg",
        "png_rgb8_300x200.png", "png_interlaced_rgb_203x151.png",
        "png_pal4_175x99.png"]


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def fnv_ref(arr):
    return "fnv:%016x" % fnv1a64(arr.tobytes())


def ppm_ref(arr, name):
    h, w = arr.shape[:2]
    path = os.path.join(OUT, name)
    with open(path, "wb") as f:
        f.write(b"P6\n%d %d\n255\n" % (w, h) + arr.tobytes())
    return path


def ref(arr, name, max_pixels=MAX_PPM_PIXELS):
    if arr.shape[0] * arr.shape[1] <= max_pixels:
        return ppm_ref(arr, name)
    return fnv_ref(arr)


def rgb_array(im):
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        os.remove(os.path.join(OUT, f))
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    resize = T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC, antialias=True)
    crop = T.CenterCrop(SIZE)
    lines = ["# written by test/reference/image_golden.py with Pillow %s, torchvision %s"
             % (PIL.__version__, torchvision.__version__)]

    for name in sorted(os.listdir(IMAGES)):
        path = os.path.join(IMAGES, name)
        stem = os.path.splitext(name)[0]
        im = Image.open(path).convert("RGB")
        dec = rgb_array(im)
        lines.append("decode %s %d %d %s" % (path, im.width, im.height,
                                             ref(dec, stem + ".decoded.ppm")))

        # torchvision's own size rule, applied only when Pillow can afford it
        w, h = im.size
        short, long = min(w, h), max(w, h)
        new_long = int(SIZE * long / short)
        rw, rh = (SIZE, new_long) if w <= h else (new_long, SIZE)
        if rw * rh <= MAX_RESIZED_PIXELS:
            resized = resize(im)
            assert resized.size == (rw, rh), (name, resized.size, rw, rh)
            cropped = np.asarray(crop(resized))
            top = int(round((rh - SIZE) / 2.0))
            left = int(round((rw - SIZE) / 2.0))
            full = np.asarray(resized)
            assert np.array_equal(cropped, full[top:top + SIZE, left:left + SIZE])
            lines.append("preprocess %s %d %d %d %d %s %s" % (
                path, rw, rh, left, top, fnv_ref(full),
                ppm_ref(cropped, stem + ".crop.ppm")))
        else:
            top = int(round((rh - SIZE) / 2.0))
            left = int(round((rw - SIZE) / 2.0))
            lines.append("preprocess %s %d %d %d %d - -" % (path, rw, rh, left, top))

        for (tw, th) in RESIZES.get(name, []):
            out = np.asarray(im.resize((tw, th), Image.BICUBIC))
            lines.append("resize %s %d %d %s" % (
                path, tw, th, ref(out, "%s.%dx%d.ppm" % (stem, tw, th))))

        if name in CUTS:
            data = open(path, "rb").read()
            n = len(data)
            points = sorted({2, 20, 100, n // 10, n // 2, n * 9 // 10, n - 20,
                             n - 16, n - 13, n - 12, n - 2, n - 1})
            for cut in points:
                try:
                    got = Image.open(io.BytesIO(data[:cut]))
                    arr = rgb_array(got)
                    lines.append("cut %s %d ok %s" % (path, cut, fnv_ref(arr)))
                except Exception:
                    lines.append("cut %s %d fail" % (path, cut))

    with open(os.path.join(OUT, "MANIFEST"), "w") as f:
        f.write("\n".join(lines) + "\n")
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{len(lines) - 1} checks, {total} bytes in {OUT}")


if __name__ == "__main__":
    main()
