// Reads {cases: [{logits, opts, history, u}, ...], sums: [[...], ...], rngs: [{seed, n}, ...]}
// as JSON on stdin and prints {tokens, sums, draws}: the JS sampler's token for each case, its
// numpy-style sum of each array and the first n draws of each seed, so that
// tests/test_web_sampler.py can compare them with Python.
import { readFileSync } from "node:fs";
import { makeRng, pairwiseSum, sample } from "../../examples/browser/sampler.js";

const req = JSON.parse(readFileSync(0, "utf8"));
const fix = (v) => (v === "-inf" ? -Infinity : v === "inf" ? Infinity : v);
const tokens = (req.cases ?? []).map((c) => sample(c.logits.map(fix), c.opts, c.history, c.u));
const sums = (req.sums ?? []).map((a) => pairwiseSum(Float64Array.from(a)));
const draws = (req.rngs ?? []).map(({ seed, n }) => {
  const rng = makeRng(seed);
  return Array.from({ length: n }, rng);
});
process.stdout.write(JSON.stringify({ tokens, sums, draws }));
