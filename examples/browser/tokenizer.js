// Byte-level BPE that reads a `tokenizers` tokenizer.json (ByteLevel pre-tokenizer with
// use_regex, BPE model, ByteLevel decoder) and gives the same ids and text as the Python
// library. Pinned by tests/test_web_tokenizer.py, which compares it with `tokenizers`.

// The GPT-2 byte <-> printable-character map: printable Latin-1 bytes stand for themselves,
// the rest are moved to U+0100 and up so every byte has a visible, non-space character.
function byteMaps() {
  const keep = [];
  for (let b = 33; b <= 126; b++) keep.push(b);
  for (let b = 161; b <= 172; b++) keep.push(b);
  for (let b = 174; b <= 255; b++) keep.push(b);
  const kept = new Set(keep);
  const toChar = new Array(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) {
    toChar[b] = String.fromCodePoint(kept.has(b) ? b : 256 + extra++);
  }
  const toByte = new Map(toChar.map((c, b) => [c, b]));
  return { toChar, toByte };
}

const { toChar: BYTE_TO_CHAR, toByte: CHAR_TO_BYTE } = byteMaps();

// The ByteLevel pre-tokenizer pattern of `tokenizers`. Its regex engine (Oniguruma) takes
// \s as Unicode White_Space, which JS spells \p{White_Space} (JS's own \s adds U+FEFF and
// lacks U+0085).
const S = "\\p{White_Space}";
const SPLIT = new RegExp(
  `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^${S}\\p{L}\\p{N}]+|[${S}]+(?![^${S}])|[${S}]+`,
  "gu",
);

const utf8 = new TextEncoder();

export class ByteLevelBPE {
  /** @param {object} json the parsed tokenizer.json */
  constructor(json) {
    const model = json.model ?? {};
    if (model.type !== "BPE") throw new Error(`tokenizer.json: model.type: expected "BPE", found ${JSON.stringify(model.type)}`);
    const pre = json.pre_tokenizer ?? {};
    if (pre.type !== "ByteLevel" || pre.use_regex === false) {
      throw new Error(`tokenizer.json: pre_tokenizer: expected ByteLevel with use_regex, found ${JSON.stringify(pre)}`);
    }
    if (json.normalizer) throw new Error("tokenizer.json: normalizer: this tokenizer supports none");
    this.addPrefixSpace = Boolean(pre.add_prefix_space);
    this.vocab = new Map(Object.entries(model.vocab));
    this.idToToken = [];
    for (const [tok, id] of this.vocab) this.idToToken[id] = tok;
    this.ranks = new Map();
    model.merges.forEach((m, rank) => {
      const [a, b] = Array.isArray(m) ? m : m.split(" ");
      this.ranks.set(`${a} ${b}`, rank);
    });
    this.special = new Map();
    for (const t of json.added_tokens ?? []) {
      this.special.set(t.content, t.id);
      this.idToToken[t.id] = t.content;
    }
    // Longest first so that one special token that prefixes another cannot steal its match.
    const alts = [...this.special.keys()].sort((a, b) => b.length - a.length).map(escapeRegExp);
    this.specialRe = alts.length ? new RegExp(`(${alts.join("|")})`, "u") : null;
    this.cache = new Map();
  }

  get vocabSize() {
    return this.idToToken.length;
  }

  tokenToId(token) {
    return this.special.get(token) ?? this.vocab.get(token);
  }

  /** @returns {number[]} */
  encode(text) {
    const ids = [];
    const parts = this.specialRe ? text.split(this.specialRe) : [text];
    parts.forEach((part, i) => {
      if (i % 2 === 1) ids.push(this.special.get(part));
      else if (part) this.encodeOrdinary(part, ids);
    });
    return ids;
  }

  encodeOrdinary(text, ids) {
    if (this.addPrefixSpace && !text.startsWith(" ")) text = " " + text;
    for (const m of text.matchAll(SPLIT)) {
      let word = "";
      for (const b of utf8.encode(m[0])) word += BYTE_TO_CHAR[b];
      for (const id of this.bpe(word)) ids.push(id);
    }
  }

  // Repeatedly merge the adjacent pair with the lowest merge rank (leftmost on ties), the
  // order `tokenizers` applies merges in when dropout is off.
  bpe(word) {
    const hit = this.cache.get(word);
    if (hit) return hit;
    let syms = Array.from(word);
    while (syms.length > 1) {
      let best = -1;
      let bestRank = Infinity;
      for (let i = 0; i + 1 < syms.length; i++) {
        const r = this.ranks.get(`${syms[i]} ${syms[i + 1]}`);
        if (r !== undefined && r < bestRank) {
          bestRank = r;
          best = i;
        }
      }
      if (best < 0) break;
      const merged = syms[best] + syms[best + 1];
      const next = [];
      for (let i = 0; i < syms.length; i++) {
        if (i === best) {
          next.push(merged);
          i++;
        } else {
          next.push(syms[i]);
        }
      }
      syms = next;
    }
    const out = syms.map((s) => {
      const id = this.vocab.get(s);
      if (id === undefined) throw new Error(`tokenizer.json: no vocabulary entry for ${JSON.stringify(s)}`);
      return id;
    });
    if (this.cache.size < 50000) this.cache.set(word, out);
    return out;
  }

  /** Bytes of the given ids (special tokens as their UTF-8 text). */
  bytes(ids) {
    const out = [];
    for (const id of ids) {
      const tok = this.idToToken[id];
      if (tok === undefined) throw new Error(`token id ${id} is outside the vocabulary (0..${this.vocabSize - 1})`);
      if (this.special.has(tok)) {
        for (const b of utf8.encode(tok)) out.push(b);
        continue;
      }
      for (const ch of tok) {
        const b = CHAR_TO_BYTE.get(ch);
        if (b === undefined) throw new Error(`token ${id} has a character outside the byte map`);
        out.push(b);
      }
    }
    return Uint8Array.from(out);
  }

  /** Text of the ids; invalid UTF-8 becomes U+FFFD, as in `tokenizers`. */
  decode(ids) {
    return new TextDecoder("utf-8", { fatal: false, ignoreBOM: true }).decode(this.bytes(ids));
  }
}

/** Text pieces from a growing id list, never splitting a UTF-8 character (as StreamDecoder). */
export class StreamDecoder {
  constructor(tokenizer) {
    this.tok = tokenizer;
    this.ids = [];
    this.emitted = "";
  }

  push(id) {
    this.ids.push(id);
    const text = this.tok.decode(this.ids);
    if (text.endsWith("\ufffd")) return "";
    const piece = text.slice(this.emitted.length);
    this.emitted = text;
    return piece;
  }

  /** What is still held back at the end (a real trailing U+FFFD, or an unfinished character). */
  flush() {
    const text = this.tok.decode(this.ids);
    const piece = text.slice(this.emitted.length);
    this.emitted = text;
    return piece;
  }
}

function escapeRegExp(s) {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}
