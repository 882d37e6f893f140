package dev.gptsedge.sample

import android.app.Activity
import android.os.Bundle
import android.os.SystemClock
import android.view.ViewGroup.LayoutParams.MATCH_PARENT
import android.view.ViewGroup.LayoutParams.WRAP_CONTENT
import android.widget.Button
import android.widget.CheckBox
import android.widget.EditText
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.TextView
import java.util.concurrent.Executors

/**
 * One screen: a prompt box, a Greedy switch, Generate, and the streamed text with tokens/s.
 * The model folder from `gpts-edge export --format ort` is bundled as app assets
 * (model.ort, model.decode.ort, config.json, tokenizer.json, generation_config.json); generation
 * steps with model.decode.ort when it is there.
 */
class MainActivity : Activity() {
    private val worker = Executors.newSingleThreadExecutor()
    private var model: GptsOrtModel? = null
    private var tokenizer: BpeTokenizer? = null
    private var generation: Map<String, Any?> = emptyMap()

    private lateinit var prompt: EditText
    private lateinit var greedy: CheckBox
    private lateinit var go: Button
    private lateinit var output: TextView
    private lateinit var stats: TextView

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        prompt = EditText(this).apply { setText("Once upon a time") }
        greedy = CheckBox(this).apply { text = "Greedy" }
        go = Button(this).apply { text = "Generate"; isEnabled = false }
        stats = TextView(this)
        output = TextView(this).apply { textSize = 16f }
        val column = LinearLayout(this).apply {
            orientation = LinearLayout.VERTICAL
            setPadding(32, 32, 32, 32)
            addView(prompt, LinearLayout.LayoutParams(MATCH_PARENT, WRAP_CONTENT))
            addView(greedy)
            addView(go)
            addView(stats)
            addView(output)
        }
        setContentView(ScrollView(this).apply { addView(column) })
        go.setOnClickListener { startGeneration() }

        stats.text = "loading model…"
        worker.execute {
            try {
                // The decode graph steps faster; exports without it have only model.ort.
                val file = if ("model.decode.ort" in (assets.list("") ?: emptyArray())) "model.decode.ort" else "model.ort"
                val bytes = assets.open(file).use { it.readBytes() }
                val config = assets.open("config.json").use { String(it.readBytes(), Charsets.UTF_8) }
                val tokJson = assets.open("tokenizer.json").use { String(it.readBytes(), Charsets.UTF_8) }
                val genJson = assets.open("generation_config.json").use { String(it.readBytes(), Charsets.UTF_8) }
                tokenizer = BpeTokenizer(tokJson)
                model = GptsOrtModel(bytes, config)
                @Suppress("UNCHECKED_CAST")
                generation = Json.parse(genJson) as Map<String, Any?>
                runOnUiThread { stats.text = "$file loaded (${bytes.size / 1024} KiB)"; go.isEnabled = true }
            } catch (e: Exception) {
                runOnUiThread { stats.text = "could not load the model: ${e.message}" }
            }
        }
    }

    private fun options(): SamplingOptions {
        val g = generation
        fun num(key: String, default: Double) = (g[key] as? Double) ?: default
        if (greedy.isChecked || g["do_sample"] == false) return SamplingOptions(temperature = 0.0, maxNewTokens = num("max_new_tokens", 80.0).toInt())
        return SamplingOptions(
            temperature = num("temperature", 0.8),
            topK = num("top_k", 0.0).toInt(),
            topP = num("top_p", 0.95),
            repetitionPenalty = num("repetition_penalty", 1.1),
            noRepeatNgramSize = num("no_repeat_ngram_size", 4.0).toInt(),
            maxNewTokens = num("max_new_tokens", 80.0).toInt()
        )
    }

    private fun startGeneration() {
        val m = model ?: return
        val tok = tokenizer ?: return
        val text = prompt.text.toString()
        val opts = options()
        go.isEnabled = false
        output.text = text
        worker.execute {
            val ids = ArrayList<Int>()
            val rng = SplitMix64(SystemClock.elapsedRealtimeNanos())
            val t0 = SystemClock.elapsedRealtimeNanos()
            var firstAt = 0L
            try {
                generate(m, tok.encode(text), opts, { rng.nextDouble() }) { id ->
                    if (ids.isEmpty()) firstAt = SystemClock.elapsedRealtimeNanos()
                    if (id != EOT_ID) ids.add(id)
                    val shown = text + decodeComplete(tok, ids)
                    val secs = (SystemClock.elapsedRealtimeNanos() - firstAt) / 1e9
                    val tps = if (ids.size > 1 && secs > 0) (ids.size - 1) / secs else 0.0
                    val prefillMs = (firstAt - t0) / 1e6
                    runOnUiThread {
                        output.text = shown
                        stats.text = String.format("%d tokens · %.1f tokens/s · prefill %.1f ms", ids.size, tps, prefillMs)
                    }
                    true
                }
            } catch (e: Exception) {
                runOnUiThread { stats.text = "generation failed: ${e.message}" }
            }
            runOnUiThread { go.isEnabled = true }
        }
    }

    /** The text of [ids] without a trailing, still incomplete UTF-8 character. */
    private fun decodeComplete(tok: BpeTokenizer, ids: List<Int>): String {
        val bytes = tok.decodeBytes(ids.toIntArray())
        var end = bytes.size
        // Walk back over continuation bytes to the last lead byte; drop it if its sequence is short.
        var k = end - 1
        while (k >= 0 && (bytes[k].toInt() and 0xC0) == 0x80) k--
        if (k >= 0) {
            val lead = bytes[k].toInt() and 0xFF
            val need = when { lead >= 0xF0 -> 4; lead >= 0xE0 -> 3; lead >= 0xC0 -> 2; else -> 1 }
            if (end - k < need) end = k
        }
        return String(bytes, 0, end, Charsets.UTF_8)
    }

    override fun onDestroy() {
        // Closed on the worker so a running generation finishes before its session goes away.
        val m = model
        worker.execute { m?.close() }
        worker.shutdown()
        super.onDestroy()
    }
}
