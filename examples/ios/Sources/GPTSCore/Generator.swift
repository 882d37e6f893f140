/// What the generation loop needs from a model.
public protocol StepModel {
    associatedtype Cache
    var contextLength: Int { get }
    var vocabSize: Int { get }
    func newCache() throws -> Cache
    /// Runs `ids` after `cache`; returns the next-token logits after the last id and the new cache.
    func step(_ ids: [Int64], _ cache: Cache) throws -> ([Float], Cache)
}

public let eotId = 0

/// Port of gpts_edge.sampling.generate_tokens: prefill in one step, then one step per token; a
/// full context drops the cache and prefills the last 3/4 again. `onToken` returns false to stop.
public func generate<M: StepModel>(
    _ model: M, promptIds: [Int], options opts: SamplingOptions,
    draw: () -> Double, onToken: (Int) -> Bool
) throws {
    var ids = promptIds.isEmpty ? [eotId] : promptIds
    if let bad = ids.first(where: { $0 < 0 || $0 >= model.vocabSize }) {
        throw GPTSError.badInput("token id \(bad) is outside the vocabulary (0..<\(model.vocabSize))")
    }
    if ids.count > model.contextLength { ids = Array(ids.suffix(model.contextLength)) }
    var history = ids
    var (logits, cache) = try model.step(ids.map(Int64.init), try model.newCache())
    var filled = ids.count
    for _ in 0..<opts.maxNewTokens {
        let tok = Sampler.sample(logits, opts, history, draw())
        history.append(tok)
        if !onToken(tok) || tok == eotId { return }
        if filled + 1 > model.contextLength {
            // At least one token: 3/4 of a context under 4 rounds to 0.
            let keep = Array(history.suffix(max(1, model.contextLength * 3 / 4)))
            (logits, cache) = try model.step(keep.map(Int64.init), try model.newCache())
            filled = keep.count
        } else {
            (logits, cache) = try model.step([Int64(tok)], cache)
            filled += 1
        }
    }
}
