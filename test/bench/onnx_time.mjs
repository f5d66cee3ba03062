// onnx_time.mjs: times ONNX Runtime (CPU execution provider) running the
// network exported by test/bench/onnx_export.py, the peer the C core is
// compared with.
//
// One InferenceSession: intraOpNumThreads N, interOpNumThreads 1, sequential
// execution, graph optimisation level "all".  It first runs the two check
// images of MODEL.ref.json / MODEL.ref.bin (one batch of 2) and compares
// every output with reference.py's; then one warm-up run, then R runs of
// I single-image forward passes (batch 1, as one geolocate() call).  Prints
// the details on stderr and one JSON line on stdout:
//   {"threads":N,"runs":[s/image...],"median_s_per_image":x,
//    "gflops":162.1/x,"max_abs_diff":a,"max_rel_diff":r,...}
// max_rel_diff is, per output, max |ort - torch| / max |torch|; the largest
// of the three.  162.1 GFLOP is the full model's nominal work per image.
//
// Usage: node test/bench/onnx_time.mjs MODEL.onnx [--threads N] [--runs R] [--images I]
// (defaults 1, 3, 3; run test/bench/onnx_setup.sh first).  Thread counts
// are best compared alternately, one process each, e.g.:
//   for r in 1 2 3; do for t in 1 2; do
//     node test/bench/onnx_time.mjs build/onnx/full-random.onnx --threads $t --runs 1 --images 3
//   done; done

import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const ort = createRequire(import.meta.url)(join(ROOT, "build/onnx/node_modules/onnxruntime-node"));
const GFLOP_PER_IMAGE = 162.1;

function parseArgs(argv) {
  const opts = { model: null, threads: 1, runs: 3, images: 3 };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i].replace(/^--/, "");
    if (argv[i].startsWith("--") && key in opts) opts[key] = Number(argv[++i]);
    else if (!opts.model) opts.model = argv[i];
    else throw new Error(`unexpected argument ${argv[i]}`);
  }
  if (!opts.model) throw new Error("usage: onnx_time.mjs MODEL.onnx [--threads N] [--runs R] [--images I]");
  return opts;
}

// The arrays of MODEL.ref.bin, by name: {shape, data (Float32Array)}.
function readCheckData(model) {
  const base = model.replace(/\.onnx$/, "");
  const info = JSON.parse(readFileSync(base + ".ref.json", "utf8"));
  const bin = readFileSync(base + ".ref.bin");
  const arrays = {};
  for (const { name, shape, offset } of info.arrays) {
    const count = shape.reduce((a, b) => a * b, 1);
    // Copy: the Buffer's offset need not be 4-byte aligned.
    const data = new Float32Array(bin.buffer.slice(bin.byteOffset + offset, bin.byteOffset + offset + 4 * count));
    arrays[name] = { shape, data };
  }
  return arrays;
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const sig = (x) => +x.toPrecision(4);
const seconds = (t0) => Number(process.hrtime.bigint() - t0) / 1e9;

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const ref = readCheckData(opts.model);

  let t0 = process.hrtime.bigint();
  const session = await ort.InferenceSession.create(opts.model, {
    executionProviders: ["cpu"],
    intraOpNumThreads: opts.threads,
    interOpNumThreads: 1,
    executionMode: "sequential",
    graphOptimizationLevel: "all",
  });
  const sessionSeconds = seconds(t0);
  console.error(`session created in ${sessionSeconds.toFixed(2)} s`);

  // Agreement with reference.py on the two check images, as one batch.
  const pixels = ref.pixels;
  t0 = process.hrtime.bigint();
  const out = await session.run({ pixels: new ort.Tensor("float32", pixels.data, pixels.shape) });
  const checkSeconds = seconds(t0);
  let maxAbs = 0, maxRel = 0;
  const agreement = {};
  for (const name of ["feature", "logits", "regression"]) {
    const want = ref[name].data, got = out[name].data;
    if (got.length !== want.length) throw new Error(`${name}: ${got.length} values, expected ${want.length}`);
    let abs = 0, scale = 0;
    for (let i = 0; i < want.length; i++) {
      abs = Math.max(abs, Math.abs(got[i] - want[i]));
      scale = Math.max(scale, Math.abs(want[i]));
    }
    const rel = abs / (scale || 1);
    agreement[name] = { max_abs: sig(abs), max_rel: sig(rel) };
    console.error(`${name}: max abs diff ${abs.toExponential(3)}, relative to max |torch| ${rel.toExponential(3)}`);
    maxAbs = Math.max(maxAbs, abs);
    maxRel = Math.max(maxRel, rel);
  }

  // Single images, batch 1: the check images in turn.
  const [, c, h, w] = pixels.shape, size = c * h * w;
  const singles = [0, 1].map((i) => ({
    pixels: new ort.Tensor("float32", pixels.data.slice(i * size, (i + 1) * size), [1, c, h, w]),
  }));
  t0 = process.hrtime.bigint();
  await session.run(singles[0]);
  const warmupSeconds = seconds(t0);
  const runs = [];
  for (let r = 0; r < opts.runs; r++) {
    t0 = process.hrtime.bigint();
    for (let i = 0; i < opts.images; i++) await session.run(singles[i % singles.length]);
    runs.push(seconds(t0) / opts.images);
    console.error(`run ${r + 1}: ${runs[r].toFixed(3)} s/image`);
  }
  const med = median(runs);
  console.log(JSON.stringify({
    threads: opts.threads,
    runs: runs.map(sig),
    median_s_per_image: sig(med),
    gflops: sig(GFLOP_PER_IMAGE / med),
    max_abs_diff: sig(maxAbs),
    max_rel_diff: sig(maxRel),
    agreement,
    session_s: sig(sessionSeconds),
    check_batch2_s: sig(checkSeconds),
    warmup_s: sig(warmupSeconds),
    ort: ort.env.versions.common,
  }));
}

main().catch((e) => {
  console.error(e.message || e);
  process.exit(1);
});
