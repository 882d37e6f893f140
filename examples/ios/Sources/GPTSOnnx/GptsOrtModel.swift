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

/// GPT-S over onnxruntime's Objective-C API: one session on model.ort, prefill in one run, then
/// one run per token. Graph I/O names are those of gpts_edge/names.py.
public final class GptsOrtModel: StepModel {
    public let contextLength: Int
    public let vocabSize: Int
    private let layers: Int
    private let kvHeads: Int
    private let headDim: Int
    private let env: ORTEnv
    private let session: ORTSession
    private let outputNames: Set<String>

    /// `folder` holds model.ort and config.json (from `gpts-edge export --format ort`).
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
        session = try ORTSession(env: env, modelPath: folder.appendingPathComponent("model.ort").path,
                                 sessionOptions: opts)
        var names: Set<String> = ["logits"]
        for i in 0..<layers { names.insert("present.\(i).key"); names.insert("present.\(i).value") }
        outputNames = names
    }

    private func tensor<T>(_ values: [T], _ type: ORTTensorElementDataType, _ shape: [Int]) throws -> ORTValue {
        let data = values.withUnsafeBufferPointer { NSMutableData(bytes: $0.baseAddress, length: $0.count * MemoryLayout<T>.stride) }
        return try ORTValue(tensorData: data, elementType: type, shape: shape.map { NSNumber(value: $0) })
    }

    public func newCache() throws -> KvCache {
        var past: [String: ORTValue] = [:]
        for i in 0..<layers {
            past["past_key_values.\(i).key"] = try tensor([Float](), .float, [1, kvHeads, 0, headDim])
            past["past_key_values.\(i).value"] = try tensor([Float](), .float, [1, kvHeads, 0, headDim])
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
        feeds["attention_mask"] = try tensor([Int64](repeating: 1, count: total), .int64, [1, total])
        feeds["position_ids"] = try tensor((0..<n).map { Int64(cache.length + $0) }, .int64, [1, n])
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
