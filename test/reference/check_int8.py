#!/usr/bin/python3
"""
check_int8.py: the int8 arithmetic of the PyTorch reference (reference.py:
quantize_int8, int8_product, Int8Linear) against the same rules written out
directly in numpy, on random rows and on the rows where an implementation
could go wrong:

  - ties: rows whose x * factor is exactly k + 0.5, which must go to the
    even neighbour (127 / 127 = 1 and 127 / 254 = 0.5 are exact factors);
  - all-zero rows: factor 0, every value 0, scale 0;
  - rows whose largest magnitude is negative, or repeated;
  - random rows of magnitudes from 1e-30 to 1e30, where computing 127 /
    largest as 127 times a reciprocal (torch's scalar / tensor) rounds
    differently from one division;
  - sums past 2^24 (k = 4096 of products up to 127 * 127): exact, then
    rounded once to float32, to nearest even, ties included (a float32
    matrix product rounds about half of such sums apart).

The quantized values and scales must be equal, and the products, with
their bias, equal bit for bit.

Usage: test/reference/check_int8.py
Prints "ok - NAME" or "FAIL - NAME: why"; the last line is
"reference int8: N passed, N failed".
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference  # noqa: E402

torch = reference.torch
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


def numpy_quantize(x):
    """The rules, one float32 operation at a time: (q int8, scale float32) per row."""
    x = np.asarray(x, dtype=np.float32)
    largest = np.abs(x).max(axis=1)
    with np.errstate(divide="ignore"):
        factor = np.where(largest > 0, np.float32(127.0) / largest, np.float32(0.0))
    v = x * factor[:, None]
    v = np.minimum(np.maximum(v, np.float32(-127.0)), np.float32(127.0))
    q = np.rint(v)  # to nearest, ties to even
    assert v.dtype == np.float32 and factor.dtype == np.float32
    return q.astype(np.int8), (largest / np.float32(127.0)).astype(np.float32)


def numpy_product(qa, sa, qw, sw, bias):
    """Exact integer sums (int64), to float32, times sa, times sw, plus bias."""
    acc = qa.astype(np.int64) @ qw.astype(np.int64).T
    v = acc.astype(np.float32)
    v = v * sa[:, None]
    v = v * sw[None, :]
    return v + bias[None, :]


def same_bits(a, b):
    """Equal bit for bit (so -0.0 differs from 0.0)."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def compare_quantize(name, x):
    """reference.quantize_int8 against numpy_quantize on the rows of x."""
    q, scale = reference.quantize_int8(torch.from_numpy(np.array(x, dtype=np.float32)))
    nq, nscale = numpy_quantize(x)
    bad = np.argwhere(q.numpy() != nq)
    check(same_bits(q.numpy(), nq) and same_bits(scale.numpy(), nscale),
          "%s: quantized values and scales" % name,
          "%d values differ, first at %s: %s" % (len(bad), bad[:1].tolist(),
                                                 [float(np.asarray(x)[tuple(i)]) for i in bad[:1]]))
    return nq, nscale


def main():
    rng = np.random.Generator(np.random.PCG64(8))

    # ties: factor exactly 1 (largest 127) and exactly 0.5 (largest 254)
    ties = np.array([
        [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, -126.5, 3.0, 0.0, 64.5],
        [254.0, 1.0, 3.0, 5.0, -1.0, -3.0, -5.0, 251.0, -253.0, 6.0, 0.0, 129.0],
        [-127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 125.5, -126.5, 127.0, 0.0, 64.5],
    ], dtype=np.float32)
    q, _ = compare_quantize("ties", ties)
    check(q[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -126, 3, 0, 64] and
          np.array_equal(q[0], q[1]) and q[2][:9].tolist() == [-127] + q[0][1:9].tolist(),
          "ties go to the even neighbour", repr(q.tolist()))

    # all-zero rows, between others
    zeros = np.zeros((4, 16), dtype=np.float32)
    zeros[1] = rng.normal(0, 1, 16)
    zeros[3, 5] = -1e-3
    q, scale = compare_quantize("all-zero rows", zeros)
    check(not q[0].any() and not q[2].any() and scale[0] == 0 and scale[2] == 0 and
          q[3, 5] == -127, "all-zero rows give zeros and scale 0", repr(scale.tolist()))

    # random rows over many magnitudes, with some repeated maxima
    x = rng.normal(0, 1, (512, 300)).astype(np.float32)
    x *= (10.0 ** rng.uniform(-30, 30, (512, 1))).astype(np.float32)
    x[::7, 11] = -np.abs(x[::7]).max(axis=1)
    x[::5, 12] = x[::5, 13] = np.abs(x[::5]).max(axis=1)
    compare_quantize("random rows, magnitudes 1e-30 to 1e30", x)

    # rows [largest, x] where the factor taken as 127 * (1 / largest) sends x
    # to the other side of a rounding boundary than 127 / largest does
    rows = []
    for largest in np.abs(rng.normal(0, 1, 4000)).astype(np.float32):
        factor = np.float32(127.0) / largest
        other = (np.float32(1.0) / largest) * np.float32(127.0)
        if factor == other:
            continue
        k = np.float32(rng.integers(0, 126)) + np.float32(0.5)
        x = np.float32(k / factor)
        for _ in range(8):
            if np.rint(x * factor) != np.rint(x * other):
                rows.append([largest, x])
                break
            x = np.nextafter(x, np.float32(np.inf), dtype=np.float32)
    compare_quantize("%d rows where 127 * (1 / largest) rounds apart from 127 / largest" % len(rows),
                     np.array(rows, dtype=np.float32).reshape(-1, 2))
    check(len(rows) >= 10, "such rows exist", "%d found" % len(rows))

    # products, small and past 2^24
    for (m, n, k, extreme) in ((37, 19, 300, False), (9, 5, 4096, True), (64, 48, 1024, False)):
        a = rng.normal(0, 1, (m, k)).astype(np.float32)
        w = rng.normal(0, 0.05, (n, k)).astype(np.float32)
        if extreme:
            # every term +-127 * 127: sums up to 4096 * 16129, past float32's 2^24
            a = np.sign(rng.normal(0, 1, (m, k))).astype(np.float32) * 3.0
            w = np.sign(rng.normal(0, 1, (n, k))).astype(np.float32) * 0.25
            a[0] = 3.0
            w[0] = 0.25
        a[m // 2] = 0.0
        bias = rng.normal(0, 1, n).astype(np.float32)
        linear = torch.nn.Linear(k, n)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w))
            linear.bias.copy_(torch.from_numpy(bias))
        with torch.no_grad():
            got = reference.Int8Linear(linear)(torch.from_numpy(a)).numpy()
        qa, sa = numpy_quantize(a)
        qw, sw = numpy_quantize(w)
        want = numpy_product(qa, sa, qw, sw, bias)
        check(same_bits(got, want), "Int8Linear [%d, %d] x [%d, %d]^T + bias, bit for bit" % (
            m, k, n, k), "max difference %.3g" % float(np.abs(got - want).max()))

    # many sums past 2^24 (a float32 matrix product of these rounds about
    # half of them differently)
    qa = rng.integers(100, 128, (64, 4096)).astype(np.int8)
    qw = rng.integers(100, 128, (64, 4096)).astype(np.int8)
    ones = np.ones(64, dtype=np.float32)
    got = reference.int8_product(torch.from_numpy(qa), torch.from_numpy(ones),
                                 torch.from_numpy(qw), torch.from_numpy(ones)).numpy()
    want = numpy_product(qa, ones, qw, ones, np.zeros(64, dtype=np.float32))
    check(same_bits(got, want), "[64, 4096] x [64, 4096]^T of values 100 to 127: exact sums",
          "%d of 4096 differ" % int((got != want).sum()))

    # sums past 2^24, where float32 steps by 4: rounded once, to nearest even
    qa = np.full((1, 4096), 127, dtype=np.int8)
    for last, name in ((126, "rounds down"), (125, "a tie"), (124, "rounds up"), (127, "exact")):
        qw = np.full((1, 4096), 127, dtype=np.int8)
        qw[0, -1] = last
        exact = 4095 * 127 * 127 + 127 * last
        v = reference.int8_product(torch.from_numpy(qa), torch.ones(1),
                                   torch.from_numpy(qw), torch.ones(1)).numpy()[0, 0]
        check(exact > 2 ** 25 and v == np.float32(exact) and v == float(np.float32(float(exact))),
              "a sum of %d (%s) is exact, then rounded once to float32" % (exact, name),
              "got %r" % float(v))

    print("reference int8: %d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
