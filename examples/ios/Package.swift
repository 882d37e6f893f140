// swift-tools-version:5.9
// GPTSCore: tokenizer, sampler and generation loop in plain Swift (Foundation only).
// GPTSOnnx: the onnxruntime (Objective-C API) model over model.ort.
// App/GPTSApp.swift: a SwiftUI screen to drop into an Xcode iOS app target (see README.md).
import PackageDescription

let package = Package(
    name: "GPTSEdge",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "GPTSCore", targets: ["GPTSCore"]),
        .library(name: "GPTSOnnx", targets: ["GPTSOnnx"]),
    ],
    dependencies: [
        // Use the same onnxruntime version as the Python onnxruntime that converted model.ort, or newer.
        .package(url: "https://github.com/microsoft/onnxruntime-swift-package-manager", from: "1.23.1"),
    ],
    targets: [
        .target(name: "GPTSCore"),
        .target(
            name: "GPTSOnnx",
            dependencies: [
                "GPTSCore",
                .product(name: "onnxruntime", package: "onnxruntime-swift-package-manager"),
            ]
        ),
    ]
)
