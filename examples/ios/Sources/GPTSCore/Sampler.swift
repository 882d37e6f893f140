import Foundation

/// Same options and order of operations as gpts_edge.sampling (and examples/android's Sampler.kt).
public struct SamplingOptions {
    public var temperature = 0.8
    public var topK = 0
    public var topP = 0.95
    public var repetitionPenalty = 1.1
    public var noRepeatNgramSize = 4
    public var maxNewTokens = 80

    public init() {}

    public static var greedy: SamplingOptions { var o = SamplingOptions(); o.temperature = 0; return o }

    /// Defaults from generation_config.json.
    public init(generationConfig g: [String: Any]) {
        func num(_ k: String) -> Double? { (g[k] as? NSNumber)?.doubleValue }
        temperature = (g["do_sample"] as? Bool) == false ? 0 : num("temperature") ?? 0.8
        topK = Int(num("top_k") ?? 0)
        topP = num("top_p") ?? 0.95
        repetitionPenalty = num("repetition_penalty") ?? 1.1
        noRepeatNgramSize = Int(num("no_repeat_ngram_size") ?? 4)
        maxNewTokens = Int(num("max_new_tokens") ?? 80)
    }
}

public enum Sampler {
    /// Tokens that would complete an n-gram already present in `history`.
    public static func bannedNgramTokens(_ history: [Int], _ n: Int) -> Set<Int> {
        var banned = Set<Int>()
        guard n > 0, history.count >= n else { return banned }
        let start = history.count - n + 1
        for i in 0...(history.count - n) where (0..<(n - 1)).allSatisfy({ history[i + $0] == history[start + $0] }) {
            banned.insert(history[i + n - 1])
        }
        return banned
    }

    /// numpy's argmax: the first maximum (the first NaN if any).
    static func argmax(_ x: [Double]) -> Int {
        var best = 0
        for i in x.indices {
            if x[i].isNaN { return i }
            if x[i] > x[best] { best = i }
        }
        return best
    }

    /// numpy's pairwise summation of a contiguous float64 array (what `p.sum()` rounds like).
    public static func pairwiseSum(_ a: [Double], _ start: Int = 0, _ n: Int? = nil) -> Double {
        let n = n ?? a.count
        if n < 8 {
            var res = -0.0
            for i in 0..<n { res += a[start + i] }
            return res
        }
        if n <= 128 {
            var r = Array(a[start..<(start + 8)])
            var i = 8
            while i < n - n % 8 {
                for j in 0..<8 { r[j] += a[start + i + j] }
                i += 8
            }
            var res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
            while i < n { res += a[start + i]; i += 1 }
            return res
        }
        var n2 = n / 2
        n2 -= n2 % 8
        return pairwiseSum(a, start, n2) + pairwiseSum(a, start + n2, n - n2)
    }

    /// One token id from `logits` given the ids so far and a uniform draw `u` in [0, 1).
    public static func sample(_ logits: [Float], _ opts: SamplingOptions, _ history: [Int], _ u: Double) -> Int {
        let v = logits.count
        var x = logits.map { Double($0) }
        if opts.repetitionPenalty != 1.0 {
            for id in Set(history) { x[id] = x[id] > 0 ? x[id] / opts.repetitionPenalty : x[id] * opts.repetitionPenalty }
        }
        for t in bannedNgramTokens(history, opts.noRepeatNgramSize) { x[t] = -.infinity }
        if opts.temperature == 0 { return argmax(x) }
        for i in 0..<v { x[i] = x[i] / opts.temperature }
        if opts.topK > 0 && opts.topK < v {
            let kth = x.sorted()[v - opts.topK] // ties with the k-th largest stay in
            for i in 0..<v where x[i] < kth { x[i] = -.infinity }
        }
        let finite = x.filter { $0.isFinite }
        guard let mx = finite.max() else { return argmax(logits.map { Double($0) }) } // all banned
        var p = x.map { $0.isFinite ? exp($0 - mx) : 0.0 }
        let total = pairwiseSum(p)
        for i in 0..<v { p[i] = p[i] / total }
        if opts.topP < 1.0 {
            // Stable sort by probability, descending (lower id first on ties).
            let order = (0..<v).sorted { p[$0] > p[$1] || (p[$0] == p[$1] && $0 < $1) }
            var cum = 0.0
            var keepN = v
            for j in 0..<v {
                cum += p[order[j]]
                if cum >= opts.topP { keepN = j + 1; break }
            }
            var kept = [Double](repeating: 0, count: v)
            for j in 0..<keepN { kept[order[j]] = p[order[j]] }
            p = kept
        }
        var cum = [Double](repeating: 0, count: v)
        var c = 0.0
        for i in 0..<v { c += p[i]; cum[i] = c }
        let target = u * cum[v - 1]
        var idx = cum.firstIndex { $0 > target } ?? v
        idx = min(idx, v - 1)
        while p[idx] == 0 && idx > 0 { idx -= 1 }
        return idx
    }
}

/// Seeded uniform draws in [0, 1) (splitmix64, 53 bits): the same stream as the Android and
/// browser samples. Not numpy's generator, so sampled text differs from Python's `--seed`.
public struct SplitMix64 {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> Double {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        return Double(z >> 11) / 9_007_199_254_740_992.0
    }
}
