package dev.gptsedge.sample

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import java.nio.FloatBuffer
import java.nio.IntBuffer
import java.nio.LongBuffer

/** The KV cache between steps: the `present.*` tensors of the last run, fed back as `past_key_values.*`. */
class KvCache(val past: Map<String, OnnxTensor>, val length: Int)

/**
 * GPT-S on onnxruntime-android (the same ai.onnxruntime API as the desktop Java package): one
 * session over model.decode.ort (or model.ort), prefill in one run, then one run per token.
 *
 * Either graph of `gpts-edge export --format ort` runs; which one is read from its inputs (names
 * from gpts_edge/names.py):
 * - model.decode.ort, the fast step graph: input_ids [1, T] int64, seqlens_k [1] int32 (cached + T
 *   - 1), total_sequence_length int32 scalar (cached + T), past_key_values.{i}.key/value
 *   [1, kvHeads, context, headDim] float32 (fixed size; positions past the cache are ignored) ->
 *   logits [1, 1, vocab] (last position), present.{i}.key/value of the same fixed size.
 * - model.ort, the compatible graph: input_ids, attention_mask, position_ids [1, T] int64;
 *   past_key_values.{i}.key/value [1, kvHeads, past, headDim] -> logits [1, T, vocab],
 *   present.{i}.key/value [1, kvHeads, past + T, headDim].
 *
 * Not thread-safe: one generation at a time per instance (the decode graph's cache is one buffer
 * per model, updated in place).
 */
class GptsOrtModel(modelBytes: ByteArray, configJson: String, threads: Int = 1) : StepModel<KvCache>, AutoCloseable {
    private val env: OrtEnvironment = OrtEnvironment.getEnvironment()
    private val session: OrtSession
    private val layers: Int
    private val kvHeads: Int
    private val headDim: Int
    override val vocabSize: Int
    override val contextLength: Int
    private val empty: Map<String, OnnxTensor>
    private val pinned: Map<String, OnnxTensor>
    /** Whether the session runs the decode graph (model.decode.ort). */
    val decodeGraph: Boolean
    // The Result whose present.* tensors are the live cache; closed when the next run replaces it.
    private var live: OrtSession.Result? = null

    init {
        @Suppress("UNCHECKED_CAST")
        val cfg = Json.parse(configJson) as Map<String, Any?>
        fun int(key: String): Int = (cfg[key] as? Double)?.toInt()
            ?: throw IllegalArgumentException("config.json: field $key: expected a number, found ${cfg[key]}")
        layers = int("num_hidden_layers")
        kvHeads = int("num_key_value_heads")
        headDim = int("head_dim")
        vocabSize = int("vocab_size")
        contextLength = int("max_position_embeddings")
        val opts = OrtSession.SessionOptions()
        // 1.4M parameters: a thread pool costs more per token than it saves, and one thread
        // leaves the other cores (and the battery) to the app.
        opts.setIntraOpNumThreads(threads)
        session = env.createSession(modelBytes, opts)
        decodeGraph = "seqlens_k" in session.inputNames
        // The decode graph's cache is a fixed-size buffer (zeros: nothing cached yet); the
        // compatible graph's grows from zero positions.
        val positions = if (decodeGraph) contextLength else 0
        val shape = longArrayOf(1, kvHeads.toLong(), positions.toLong(), headDim.toLong())
        val e = LinkedHashMap<String, OnnxTensor>()
        for (i in 0 until layers) {
            for (kv in listOf("key", "value")) {
                e["past_key_values.$i.$kv"] =
                    OnnxTensor.createTensor(env, FloatBuffer.allocate(kvHeads * positions * headDim), shape)
            }
        }
        empty = e
        // The decode graph writes each new position into the cache buffer in place: its present.*
        // outputs are pinned to the very tensors fed as past_key_values.* (what IO binding does
        // in Python), so a step copies no cache. Copying it instead (unpinned outputs) ran
        // barely faster than model.ort in Python; in place was about 1.7x faster.
        pinned = if (decodeGraph) e.mapKeys { it.key.replace("past_key_values.", "present.") } else emptyMap()
    }

    override fun newCache(): KvCache = KvCache(empty, 0)

    override fun step(ids: LongArray, cache: KvCache): Pair<FloatArray, KvCache> {
        val n = ids.size
        require(n > 0) { "step: expected at least one token, found none" }
        val total = cache.length + n
        require(total <= contextLength) { "sequence of $total tokens is longer than the context ($contextLength)" }
        val own = LinkedHashMap<String, OnnxTensor>()
        own["input_ids"] = OnnxTensor.createTensor(env, LongBuffer.wrap(ids), longArrayOf(1, n.toLong()))
        if (decodeGraph) {
            own["seqlens_k"] = OnnxTensor.createTensor(env, IntBuffer.wrap(intArrayOf(total - 1)), longArrayOf(1))
            own["total_sequence_length"] = OnnxTensor.createTensor(env, IntBuffer.wrap(intArrayOf(total)), longArrayOf())
        } else {
            val mask = LongArray(total) { 1L }
            val pos = LongArray(n) { cache.length + it.toLong() }
            own["attention_mask"] = OnnxTensor.createTensor(env, LongBuffer.wrap(mask), longArrayOf(1, total.toLong()))
            own["position_ids"] = OnnxTensor.createTensor(env, LongBuffer.wrap(pos), longArrayOf(1, n.toLong()))
        }
        val feeds = HashMap<String, OnnxTensor>(cache.past)
        feeds.putAll(own)
        val result = try {
            if (decodeGraph) session.run(feeds, setOf("logits"), pinned) else session.run(feeds)
        } finally {
            for (t in own.values) t.close()
        }
        // The inputs of this run (the previous result's tensors) are no longer needed.
        live?.close()
        live = result
        val logitsBuf = (result.get("logits").get() as OnnxTensor).floatBuffer
        val logits = FloatArray(vocabSize)
        logitsBuf.position(if (decodeGraph) 0 else (n - 1) * vocabSize)  // decode: last position only
        logitsBuf.get(logits)
        // Decode graph: the cache buffers now hold `total` positions (an older KvCache of this
        // model is no longer valid; the generation loop never steps from one).
        if (decodeGraph) return Pair(logits, KvCache(empty, total))
        val present = LinkedHashMap<String, OnnxTensor>()
        for (i in 0 until layers) {
            present["past_key_values.$i.key"] = result.get("present.$i.key").get() as OnnxTensor
            present["past_key_values.$i.value"] = result.get("present.$i.value").get() as OnnxTensor
        }
        return Pair(logits, KvCache(present, total))
    }

    override fun close() {
        live?.close()
        live = null
        for (t in empty.values) t.close()
        session.close()
    }
}
