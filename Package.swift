// swift-tools-version: 6.2
// rapace for Swift: one RPC model for host ↔ plugin (shared memory), browser tools
// (WebSocket), stream sockets and in-memory pairs, all driven by one libevent reactor.

import CompilerPluginSupport
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
        .library(name: "RapaceMacros", targets: ["RapaceMacros"]),
        .library(name: "EchoService", targets: ["EchoService"]),
        .executable(name: "rapace-echo", targets: ["RapaceEcho"]),
        .executable(name: "rapace-bench", targets: ["RapaceBench"]),
        .library(name: "RapacePlugin", targets: ["RapacePlugin"]),
        .library(name: "RapaceTracing", targets: ["RapaceTracing"]),
        .executable(name: "rapace-tracing-probe", targets: ["RapaceTracingProbe"]),
        .executable(name: "rapace-example-plugin", targets: ["RapaceExamplePlugin"]),
        .executable(name: "rapace-example-host", targets: ["RapaceExampleHost"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-distributed-tracing", from: "1.7.3"),
        .package(url: "https://github.com/swiftlang/swift-syntax", "600.0.0"..<"604.0.0"),
    ],
    targets: [
        // The only C target of the library (Tests/Interop/shm_peer.c is a test peer, compiled
        // by its tests; CRapaceMallocCounter below is test code),
        // behind `rapace_`-prefixed symbols: libevent's macros and callbacks, eventfd,
        // getrandom, pipe2 and O_PATH opens, socket calls (accept4, socket options,
        // MSG_NOSIGNAL sends, SCM_RIGHTS), pidfd_open and pidfd_send_signal,
        // PR_SET_PDEATHSIG, atomics on shared memory, the monotonic clock, and per-thread
        // state (the current reactor, the thread's name, its CPU).
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
        // The `@Service` macro: its compiler plugin (swift-syntax) and the module users import.
        // Only what serves or calls a generated service depends on them; rapace-bench must not
        // (a release build of swift-syntax takes 7–10 minutes on 2 cores).
        .macro(
            name: "RapaceMacrosImplementation",
            dependencies: [
                .product(name: "SwiftSyntax", package: "swift-syntax"),
                .product(name: "SwiftSyntaxMacros", package: "swift-syntax"),
                .product(name: "SwiftSyntaxBuilder", package: "swift-syntax"),
                .product(name: "SwiftCompilerPlugin", package: "swift-syntax"),
                .product(name: "SwiftDiagnostics", package: "swift-syntax"),
            ],
            swiftSettings: strictSettings
        ),
        .target(
            name: "RapaceMacros",
            dependencies: ["Rapace", "RapaceMacrosImplementation"],
            swiftSettings: strictSettings
        ),
        // Echo written by hand against `RPCService`: the baseline the generated code is
        // measured against, and what rapace-bench serves and calls.
        .target(
            name: "EchoService",
            dependencies: ["Rapace"],
            swiftSettings: strictSettings
        ),
        // Echo defined with `@Service`: what rapace-echo serves and calls.
        .target(
            name: "GeneratedEcho",
            dependencies: ["Rapace", "RapaceMacros"],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "RapaceEcho",
            dependencies: [
                "Rapace",
                "GeneratedEcho",
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
                "RapaceTracing",
                "CRapaceShim",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Benchmarks/RapaceBench",
            swiftSettings: strictSettings
        ),
        // Plugin runtime: `run`/`runMulti` for plugins, `PluginProcess` for hosts. No macros,
        // so plugins and hosts that do not use `@Service` do not build swift-syntax.
        .target(
            name: "RapacePlugin",
            dependencies: [
                "Rapace",
                "CRapaceShim",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        // The tracing bridge: a plugin's swift-log records and swift-distributed-tracing spans
        // forwarded to its host. Hand-written services (no macros), so plugins and
        // rapace-bench link it without swift-syntax.
        .target(
            name: "RapaceTracing",
            dependencies: [
                "Rapace",
                "RapacePlugin",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: strictSettings
        ),
        // The tracing bridge's test subject: a plugin that logs, opens spans, floods and
        // crashes on request.
        .executableTarget(
            name: "RapaceTracingProbe",
            dependencies: [
                "Rapace", "RapacePlugin", "RapaceTracing",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "RapaceExamplePlugin",
            dependencies: [
                "Rapace", "RapacePlugin", "RapaceTracing", "EchoService", "CRapaceShim",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "RapaceExampleHost",
            dependencies: ["Rapace", "RapacePlugin", "RapaceTracing", "EchoService", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strictSettings
        ),
        // Helpers every test target shares, one copy each: the process gate and its
        // traits (which tests may run in parallel), child processes, /proc readers and
        // leak checks, temporary paths, bounded waits, log capture. Test code only.
        .target(
            name: "RapaceTestSupport",
            dependencies: [
                "Rapace",
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Tests/RapaceTestSupport",
            swiftSettings: strictSettings
        ),
        // A per-thread malloc counter (C, `rapace_`-prefixed, plus the unprefixed `malloc`,
        // `calloc`, `realloc` and aligned variants it interposes): the allocation tests
        // count with it. Test code only: linked into the test executable, never into a
        // library or a shipped executable (no product or non-test target may depend on it).
        .target(
            name: "CRapaceMallocCounter",
            path: "Tests/CRapaceMallocCounter"
        ),
        .testTarget(
            name: "RapaceTestSupportTests",
            dependencies: ["RapaceTestSupport"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "RapacePluginTests",
            dependencies: [
                "RapaceTestSupport",
                "Rapace",
                "RapacePlugin",
                "EchoService",
                "CRapaceShim",
                "RapaceExamplePlugin",
                "RapaceExampleHost",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "RapaceTracingTests",
            dependencies: [
                "RapaceTestSupport",
                "Rapace",
                "RapacePlugin",
                "RapaceTracing",
                "RapaceTracingProbe",
                "RapaceExamplePlugin",
                "RapaceExampleHost",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "RapaceTests",
            dependencies: [
                "RapaceTestSupport",
                "Rapace",
                "EchoService",
                "CRapaceShim",
                "CRapaceMallocCounter",
                "RapaceEcho",
            ],
            exclude: ["Vectors"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "RapaceMacrosTests",
            dependencies: [
                "RapaceTestSupport",
                "Rapace",
                "RapaceMacros",
                "RapaceMacrosImplementation",
                "EchoService",
                "GeneratedEcho",
                .product(name: "SwiftDiagnostics", package: "swift-syntax"),
                .product(name: "SwiftSyntax", package: "swift-syntax"),
                .product(name: "SwiftSyntaxMacros", package: "swift-syntax"),
                .product(name: "SwiftSyntaxMacroExpansion", package: "swift-syntax"),
                .product(name: "SwiftSyntaxMacrosGenericTestSupport", package: "swift-syntax"),
            ],
            swiftSettings: strictSettings
        ),
    ],
    swiftLanguageModes: [.v6]
)
