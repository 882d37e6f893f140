import Foundation
import GPTSCore
#if canImport(OnnxRuntimeBindings)
import OnnxRuntimeBindings  // Swift Package Manager: onnxruntime-swift-package-manager
#else
import onnxruntime_objc     // CocoaPods: pod 'onnxruntime-objc'
#endif

/// The KV cache between steps: the last run's present.* outputs, fed back as past_key_values.*.
public struct KvCache {
    let past: [String: ORTValue]
    let length: Int
}

/// GPT-S over onnxruntime's Objective-C API: one session on model.decode.ort (the fast step graph,
/// when the export has it) or model.ort, prefill in one run, then one run per token. Graph I/O names
/// are those of gpts_edge/names.py. The decode graph takes seqlens_k [1] (cached + new - 1) and
/// total_sequence_length (a scalar, cached + new) instead of attention_mask/position_ids, a
/// fixed-size cache [1, kvHeads, context, headDim] updated in place, and returns the last
/// position's logits only. One generation at a time per instance.
public final class GptsOrtModel: StepModel {
    public let contextLength: Int
    public let vocabSize: Int
    private let layers: Int
    private let kvHeads: Int
    private let headDim: Int
    private let env: ORTEnv
    private let session: ORTSession
    private let outputNames: Set<String>
    /// Whether the session runs the decode graph (model.decode.ort).
    public let decodeGraph: Bool

    /// `folder` holds model.ort (and model.decode.ort) and config.json (from `gpts-edge export --format ort`).
    public init(folder: URL, threads: Int32 = 1) throws {
        let cfgData = try Data(contentsOf: folder.appendingPathComponent("config.json"))
        guard let cfg = try JSONSerialization.jsonObject(with: cfgData) as? [String: Any] else {
            throw GPTSError.badFile("config.json: expected a JSON object")
        }
        func int(_ k: String) throws -> Int {
            guard let v = cfg[k] as? Int else { throw GPTSError.badFile("config.json: field \(k): expected an integer") }
            return v
        }
        layers = try int("num_hidden_layers")
        kvHeads = try int("num_key_value_heads")
        headDim = try int("head_dim")
        vocabSize = try int("vocab_size")
        contextLength = try int("max_position_embeddings")
        env = try ORTEnv(loggingLevel: .warning)
        let opts = try ORTSessionOptions()
        // 1.4M parameters: one thread is fastest per token and spares the battery.
        try opts.setIntraOpNumThreads(threads)
        let decodePath = folder.appendingPathComponent("model.decode.ort").path
        let path = FileManager.default.fileExists(atPath: decodePath)
            ? decodePath : folder.appendingPathComponent("model.ort").path
        // Locals first: Swift reads no stored property before every one is set.
        let s = try ORTSession(env: env, modelPath: path, sessionOptions: opts)
        decodeGraph = try s.inputNames().contains("seqlens_k")
        session = s
        var names: Set<String> = ["logits"]
        for i in 0..<layers { names.insert("present.\(i).key"); names.insert("present.\(i).value") }
        outputNames = names
    }

    private func tensor<T>(_ values: [T], _ type: ORTTensorElementDataType, _ shape: [Int]) throws -> ORTValue {
        let data = values.withUnsafeBufferPointer { NSMutableData(bytes: $0.baseAddress, length: $0.count * MemoryLayout<T>.stride) }
        return try ORTValue(tensorData: data, elementType: type, shape: shape.map { NSNumber(value: $0) })
    }

    public func newCache() throws -> KvCache {
        // The decode graph's cache is a fixed-size buffer (zeros: nothing cached yet); the
        // compatible graph's grows from zero positions.
        let positions = decodeGraph ? contextLength : 0
        let zeros = [Float](repeating: 0, count: kvHeads * positions * headDim)
        var past: [String: ORTValue] = [:]
        for i in 0..<layers {
            past["past_key_values.\(i).key"] = try tensor(zeros, .float, [1, kvHeads, positions, headDim])
            past["past_key_values.\(i).value"] = try tensor(zeros, .float, [1, kvHeads, positions, headDim])
        }
        return KvCache(past: past, length: 0)
    }

    public func step(_ ids: [Int64], _ cache: KvCache) throws -> ([Float], KvCache) {
        let n = ids.count
        guard n > 0 else { throw GPTSError.badInput("step: expected at least one token, found none") }
        let total = cache.length + n
        guard total <= contextLength else {
            throw GPTSError.badInput("sequence of \(total) tokens is longer than the context (\(contextLength))")
        }
        var feeds = cache.past
        feeds["input_ids"] = try tensor(ids, .int64, [1, n])
        if decodeGraph {
            feeds["seqlens_k"] = try tensor([Int32(total - 1)], .int32, [1])
            feeds["total_sequence_length"] = try tensor([Int32(total)], .int32, [])
        } else {
            feeds["attention_mask"] = try tensor([Int64](repeating: 1, count: total), .int64, [1, total])
            feeds["position_ids"] = try tensor((0..<n).map { Int64(cache.length + $0) }, .int64, [1, n])
        }
        if decodeGraph {
            // In place: present.* are preallocated outputs over the very ORTValues fed as
            // past_key_values.* (what IO binding does in Python), so a step copies no cache; in
            // Python that was about 1.7x faster than model.ort, copying the cache barely faster.
            // The cache's buffers then hold `total` positions (an older KvCache of this model
            // is stale; the generation loop never steps from one).
            let logitsData = NSMutableData(length: vocabSize * MemoryLayout<Float>.stride)!
            var outputs: [String: ORTValue] = [
                "logits": try ORTValue(tensorData: logitsData, elementType: .float,
                                       shape: [1, 1, NSNumber(value: vocabSize)])
            ]
            for (name, value) in cache.past {
                outputs[name.replacingOccurrences(of: "past_key_values.", with: "present.")] = value
            }
            try session.run(withInputs: feeds, outputs: outputs, runOptions: nil)
            let logits = Array(UnsafeBufferPointer(start: logitsData.bytes.assumingMemoryBound(to: Float.self),
                                                   count: vocabSize))
            return (logits, KvCache(past: cache.past, length: total))
        }
        let out = try session.run(withInputs: feeds, outputNames: outputNames, runOptions: nil)
        guard let logitsValue = out["logits"] else { throw GPTSError.badFile("model.ort: no logits output") }
        let data = try logitsValue.tensorData() as Data
        let logits: [Float] = data.withUnsafeBytes { raw in
            let all = raw.bindMemory(to: Float.self)
            return Array(all[((n - 1) * vocabSize)..<(n * vocabSize)])
        }
        var past: [String: ORTValue] = [:]
        for i in 0..<layers {
            past["past_key_values.\(i).key"] = out["present.\(i).key"]
            past["past_key_values.\(i).value"] = out["present.\(i).value"]
        }
        return (logits, KvCache(past: past, length: total))
    }
}
