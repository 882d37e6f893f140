package dev.gptsedge.sample

import java.io.ByteArrayOutputStream
import java.util.regex.Pattern

/**
 * The byte-level BPE of GPT-S's tokenizer.json (the GPT-2 scheme, as written by the Hugging Face
 * `tokenizers` library with a ByteLevel pre-tokenizer, add_prefix_space=false, no normalizer):
 *
 *  1. split out added tokens (`<|endoftext|>` = 0) verbatim;
 *  2. split the rest with the GPT-2 regex;
 *  3. map each piece's UTF-8 bytes to printable characters (the bytes_to_unicode table);
 *  4. apply merges, lowest rank first, and look the symbols up in the vocabulary.
 *
 * Pinned to the Python tokenizer by examples/android/jvmcheck (see the README).
 */
class BpeTokenizer(tokenizerJson: String) {
    private val vocab = HashMap<String, Int>()
    private val idToToken: Array<String?>
    private val ranks = HashMap<String, Int>()
    private val added = LinkedHashMap<String, Int>()
    private val byteToChar = CharArray(256)
    private val charToByte = HashMap<Char, Int>()
    private val cache = HashMap<String, IntArray>()

    init {
        @Suppress("UNCHECKED_CAST")
        val root = Json.parse(tokenizerJson) as Map<String, Any?>
        @Suppress("UNCHECKED_CAST")
        val model = root["model"] as? Map<String, Any?>
            ?: throw IllegalArgumentException("tokenizer.json: field model: expected an object")
        if (model["type"] != "BPE") {
            throw IllegalArgumentException("tokenizer.json: model.type: expected BPE, found ${model["type"]}")
        }
        @Suppress("UNCHECKED_CAST")
        for ((tok, id) in model["vocab"] as Map<String, Any?>) vocab[tok] = (id as Double).toInt()
        @Suppress("UNCHECKED_CAST")
        val merges = model["merges"] as List<Any?>
        for ((rank, m) in merges.withIndex()) {
            // Two spellings exist: "a b" (older files) and ["a", "b"] (tokenizers >= 0.20).
            val pair = if (m is String) m else (m as List<*>).joinToString(" ")
            ranks[pair] = rank
        }
        @Suppress("UNCHECKED_CAST")
        for (t in (root["added_tokens"] as? List<Any?>).orEmpty()) {
            val tok = t as Map<String, Any?>
            added[tok["content"] as String] = (tok["id"] as Double).toInt()
        }
        var size = 0
        for (id in vocab.values) if (id + 1 > size) size = id + 1
        for (id in added.values) if (id + 1 > size) size = id + 1
        idToToken = arrayOfNulls(size)
        for ((tok, id) in vocab) idToToken[id] = tok
        for ((tok, id) in added) idToToken[id] = tok
        // bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes are
        // shifted to U+0100.. so every byte is a visible, non-space character.
        var shifted = 0
        for (b in 0 until 256) {
            val printable = b in 33..126 || b in 161..172 || b in 174..255
            val c = if (printable) b.toChar() else (256 + shifted++).toChar()
            byteToChar[b] = c
            charToByte[c] = b
        }
    }

    val vocabSize: Int get() = idToToken.size

    fun encode(text: String): IntArray {
        val out = ArrayList<Int>()
        var rest = 0
        while (rest < text.length) {
            // The earliest added token (longest on a tie) splits the text.
            var at = -1
            var which: String? = null
            for (tok in added.keys) {
                val k = text.indexOf(tok, rest)
                if (k >= 0 && (at < 0 || k < at || (k == at && tok.length > which!!.length))) {
                    at = k
                    which = tok
                }
            }
            val end = if (at < 0) text.length else at
            encodeOrdinary(text.substring(rest, end), out)
            if (which == null) break
            out.add(added.getValue(which))
            rest = end + which.length
        }
        return out.toIntArray()
    }

    private fun encodeOrdinary(text: String, out: MutableList<Int>) {
        val m = PRETOKENIZE.matcher(text)
        while (m.find()) {
            val piece = m.group()
            val ids = cache.getOrPut(piece) { bpe(piece) }
            for (id in ids) out.add(id)
        }
    }

    private fun bpe(piece: String): IntArray {
        val bytes = piece.toByteArray(Charsets.UTF_8)
        val symbols = ArrayList<String>(bytes.size)
        for (b in bytes) symbols.add(byteToChar[b.toInt() and 0xff].toString())
        while (symbols.size > 1) {
            var best = -1
            var bestRank = Int.MAX_VALUE
            for (k in 0 until symbols.size - 1) {
                val r = ranks[symbols[k] + " " + symbols[k + 1]]
                if (r != null && r < bestRank) {
                    bestRank = r
                    best = k
                }
            }
            if (best < 0) break
            symbols[best] = symbols[best] + symbols[best + 1]
            symbols.removeAt(best + 1)
        }
        return IntArray(symbols.size) { k ->
            vocab[symbols[k]] ?: throw IllegalStateException("tokenizer.json: symbol ${symbols[k]} is not in the vocabulary")
        }
    }

    /** Text of [ids]; added tokens (like `<|endoftext|>`) are skipped, as Python's decode does. */
    fun decode(ids: IntArray): String = String(decodeBytes(ids), Charsets.UTF_8)

    /** Raw bytes of [ids]: callers streaming text hold back an incomplete UTF-8 tail. */
    fun decodeBytes(ids: IntArray): ByteArray {
        val buf = ByteArrayOutputStream()
        for (id in ids) {
            if (id < 0 || id >= idToToken.size) throw IllegalArgumentException("token id $id is outside the vocabulary")
            val tok = idToToken[id] ?: continue
            if (added.containsKey(tok)) continue
            for (c in tok) buf.write(charToByte[c] ?: continue)
        }
        return buf.toByteArray()
    }

    companion object {
        // GPT-2's split; UNICODE_CHARACTER_CLASS makes \s match Unicode spaces as the Rust regex does.
        private val PRETOKENIZE: Pattern = Pattern.compile(
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
            Pattern.UNICODE_CHARACTER_CLASS
        )
    }
}
