package dev.gptsedge.sample

/** What the generation loop needs from a model: a fresh KV cache and one forward step. */
interface StepModel<C> {
    val contextLength: Int
    val vocabSize: Int

    fun newCache(): C

    /** Runs [ids] after [cache]; returns the next-token logits after the last id and the new cache. */
    fun step(ids: LongArray, cache: C): Pair<FloatArray, C>
}

const val EOT_ID = 0

/**
 * Port of gpts_edge.sampling.generate_tokens: prefill in one step, then one step per token; when
 * the context is full the cache is dropped and the last 3/4 of the context is prefilled again.
 * [onToken] is called with each new id and returns false to stop early.
 */
fun <C> generate(
    model: StepModel<C>,
    promptIds: IntArray,
    opts: SamplingOptions,
    draws: () -> Double,
    onToken: (Int) -> Boolean
) {
    var ids = if (promptIds.isEmpty()) intArrayOf(EOT_ID) else promptIds
    for (t in ids) require(t in 0 until model.vocabSize) { "token id $t is outside the vocabulary" }
    if (ids.size > model.contextLength) ids = ids.copyOfRange(ids.size - model.contextLength, ids.size)
    val history = ArrayList<Int>(ids.toList())
    var (logits, cache) = model.step(LongArray(ids.size) { ids[it].toLong() }, model.newCache())
    var filled = ids.size
    for (n in 0 until opts.maxNewTokens) {
        val tok = Sampler.sample(logits, opts, history, draws())
        history.add(tok)
        if (!onToken(tok) || tok == EOT_ID) return
        if (filled + 1 > model.contextLength) {
            // At least one token: 3/4 of a context under 4 rounds to 0.
            val keep = history.subList(history.size - maxOf(1, model.contextLength * 3 / 4), history.size)
            val r = model.step(LongArray(keep.size) { keep[it].toLong() }, model.newCache())
            logits = r.first
            cache = r.second
            filled = keep.size
        } else {
            val r = model.step(longArrayOf(tok.toLong()), cache)
            logits = r.first
            cache = r.second
            filled += 1
        }
    }
}
