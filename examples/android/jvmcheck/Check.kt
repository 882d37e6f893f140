// Desktop-JVM check of the app's pure-Kotlin parts (Json, BpeTokenizer, Sampler, SplitMix64):
// reads a JSON request file, prints a JSON answer that tests/test_ort_mobile_kotlin.py compares
// with the Python tokenizer and sampler. onnxruntime is not involved (see the README).
//
//   kotlinc ../app/src/main/java/dev/gptsedge/sample/{Json,BpeTokenizer,Sampler,Generator}.kt \
//       Check.kt -include-runtime -d check.jar && java -jar check.jar request.json
package dev.gptsedge.sample

import java.io.File

private fun jsonString(s: String): String {
    val sb = StringBuilder("\"")
    for (c in s) {
        when {
            c == '"' -> sb.append("\\\"")
            c == '\\' -> sb.append("\\\\")
            c.toInt() < 0x20 -> sb.append(String.format("\\u%04x", c.toInt()))
            else -> sb.append(c)
        }
    }
    return sb.append('"').toString()
}

@Suppress("UNCHECKED_CAST")
fun main(args: Array<String>) {
    val req = Json.parse(File(args[0]).readText(Charsets.UTF_8)) as Map<String, Any?>
    val tok = BpeTokenizer(File(req["tokenizer"] as String).readText(Charsets.UTF_8))
    val out = StringBuilder("{")

    val texts = req["texts"] as List<String>
    val encoded = texts.map { tok.encode(it) }
    out.append("\"ids\":[").append(encoded.joinToString(",") { "[" + it.joinToString(",") + "]" }).append("],")
    out.append("\"decoded\":[").append(encoded.joinToString(",") { jsonString(tok.decode(it)) }).append("],")

    val tokens = (req["cases"] as List<Map<String, Any?>>).map { case ->
        val o = case["opts"] as Map<String, Any?>
        val opts = SamplingOptions(
            temperature = o["temperature"] as Double,
            topK = (o["top_k"] as Double).toInt(),
            topP = o["top_p"] as Double,
            repetitionPenalty = o["repetition_penalty"] as Double,
            noRepeatNgramSize = (o["no_repeat_ngram_size"] as Double).toInt()
        )
        val logits = (case["logits"] as List<Double>).map { it.toFloat() }.toFloatArray()
        val history = (case["history"] as List<Double>).map { it.toInt() }
        Sampler.sample(logits, opts, history, case["u"] as Double)
    }
    out.append("\"tokens\":[").append(tokens.joinToString(",")).append("],")

    // The generation loop over a toy model whose logits are exact integer arithmetic of (last id,
    // cache length), so Python can compute the very same ones: checks prefill, cached steps,
    // the sliding window and the EOS stop of the Kotlin port.
    val loops = (req["loops"] as List<Map<String, Any?>>).map { loop ->
        val o = loop["opts"] as Map<String, Any?>
        val opts = SamplingOptions(
            temperature = o["temperature"] as Double,
            topK = (o["top_k"] as Double).toInt(),
            topP = o["top_p"] as Double,
            repetitionPenalty = o["repetition_penalty"] as Double,
            noRepeatNgramSize = (o["no_repeat_ngram_size"] as Double).toInt(),
            maxNewTokens = (o["max_new_tokens"] as Double).toInt()
        )
        val vocab = (loop["vocab"] as Double).toInt()
        val context = (loop["context"] as Double).toInt()
        val model = object : StepModel<Int> {
            override val contextLength = context
            override val vocabSize = vocab
            override fun newCache() = 0
            override fun step(ids: LongArray, cache: Int): Pair<FloatArray, Int> {
                val length = cache + ids.size
                require(length <= context) { "toy model: context overflow" }
                val last = ids[ids.size - 1]
                val logits = FloatArray(vocab) { j -> ((j * 7919L + last * 104729L + length * 31L) % 1000L).toFloat() / 100f }
                return Pair(logits, length)
            }
        }
        val draws = (loop["draws"] as List<Double>).iterator()
        val out = ArrayList<Int>()
        val prompt = (loop["prompt"] as List<Double>).map { it.toInt() }.toIntArray()
        generate(model, prompt, opts, { draws.next() }) { out.add(it); true }
        out
    }
    out.append("\"loops\":[").append(loops.joinToString(",") { "[" + it.joinToString(",") + "]" }).append("],")

    val rng = SplitMix64((req["seed"] as Double).toLong())
    val draws = (0 until (req["n_draws"] as Double).toInt()).map { rng.nextDouble() }
    out.append("\"draws\":[").append(draws.joinToString(",") { it.toString() }).append("]}")
    println(out)
}
