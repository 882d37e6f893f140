package dev.gptsedge.sample

/**
 * Kotlin port of gpts_edge.sampling.sample: same options, same order of operations, float64
 * throughout, numpy's pairwise summation where numpy sums, so the same logits, history and
 * uniform draw give the same token as Python (checked by examples/android/jvmcheck).
 *
 * Order: repetition penalty -> no-repeat-ngram ban -> greedy argmax (temperature 0) ->
 * temperature -> top-k -> softmax -> top-p -> draw the first id whose cumulative mass exceeds
 * u * kept mass.
 */
class SamplingOptions(
    val temperature: Double = 0.8,
    val topK: Int = 0,
    val topP: Double = 0.95,
    val repetitionPenalty: Double = 1.1,
    val noRepeatNgramSize: Int = 4,
    val maxNewTokens: Int = 80
) {
    init {
        require(temperature >= 0) { "temperature: expected >= 0, found $temperature" }
        require(topP > 0 && topP <= 1) { "topP: expected a value in (0, 1], found $topP" }
        require(topK >= 0) { "topK: expected >= 0 (0 = off), found $topK" }
        require(repetitionPenalty > 0) { "repetitionPenalty: expected > 0, found $repetitionPenalty" }
        require(noRepeatNgramSize >= 0) { "noRepeatNgramSize: expected >= 0, found $noRepeatNgramSize" }
        require(maxNewTokens >= 0) { "maxNewTokens: expected >= 0, found $maxNewTokens" }
    }

    val greedy: Boolean get() = temperature == 0.0

    companion object {
        val GREEDY = SamplingOptions(temperature = 0.0)
    }
}

object Sampler {
    /** Tokens that would complete an n-gram already present in [history]. */
    fun bannedNgramTokens(history: List<Int>, n: Int): Set<Int> {
        val banned = HashSet<Int>()
        if (n <= 0 || history.size < n) return banned
        val start = history.size - n + 1
        for (i in 0..history.size - n) {
            var same = true
            for (j in 0 until n - 1) {
                if (history[i + j] != history[start + j]) { same = false; break }
            }
            if (same) banned.add(history[i + n - 1])
        }
        return banned
    }

    /** numpy's argmax: the first maximum (and the first NaN, if any). */
    private fun argmax(x: DoubleArray): Int {
        var best = 0
        for (i in x.indices) {
            if (x[i].isNaN()) return i
            if (x[i] > x[best]) best = i
        }
        return best
    }

    /** numpy's pairwise summation of a contiguous float64 array (what `p.sum()` does). */
    fun pairwiseSum(a: DoubleArray, start: Int = 0, n: Int = a.size): Double {
        if (n < 8) {
            var res = -0.0
            for (i in 0 until n) res += a[start + i]
            return res
        }
        if (n <= 128) {
            val r = DoubleArray(8) { a[start + it] }
            var i = 8
            while (i < n - n % 8) {
                for (j in 0 until 8) r[j] += a[start + i + j]
                i += 8
            }
            var res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
            while (i < n) res += a[start + i++]
            return res
        }
        var n2 = n / 2
        n2 -= n2 % 8
        return pairwiseSum(a, start, n2) + pairwiseSum(a, start + n2, n - n2)
    }

    /** One token id from [logits] given the ids so far and a uniform draw [u] in [0, 1). */
    fun sample(logits: FloatArray, opts: SamplingOptions, history: List<Int>, u: Double): Int {
        val v = logits.size
        val x = DoubleArray(v) { logits[it].toDouble() }
        if (opts.repetitionPenalty != 1.0) {
            for (id in HashSet(history)) {
                val s = x[id]
                x[id] = if (s > 0) s / opts.repetitionPenalty else s * opts.repetitionPenalty
            }
        }
        for (t in bannedNgramTokens(history, opts.noRepeatNgramSize)) x[t] = Double.NEGATIVE_INFINITY
        if (opts.greedy) return argmax(x)
        for (i in 0 until v) x[i] = x[i] / opts.temperature
        if (opts.topK in 1 until v) {
            val sorted = x.copyOf()
            sorted.sort()
            val kth = sorted[v - opts.topK] // ties with the k-th largest value stay in
            for (i in 0 until v) if (x[i] < kth) x[i] = Double.NEGATIVE_INFINITY
        }
        var max = Double.NEGATIVE_INFINITY
        var anyFinite = false
        for (s in x) if (!s.isInfinite() && !s.isNaN()) { anyFinite = true; if (s > max) max = s }
        if (!anyFinite) return argmax(DoubleArray(v) { logits[it].toDouble() }) // all banned: raw argmax
        var p = DoubleArray(v) { if (x[it].isInfinite() || x[it].isNaN()) 0.0 else Math.exp(x[it] - max) }
        val total = pairwiseSum(p)
        for (i in 0 until v) p[i] = p[i] / total
        if (opts.topP < 1.0) {
            // Stable sort by probability, descending (lower id first on ties).
            val order = (0 until v).sortedWith(Comparator { a, b -> java.lang.Double.compare(p[b], p[a]) })
            var cum = 0.0
            var keepN = v
            for (j in 0 until v) {
                cum += p[order[j]]
                if (cum >= opts.topP) { keepN = j + 1; break }
            }
            val kept = DoubleArray(v)
            for (j in 0 until keepN) kept[order[j]] = p[order[j]]
            p = kept
        }
        val cum = DoubleArray(v)
        var c = 0.0
        for (i in 0 until v) { c += p[i]; cum[i] = c }
        val target = u * cum[v - 1]
        var idx = v
        for (i in 0 until v) if (cum[i] > target) { idx = i; break }
        if (idx > v - 1) idx = v - 1
        while (p[idx] == 0.0 && idx > 0) idx--
        return idx
    }
}

/**
 * Seeded uniform draws in [0, 1) with 53 random bits (splitmix64), the same stream as the browser
 * sample's makeRng: one seed gives the same text on Android, iOS and in the browser. It is not
 * numpy's generator, so it differs from `gpts-edge generate --seed` in Python.
 */
class SplitMix64(seed: Long) {
    private var state = seed

    fun nextDouble(): Double {
        state += -7046029254386353131L // 0x9e3779b97f4a7c15
        var z = state
        z = (z xor (z ushr 30)) * -4658895280553007687L // 0xbf58476d1ce4e5b9
        z = (z xor (z ushr 27)) * -7723592293110705685L // 0x94d049bb133111eb
        z = z xor (z ushr 31)
        return (z ushr 11).toDouble() / 9007199254740992.0 // 2^53
    }
}
