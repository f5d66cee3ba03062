#!/usr/bin/python3
"""Write the synthetic test images of the decoder and resizer tests.

Usage (from the repository root):
    /usr/bin/python3 test/reference/make_images.py [outdir]

Writes test/data/images/*.jpg and *.png: text-free scenes (gradients,
shapes, noise, hard edges that make the bicubic kernel overshoot) with fixed
seeds, in every JPEG and PNG variant the decoder must read like Pillow:
JPEG baseline 4:2:0 / 4:2:2 / 4:4:4 / 4:1:1 / 4:4:0, progressive, grayscale,
CMYK, RGB (no YCbCr transform), restart markers, optimized Huffman tables,
arithmetic coding, EXIF orientation; PNG gray 1/2/4/8/16-bit, gray+alpha
8/16, RGB 8/16, RGBA 8/16, palette 1/2/4/8-bit (with tRNS, with a short
PLTE), Adam7 interlaced, all five row filters.  Sizes cover upscaling
(1x1, 50x37), downscaling (up to 800 px), odd sizes, sides equal to 224,
both orientations and extreme aspect ratios (10000x1).

Needs Pillow and numpy; the JPEG variants Pillow cannot write come from
cjpeg and jpegtran (Debian package libjpeg-turbo-progs).  The PNG files are
written by the small encoder below, because Pillow cannot write 2-bit or
4-bit gray, 16-bit gray+alpha, interlaced PNGs or arbitrary row filters.
"""
import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image, ImageDraw

OUT = sys.argv[1] if len(sys.argv) > 1 else "test/data/images"


def scene(w, h, seed):
    """An RGB uint8 scene: gradient, shapes, a checkerboard and some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    fx = x / max(w - 1, 1)
    fy = y / max(h - 1, 1)
    base = np.stack([255 * fx, 255 * fy, 255 * (1 - fx) * (0.5 + 0.5 * fy)], axis=-1)
    img = Image.fromarray(base.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, w, 2).tolist())
        y0, y1 = sorted(rng.integers(0, h, 2).tolist())
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=color)
        else:
            draw.ellipse([x0, y0, x1, y1], fill=color)
    a = np.array(img).astype(np.int16)
    # black and white squares: the kernel's negative lobes overshoot here
    cw, ch = max(w // 4, 1), max(h // 4, 1)
    cy, cx = np.mgrid[0:ch, 0:cw]
    checker = ((cx // 3 + cy // 3) % 2 * 255)[..., None]
    a[h - ch:, w - cw:] = checker
    a += rng.integers(-12, 13, a.shape, dtype=np.int16)
    return np.clip(a, 0, 255).astype(np.uint8)


def save_pil(name, arr, mode="RGB", **params):
    im = Image.fromarray(arr, "RGB") if mode == "RGB" else Image.fromarray(arr, "RGB").convert(mode)
    im.save(os.path.join(OUT, name), **params)


def ppm_bytes(arr):
    h, w = arr.shape[:2]
    return b"P6\n%d %d\n255\n" % (w, h) + arr.tobytes()


def cjpeg(name, arr, *args):
    data = subprocess.run(["cjpeg", *args], input=ppm_bytes(arr), check=True,
                          stdout=subprocess.PIPE).stdout
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def jpegtran(name, src, *args):
    data = subprocess.run(["jpegtran", *args, os.path.join(OUT, src)], check=True,
                          stdout=subprocess.PIPE).stdout
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


# ---- a minimal PNG encoder --------------------------------------------------

ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
         (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def pack_row(samples, depth):
    """samples: 1-D int array of one row's samples."""
    if depth == 16:
        return samples.astype(">u2").tobytes()
    if depth == 8:
        return samples.astype(np.uint8).tobytes()
    per = 8 // depth
    pad = (-len(samples)) % per
    s = np.concatenate([samples, np.zeros(pad, dtype=samples.dtype)]).reshape(-1, per)
    shifts = np.arange(per - 1, -1, -1) * depth
    return (s.astype(np.uint16) << shifts).sum(axis=1).astype(np.uint8).tobytes()


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filter_rows(rows, bpp, first_filter):
    """Filter each packed row, cycling through the five PNG filters."""
    out = bytearray()
    prev = np.zeros(len(rows[0]) if rows else 0, dtype=np.int32)
    for i, raw in enumerate(rows):
        cur = np.frombuffer(raw, dtype=np.uint8).astype(np.int32)
        left = np.concatenate([np.zeros(bpp, dtype=np.int32), cur[:-bpp]]) if len(cur) > bpp else np.zeros_like(cur)
        upleft = np.concatenate([np.zeros(bpp, dtype=np.int32), prev[:-bpp]]) if len(cur) > bpp else np.zeros_like(cur)
        ft = (first_filter + i) % 5
        if ft == 0:
            f = cur
        elif ft == 1:
            f = cur - left
        elif ft == 2:
            f = cur - prev
        elif ft == 3:
            f = cur - (left + prev) // 2
        else:
            f = cur - paeth(left, prev, upleft)
        out.append(ft)
        out += (f & 0xFF).astype(np.uint8).tobytes()
        prev = cur
    return bytes(out)


def write_png(name, samples, depth, color_type, palette=None, trns=None,
              interlace=False, first_filter=0):
    """samples: (h, w, channels) array of sample values."""
    h, w = samples.shape[:2]
    ch = CHANNELS[color_type]
    samples = samples.reshape(h, w, ch)
    bpp = max(1, ch * depth // 8)
    if interlace:
        data = b""
        for x0, y0, dx, dy in ADAM7:
            sub = samples[y0::dy, x0::dx]
            if sub.shape[0] == 0 or sub.shape[1] == 0:
                continue
            rows = [pack_row(r.reshape(-1), depth) for r in sub]
            data += filter_rows(rows, bpp, first_filter)
    else:
        rows = [pack_row(r.reshape(-1), depth) for r in samples]
        data = filter_rows(rows, bpp, first_filter)
    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0,
                                      1 if interlace else 0))
    if palette is not None:
        png += chunk(b"PLTE", bytes(np.asarray(palette, dtype=np.uint8).reshape(-1)))
    if trns is not None:
        png += chunk(b"tRNS", trns)
    png += chunk(b"IDAT", zlib.compress(data, 9))
    png += chunk(b"IEND", b"")
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(png)


def gray(arr):
    return (arr.astype(np.int32) @ np.array([299, 587, 114]) // 1000).astype(np.int32)


def main():
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if f.endswith((".jpg", ".png")):
            os.remove(os.path.join(OUT, f))

    # ---- JPEG through Pillow (libjpeg-turbo underneath) ----
    save_pil("jpeg_420_640x480.jpg", scene(640, 480, 1), quality=90, subsampling=2)
    save_pil("jpeg_422_500x375.jpg", scene(500, 375, 2), quality=85, subsampling=1)
    save_pil("jpeg_444_333x500.jpg", scene(333, 500, 3), quality=92, subsampling=0)
    save_pil("jpeg_progressive_800x533.jpg", scene(800, 533, 4), quality=80,
             progressive=True)
    save_pil("jpeg_gray_401x299.jpg", scene(401, 299, 5), mode="L", quality=88)
    save_pil("jpeg_gray_progressive_250x410.jpg", scene(250, 410, 6), mode="L",
             quality=75, progressive=True)
    save_pil("jpeg_cmyk_320x240.jpg", scene(320, 240, 7), mode="CMYK", quality=90)
    save_pil("jpeg_cmyk_progressive_199x263.jpg", scene(199, 263, 8), mode="CMYK",
             quality=70, progressive=True)
    save_pil("jpeg_optimized_450x300.jpg", scene(450, 300, 9), quality=90,
             optimize=True)
    save_pil("jpeg_q30_700x466.jpg", scene(700, 466, 10), quality=30)
    save_pil("jpeg_small_50x37.jpg", scene(50, 37, 11), quality=95)
    save_pil("jpeg_tiny_1x1.jpg", scene(1, 1, 12), quality=95)
    save_pil("jpeg_3x2.jpg", scene(3, 2, 13), quality=95)
    save_pil("jpeg_223x225.jpg", scene(223, 225, 14), quality=90)
    save_pil("jpeg_225x223.jpg", scene(225, 223, 15), quality=90)
    save_pil("jpeg_224x224.jpg", scene(224, 224, 16), quality=90)
    save_pil("jpeg_224x301.jpg", scene(224, 301, 17), quality=90)
    save_pil("jpeg_wide_800x150.jpg", scene(800, 150, 18), quality=85)
    save_pil("jpeg_tall_120x700.jpg", scene(120, 700, 19), quality=85)
    save_pil("jpeg_227x300.jpg", scene(227, 300, 20), quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90; Pillow's open ignores it
    save_pil("jpeg_exif_rotated_300x200.jpg", scene(300, 200, 21), quality=90,
             exif=exif.tobytes())

    # ---- JPEG variants Pillow cannot write ----
    cjpeg("jpeg_411_360x270.jpg", scene(360, 270, 22), "-quality", "90",
          "-sample", "4x1,1x1,1x1")
    cjpeg("jpeg_440_270x360.jpg", scene(270, 360, 23), "-quality", "90",
          "-sample", "1x2,1x1,1x1")
    cjpeg("jpeg_rgb_300x240.jpg", scene(300, 240, 24), "-quality", "90", "-rgb")
    cjpeg("jpeg_arithmetic_310x230.jpg", scene(310, 230, 25), "-quality", "85",
          "-arithmetic")
    cjpeg("jpeg_restart_rows_290x210.jpg", scene(290, 210, 26), "-quality", "90",
          "-restart", "1")
    jpegtran("jpeg_restart_blocks_640x480.jpg", "jpeg_420_640x480.jpg",
             "-restart", "3B")
    jpegtran("jpeg_progressive_restart_333x500.jpg", "jpeg_444_333x500.jpg",
             "-progressive", "-restart", "2")

    # ---- PNG ----
    rgb = scene(300, 200, 30)
    write_png("png_rgb8_300x200.png", rgb, 8, 2)
    write_png("png_rgb16_257x190.png",
              scene(257, 190, 31).astype(np.int32) * 257 +
              np.random.default_rng(31).integers(0, 256, (190, 257, 3)), 16, 2,
              first_filter=1)
    a = scene(211, 317, 32)
    alpha = np.random.default_rng(32).integers(0, 256, (317, 211, 1))
    write_png("png_rgba8_211x317.png", np.concatenate([a, alpha], axis=-1), 8, 6,
              first_filter=2)
    write_png("png_rgba16_150x120.png",
              np.concatenate([scene(150, 120, 33), alpha[:120, :150]], axis=-1).astype(np.int32) * 257 + 3,
              16, 6, first_filter=3)
    g = gray(scene(320, 213, 34))
    write_png("png_gray8_320x213.png", g, 8, 0, first_filter=4)
    write_png("png_gray1_101x77.png", (gray(scene(101, 77, 35)) > 127).astype(np.int32), 1, 0)
    write_png("png_gray2_64x48.png", gray(scene(64, 48, 36)) >> 6, 2, 0, first_filter=1)
    write_png("png_gray4_233x97.png", gray(scene(233, 97, 37)) >> 4, 4, 0, first_filter=2)
    # 16-bit gray: Pillow reads mode "I" and clips to 0..255, so use a ramp
    # that crosses 255 as well as large values
    g16 = gray(scene(180, 240, 38)) * 3 + np.arange(180)[None, :] * 2
    g16[:40] *= 257
    write_png("png_gray16_180x240.png", g16, 16, 0, first_filter=3)
    write_png("png_gray_trns_120x90.png", gray(scene(120, 90, 39)), 8, 0,
              trns=struct.pack(">H", 128))
    ga = np.stack([gray(scene(140, 100, 40)),
                   np.random.default_rng(40).integers(0, 256, (100, 140))], axis=-1)
    write_png("png_ga8_140x100.png", ga, 8, 4, first_filter=4)
    ga16 = np.stack([gray(scene(97, 131, 41)) * 256 + 200,
                     np.full((131, 97), 40000)], axis=-1)
    write_png("png_ga16_97x131.png", ga16, 16, 4)
    rng = np.random.default_rng(42)
    pal = rng.integers(0, 256, (256, 3))
    idx = (gray(scene(260, 180, 42)) + rng.integers(0, 3, (180, 260))) % 256
    write_png("png_pal8_260x180.png", idx, 8, 3, palette=pal)
    write_png("png_pal8_trns_200x150.png", idx[:150, :200], 8, 3, palette=pal,
              trns=bytes(range(0, 256, 2)), first_filter=1)
    write_png("png_pal4_175x99.png", idx[:99, :175] % 16, 4, 3, palette=pal[:16])
    write_png("png_pal2_66x45.png", idx[:45, :66] % 4, 2, 3, palette=pal[:4])
    write_png("png_pal1_129x33.png", idx[:33, :129] % 2, 1, 3, palette=pal[:2])
    # indices beyond a 5-entry PLTE: Pillow maps them through its grey ramp
    write_png("png_pal_short_80x60.png", idx[:60, :80] % 12, 4, 3, palette=pal[:5])
    write_png("png_interlaced_rgb_203x151.png", scene(203, 151, 43), 8, 2,
              interlace=True, first_filter=2)
    write_png("png_interlaced_pal4_77x55.png", idx[:55, :77] % 16, 4, 3,
              palette=pal[:16], interlace=True)
    write_png("png_interlaced_gray16_45x61.png", g16[:61, :45] // 3, 16, 0,
              interlace=True, first_filter=4)
    write_png("png_interlaced_3x5.png", scene(3, 5, 44), 8, 2, interlace=True)
    write_png("png_tiny_1x1.png", scene(1, 1, 45), 8, 2)
    write_png("png_line_10000x1.png", scene(10000, 1, 46), 8, 2)
    write_png("png_column_1x300.png", scene(1, 300, 47), 8, 2)
    write_png("png_small_37x50.png", scene(37, 50, 48), 8, 2, first_filter=3)

    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{len(os.listdir(OUT))} images, {total} bytes in {OUT}")


if __name__ == "__main__":
    main()
