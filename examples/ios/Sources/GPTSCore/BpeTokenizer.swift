import Foundation

public enum GPTSError: Error, CustomStringConvertible {
    case badFile(String)
    case badInput(String)

    public var description: String {
        switch self {
        case .badFile(let m), .badInput(let m): return m
        }
    }
}

/// Byte-level BPE reading GPT-S's tokenizer.json (GPT-2 scheme; ByteLevel pre-tokenizer with
/// add_prefix_space=false, no normalizer): added tokens split out verbatim, GPT-2 regex split,
/// bytes mapped to printable characters, merges applied lowest rank first.
/// Same algorithm as examples/android's BpeTokenizer.kt (which is checked against Python).
public final class BpeTokenizer {
    private var vocab: [String: Int] = [:]
    private var idToToken: [String?] = []
    private var ranks: [String: Int] = [:]
    private var added: [(String, Int)] = []
    private var addedIds: Set<Int> = []
    private var byteToChar: [Character] = []
    private var scalarToByte: [UInt32: UInt8] = [:]
    private var cache: [String: [Int]] = [:]
    // GPT-2's split. ICU's \s, \p{L} and \p{N} are Unicode-aware, like the Rust regex in `tokenizers`.
    private let pretokenize = try! NSRegularExpression(
        pattern: "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+")

    public init(tokenizerJson: Data) throws {
        guard let root = try JSONSerialization.jsonObject(with: tokenizerJson) as? [String: Any],
              let model = root["model"] as? [String: Any],
              model["type"] as? String == "BPE",
              let v = model["vocab"] as? [String: Int],
              let merges = model["merges"] as? [Any]
        else { throw GPTSError.badFile("tokenizer.json: expected a BPE model with vocab and merges") }
        vocab = v
        for (rank, m) in merges.enumerated() {
            // "a b" (older files) or ["a", "b"] (tokenizers >= 0.20)
            if let s = m as? String { ranks[s] = rank } else if let p = m as? [String] { ranks[p.joined(separator: " ")] = rank }
        }
        for t in (root["added_tokens"] as? [[String: Any]]) ?? [] {
            if let c = t["content"] as? String, let id = t["id"] as? Int { added.append((c, id)); addedIds.insert(id) }
        }
        let size = max((vocab.values.max() ?? -1), (added.map { $0.1 }.max() ?? -1)) + 1
        idToToken = Array(repeating: nil, count: size)
        for (t, id) in vocab { idToToken[id] = t }
        for (t, id) in added { idToToken[id] = t }
        var shifted = 0
        for b in 0..<256 {
            let printable = (33...126).contains(b) || (161...172).contains(b) || (174...255).contains(b)
            let scalar = Unicode.Scalar(printable ? b : 256 + shifted)!
            if !printable { shifted += 1 }
            let c = Character(scalar)
            byteToChar.append(c)
            scalarToByte[scalar.value] = UInt8(b)
        }
    }

    public var vocabSize: Int { idToToken.count }

    public func encode(_ text: String) -> [Int] {
        var out: [Int] = []
        var rest = text[...]
        while !rest.isEmpty {
            // The earliest added token (longest on a tie) splits the text.
            var best: (Range<Substring.Index>, Int)? = nil
            for (tok, id) in added {
                if let r = rest.range(of: tok),
                   best == nil || r.lowerBound < best!.0.lowerBound
                    || (r.lowerBound == best!.0.lowerBound && r.upperBound > best!.0.upperBound) {
                    best = (r, id)
                }
            }
            guard let found = best else { encodeOrdinary(String(rest), &out); break }
            let (r, id) = found
            encodeOrdinary(String(rest[..<r.lowerBound]), &out)
            out.append(id)
            rest = rest[r.upperBound...]
        }
        return out
    }

    private func encodeOrdinary(_ text: String, _ out: inout [Int]) {
        let ns = text as NSString
        for m in pretokenize.matches(in: text, range: NSRange(location: 0, length: ns.length)) {
            let piece = ns.substring(with: m.range)
            if let ids = cache[piece] { out += ids; continue }
            let ids = bpe(piece)
            cache[piece] = ids
            out += ids
        }
    }

    private func bpe(_ piece: String) -> [Int] {
        var symbols = piece.utf8.map { String(byteToChar[Int($0)]) }
        while symbols.count > 1 {
            var best = -1
            var bestRank = Int.max
            for k in 0..<(symbols.count - 1) {
                if let r = ranks[symbols[k] + " " + symbols[k + 1]], r < bestRank { bestRank = r; best = k }
            }
            if best < 0 { break }
            symbols[best] += symbols[best + 1]
            symbols.remove(at: best + 1)
        }
        // Every single byte is in a byte-level vocabulary, so a miss means a broken tokenizer.json.
        return symbols.map { vocab[$0] ?? 0 }
    }

    /// Raw UTF-8 bytes of `ids` (added tokens such as <|endoftext|> are skipped, as in Python).
    public func decodeBytes(_ ids: [Int]) -> [UInt8] {
        var bytes: [UInt8] = []
        for id in ids where id >= 0 && id < idToToken.count && !addedIds.contains(id) {
            guard let tok = idToToken[id] else { continue }
            for s in tok.unicodeScalars { if let b = scalarToByte[s.value] { bytes.append(b) } }
        }
        return bytes
    }

    public func decode(_ ids: [Int]) -> String { String(decoding: decodeBytes(ids), as: UTF8.self) }

    /// Text of `ids` without a trailing, still incomplete UTF-8 character (for streaming).
    public func decodeComplete(_ ids: [Int]) -> String {
        var bytes = decodeBytes(ids)
        var k = bytes.count - 1
        while k >= 0 && bytes[k] & 0xC0 == 0x80 { k -= 1 }
        if k >= 0 {
            let lead = bytes[k]
            let need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1
            if bytes.count - k < need { bytes.removeSubrange(k...) }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
