// Reads {tokenizer: PATH, texts: [...], ids: [[...], ...]} as JSON on stdin and prints what the
// JS tokenizer makes of them: the ids of each text, the decoded text of each id list, and the
// streamed pieces of each id list joined, so tests/test_web_tokenizer.py can compare with Python.
import { readFileSync } from "node:fs";
import { ByteLevelBPE, StreamDecoder } from "../../examples/browser/tokenizer.js";

const req = JSON.parse(readFileSync(0, "utf8"));
const tok = new ByteLevelBPE(JSON.parse(readFileSync(req.tokenizer, "utf8")));
const streamed = (ids) => {
  const dec = new StreamDecoder(tok);
  return [...ids.map((id) => dec.push(id)), dec.flush()];
};
process.stdout.write(
  JSON.stringify({
    encoded: req.texts.map((t) => tok.encode(t)),
    decoded: req.ids.map((ids) => tok.decode(ids)),
    streamed: req.ids.map(streamed),
  }),
);
