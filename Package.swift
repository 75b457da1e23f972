// swift-tools-version: 6.0
// rapace for Swift: one RPC model for host ↔ plugin (shared memory), browser tools
// (WebSocket), stream sockets and in-memory pairs, all driven by one libevent reactor.

import PackageDescription

let strictSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
    .enableUpcomingFeature("MemberImportVisibility"),
]

let package = Package(
    name: "rapace",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Rapace", targets: ["Rapace"]),
        .library(name: "EchoService", targets: ["EchoService"]),
        .executable(name: "rapace-echo", targets: ["RapaceEcho"]),
        .executable(name: "rapace-bench", targets: ["RapaceBench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
    ],
    targets: [
        // The only C in the package: libevent, eventfd, memfd, SCM_RIGHTS and clocks,
        // behind `rapace_`-prefixed symbols.
        .target(
            name: "CRapaceShim",
            linkerSettings: [
                .linkedLibrary("event_core"),
            ]
        ),
        .target(
            name: "Rapace",
            dependencies: [
                "CRapaceShim",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "EchoService",
            dependencies: ["Rapace"],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "RapaceEcho",
            dependencies: [
                "Rapace",
                "EchoService",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "RapaceBench",
            dependencies: [
                "Rapace",
                "EchoService",
                "CRapaceShim",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            path: "Benchmarks/RapaceBench",
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "RapaceTests",
            dependencies: [
                "Rapace",
                "EchoService",
                "CRapaceShim",
                "RapaceEcho",
            ],
            exclude: ["Vectors"],
            swiftSettings: strictSettings
        ),
    ],
    swiftLanguageModes: [.v6]
)
