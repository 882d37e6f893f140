// node --test: the JS sampler picks the expected token for every case of
// tests/golden/sampling.json (written by tests/make_golden.py from gpts_edge.sampling.sample).
// GPTS_GOLDEN=PATH points it at another copy of the file.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { sample } from "../../examples/browser/sampler.js";

const path = process.env.GPTS_GOLDEN ?? new URL("../golden/sampling.json", import.meta.url);
const golden = JSON.parse(readFileSync(path, "utf8"));
const num = (v) => (v === "-inf" ? -Infinity : v === "inf" ? Infinity : v);

test("golden file has cases", () => {
  assert.equal(golden.format, "gpts-edge sampling golden vectors");
  assert.ok(golden.cases.length > 50);
});

for (const c of golden.cases) {
  test(c.name, () => {
    assert.equal(sample(c.logits.map(num), c.opts, c.history, c.u), c.expected);
  });
}
