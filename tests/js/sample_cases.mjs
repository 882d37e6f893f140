// Reads {cases: [{logits, opts, history, u}, ...], sums: [[...], ...]} as JSON on stdin and
// prints {tokens, sums}: the JS sampler's token for each case and its numpy-style sum of each
// array, so that tests/test_web_sampler.py can compare them with Python.
import { readFileSync } from "node:fs";
import { pairwiseSum, sample } from "../../examples/browser/sampler.js";

const req = JSON.parse(readFileSync(0, "utf8"));
const fix = (v) => (v === "-inf" ? -Infinity : v === "inf" ? Infinity : v);
const tokens = (req.cases ?? []).map((c) => sample(c.logits.map(fix), c.opts, c.history, c.u));
const sums = (req.sums ?? []).map((a) => pairwiseSum(Float64Array.from(a)));
process.stdout.write(JSON.stringify({ tokens, sums }));
