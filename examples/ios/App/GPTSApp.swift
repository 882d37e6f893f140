// A one-screen SwiftUI app. Add this file to an Xcode iOS App target that depends on the
// GPTSCore and GPTSOnnx products of ../Package.swift, and add the exported folder
// (model.ort, config.json, tokenizer.json, generation_config.json) to the target as a folder
// reference named "model". See README.md.
import GPTSCore
import GPTSOnnx
import SwiftUI

@main
struct GPTSApp: App {
    var body: some Scene { WindowGroup { ContentView() } }
}

// Published state changes only on the main queue (DispatchQueue.main.async); the model runs on `queue`.
final class Generator: ObservableObject {
    @Published var text = ""
    @Published var status = "loading model…"
    @Published var ready = false
    private var model: GptsOrtModel?
    private var tokenizer: BpeTokenizer?
    private var generation: [String: Any] = [:]
    private let queue = DispatchQueue(label: "gpts.generate")

    init() {
        queue.async {
            do {
                guard let folder = Bundle.main.url(forResource: "model", withExtension: nil) else {
                    throw GPTSError.badFile("the app bundle has no 'model' folder (see README.md)")
                }
                let tok = try BpeTokenizer(tokenizerJson: Data(contentsOf: folder.appendingPathComponent("tokenizer.json")))
                let m = try GptsOrtModel(folder: folder)
                let gen = (try? JSONSerialization.jsonObject(
                    with: Data(contentsOf: folder.appendingPathComponent("generation_config.json")))) as? [String: Any] ?? [:]
                DispatchQueue.main.async {
                    self.tokenizer = tok; self.model = m; self.generation = gen
                    self.status = "model loaded"; self.ready = true
                }
            } catch {
                DispatchQueue.main.async { self.status = "could not load the model: \(error)" }
            }
        }
    }

    func run(prompt: String, greedy: Bool) {
        guard let m = model, let tok = tokenizer else { return }
        var opts = SamplingOptions(generationConfig: generation)
        if greedy { opts.temperature = 0 }
        ready = false
        text = prompt
        queue.async {
            var ids: [Int] = []
            var rng = SplitMix64(seed: UInt64(DispatchTime.now().uptimeNanoseconds))
            let t0 = DispatchTime.now().uptimeNanoseconds
            var first: UInt64 = 0
            do {
                try generate(m, promptIds: tok.encode(prompt), options: opts, draw: { rng.next() }) { id in
                    if ids.isEmpty { first = DispatchTime.now().uptimeNanoseconds }
                    if id != eotId { ids.append(id) }
                    let shown = prompt + tok.decodeComplete(ids)
                    let secs = Double(DispatchTime.now().uptimeNanoseconds - first) / 1e9
                    let tps = ids.count > 1 && secs > 0 ? Double(ids.count - 1) / secs : 0
                    let prefillMs = Double(first - t0) / 1e6
                    DispatchQueue.main.async {
                        self.text = shown
                        self.status = String(format: "%d tokens · %.1f tokens/s · prefill %.1f ms", ids.count, tps, prefillMs)
                    }
                    return true
                }
            } catch {
                DispatchQueue.main.async { self.status = "generation failed: \(error)" }
            }
            DispatchQueue.main.async { self.ready = true }
        }
    }
}

struct ContentView: View {
    @StateObject private var gen = Generator()
    @State private var prompt = "Once upon a time"
    @State private var greedy = false

    var body: some View {
        ScrollView {
            VStack(alignment: .leading, spacing: 12) {
                TextField("Prompt", text: $prompt).textFieldStyle(.roundedBorder)
                Toggle("Greedy", isOn: $greedy)
                Button("Generate") { gen.run(prompt: prompt, greedy: greedy) }.disabled(!gen.ready)
                Text(gen.status).font(.caption)
                Text(gen.text)
            }.padding()
        }
    }
}
