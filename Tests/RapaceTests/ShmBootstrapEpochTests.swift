import EchoService
import Foundation
import RapaceTestSupport
import Synchronization
import Testing

@testable import Rapace

#if canImport(Glibc)
import Glibc
#endif

/// The bootstrap's link between the segment a plugin mapped and the host that answers on
/// `PATH.sock` (Docs/shm.md, "Bootstrap"): each segment file starts at its own epoch, and the
/// plugin uses a connection only if the bootstrap message carries the epoch of its mapping.
@Suite("Shared memory: bootstrap epoch and socket", .sharesProcess)
struct ShmBootstrapEpochTests {
    static let config = ShmConfig(ringCapacity: 16, slotSize: 4096, slotCount: 8)

    /// Whether this process maps the file now at `path` or one that stood there
    /// (/proc/self/maps names a replaced file "PATH (deleted)").
    private static func mapsFile(at path: String) -> Bool {
        // Read to the end: procfs reports a size of 0, and String(contentsOfFile:) stops early.
        guard let file = FileHandle(forReadingAtPath: "/proc/self/maps") else { return false }
        defer { try? file.close() }
        let maps = String(decoding: file.readDataToEndOfFile(), as: UTF8.self)
        return maps.split(separator: "\n").contains { $0.hasSuffix(" " + path) || $0.hasSuffix(" " + path + " (deleted)") }
    }

    @Test("a plugin that mapped the segment of a host since replaced maps the new host's and connects")
    func replacedBetweenOpenAndConnect() async throws {
        let path = ShmPath("epoch-replaced")
        defer { path.cleanUp() }
        // The old host: its segment is at PATH, but it is gone (no socket).
        let oldEpoch = try { try ShmSegment.create(path: path.path, config: Self.config).epoch }()
        try #require(!Self.mapsFile(at: path.path), "the old host's own mapping is gone")
        try await withReactor("epoch-host") { hostReactor in
            try await withReactor("epoch-plugin") { pluginReactor in
                // The plugin opens the old segment, then waits for PATH.sock.
                let connecting = Task { try await Session.connect(shm: path.path, reactor: pluginReactor, timeout: .seconds(10)) }
                guard await waitUntil(timeout: .seconds(10), { Self.mapsFile(at: path.path) }) else {
                    connecting.cancel()
                    throw TestFailure("the plugin did not map \(path.path) within 10 s")
                }
                // A new host replaces the segment and listens: the plugin's mapping is stale now.
                let listener = try await startShmHost(on: hostReactor, path: path.path, config: Self.config)
                let newEpoch = await onLoop(hostReactor) { listener.value.segment.epoch }
                #expect(newEpoch != oldEpoch, "a new segment starts at another epoch than the one it replaces")
                // Without the epoch check the handshake hangs (the Hello goes into the old
                // file) until the 5 s handshake timeout.
                let session = try await value(of: connecting, within: .seconds(20), "connecting past a replaced segment")
                let echo = EchoClient(session)
                let text = String(repeating: "through the new host's segment ", count: 4)  // in a slot, not inline
                #expect(try await echo.echo(text) == text)
                let mapped = await onLoop(pluginReactor) { (session.frameTransport as! ShmTransport).segment.epoch }
                let hostEpoch = await onLoop(hostReactor) { listener.value.segment.epoch }
                #expect(mapped == hostEpoch)
                await session.closeAndWait()
                await onLoop(hostReactor) { listener.value.close() }
            }
        }
        #expect(!path.filesExist)
    }

    @Test("a segment that never matches the host on PATH.sock fails after bounded retries, naming both epochs")
    func persistentMismatchFails() async throws {
        let connections = ConnectionCount()
        // Serving Echo as a real host does; the plugin closes each connection again, so the
        // handshake fails and the listener takes the next one.
        try await withShmHost(
            "epoch-mismatch", config: Self.config, prepare: { _ in connections.value.withLock { $0 += 1 } }
        ) { path, hostReactor, listener, pluginReactor in
            // Another segment replaces the host's file; the host keeps PATH.sock.
            let other = try ShmSegment.create(path: path.path, config: Self.config)
            do {
                // A generous timeout: the attempts, not the clock, end the wait (a wait the
                // timeout ended would fail `.timeout`, or name fewer attempts).
                let transport = try await ShmTransport.connect(path: path.path, reactor: pluginReactor, timeout: .seconds(30))
                await onLoop(pluginReactor) { transport.value.close(error: nil) }
                Issue.record("connected to a host whose segment is not the mapped one")
            } catch let error as ShmError {
                let hostEpoch = await onLoop(hostReactor) { listener.value.segment.epoch }
                #expect(error.code == .staleSegment, "\(error)")
                #expect(error.message.contains("epoch \(other.epoch)"), "\(error)")
                #expect(error.message.contains("sent epoch \(hostEpoch)"), "\(error)")
                #expect(error.message.contains("\(ShmBootstrap.staleSegmentAttempts) attempts"), "\(error)")
            }
            let accepted = connections.value.withLock { $0 }
            #expect(accepted == ShmBootstrap.staleSegmentAttempts)
            // Closing the listener removes the files (withShmHost would remove them anyway).
            await onLoop(hostReactor) { listener.value.close() }
            #expect(!path.filesExist)
        }
    }

    @Test("the bootstrap socket appears only by a rename, with mode 0600, and nothing is left beside it")
    func socketAppearsWithItsMode() async throws {
        // A directory of its own, so that every event watched there is this test's.
        let directory = temporaryPath("sockmode")
        try #require(mkdir(directory, 0o700) == 0)
        defer { rmdir(directory) }
        let path = directory + "/segment"
        let socketPath = ShmBootstrap.socketPath(for: path)
        defer {
            unlink(path)
            unlink(socketPath)
        }
        let notify = inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC))
        try #require(notify >= 0)
        defer { close(notify) }
        try #require(inotify_add_watch(notify, directory, UInt32(IN_CREATE | IN_MOVED_TO)) >= 0)
        try await withReactor("epoch-host") { hostReactor in
            let listener = try await hostReactor.run {
                SendableBox(try ShmListener(reactor: hostReactor, path: path, config: Self.config) { _ in })
            }
            var info = stat()
            try #require(lstat(socketPath, &info) == 0)
            #expect(info.st_mode & S_IFMT == S_IFSOCK)
            #expect(info.st_mode & 0o7777 == 0o600, "mode \(String(info.st_mode & 0o7777, radix: 8))")
            // A socket bound at its final path would show up as created there, with the
            // umask's permissions until a chmod: it must only be renamed onto it.
            let events = Self.readEvents(notify)
            let forSocket = events.filter { $0.name == "segment.sock" }
            #expect(forSocket.count == 1 && forSocket.allSatisfy { $0.mask & UInt32(IN_MOVED_TO) != 0 }, "\(events)")
            // The private directory it was bound in is gone.
            let bindDirectories = events.filter { $0.name.hasPrefix("rapace-bind-") }
            #expect(bindDirectories.count == 1, "\(events)")
            for entry in bindDirectories {
                #expect(access(directory + "/" + entry.name, F_OK) != 0, "\(entry.name) was left behind")
            }
            await onLoop(hostReactor) { listener.value.close() }
        }
        #expect(access(path, F_OK) != 0 && access(socketPath, F_OK) != 0)
    }

    /// A new directory (mode 0700) holding `segment`, whose `segment.sock` has
    /// `socketPathLength` bytes: a temporary path padded with x's.
    private struct LongPath {
        let directory: String
        var path: String { directory + "/segment" }
        var socketPath: String { ShmBootstrap.socketPath(for: path) }

        init(socketPathLength: Int) throws {
            let stem = temporaryPath(in: "/dev/shm", "longpath")
            let padding = socketPathLength - "/segment.sock".utf8.count - stem.utf8.count - 1
            try #require(padding >= 0)
            directory = stem + "-" + String(repeating: "x", count: padding)
            try #require(mkdir(directory, 0o700) == 0)
        }

        /// Removes the segment, its socket and the directory.
        func cleanUp() {
            unlink(path)
            unlink(socketPath)
            rmdir(directory)
        }
    }

    @Test("a socket path that fits in sun_path works where the private directory's path would not")
    func longSocketPath() async throws {
        // PATH.sock of 100 bytes: the bind path DIR/rapace-bind-XXXXXX/s has 108, over the
        // 107 a Unix socket address holds.
        let long = try LongPath(socketPathLength: 100)
        defer { long.cleanUp() }
        let (directory, path, socketPath) = (long.directory, long.path, long.socketPath)
        try #require(socketPath.utf8.count == 100 && (directory + "/rapace-bind-XXXXXX/s").utf8.count > 107)
        let notify = inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC))
        try #require(notify >= 0)
        defer { close(notify) }
        try #require(inotify_add_watch(notify, directory, UInt32(IN_CREATE | IN_MOVED_TO)) >= 0)
        try await withReactor("longpath-host") { hostReactor in
            try await withReactor("longpath-plugin") { pluginReactor in
                let listener = try await startShmHost(on: hostReactor, path: path, config: Self.config)
                var info = stat()
                try #require(lstat(socketPath, &info) == 0)
                #expect(info.st_mode & S_IFMT == S_IFSOCK)
                #expect(info.st_mode & 0o7777 == 0o600, "mode \(String(info.st_mode & 0o7777, radix: 8))")
                let events = Self.readEvents(notify)
                #expect(events.filter { $0.name == "segment.sock" }.map(\.mask) == [UInt32(IN_MOVED_TO)], "renamed into place: \(events)")
                // Only the segment and its socket: the private directory is gone.
                let entries = try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
                #expect(entries == ["segment", "segment.sock"])
                let session = try await withTimeout(.seconds(20), "connecting a plugin on a long path") {
                    try await Session.connect(shm: path, reactor: pluginReactor, timeout: .seconds(10))
                }
                let echo = EchoClient(session)
                #expect(try await echo.echo("through a 100-byte socket path") == "through a 100-byte socket path")
                await session.closeAndWait()
                await onLoop(hostReactor) { listener.value.close() }
            }
        }
        #expect(access(path, F_OK) != 0 && access(socketPath, F_OK) != 0)
    }

    @Test("a socket path too long for sun_path fails, naming its length and the limit, and leaves nothing behind")
    func tooLongSocketPath() async throws {
        let long = try LongPath(socketPathLength: 108)
        defer { long.cleanUp() }
        let (directory, path, socketPath) = (long.directory, long.path, long.socketPath)
        try await withReactor("longpath-host") { hostReactor in
            do {
                let listener = try await hostReactor.run {
                    SendableBox(try ShmListener(reactor: hostReactor, path: path, config: Self.config) { _ in })
                }
                await onLoop(hostReactor) { listener.value.close() }
                Issue.record("listened on a socket path of 108 bytes")
            } catch let error as TransportError {
                #expect(error.message == "Unix socket path of 108 bytes exceeds the limit of 107: \(socketPath)")
            }
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory).isEmpty)
    }

    /// The events queued on a non-blocking inotify descriptor: mask and name.
    private static func readEvents(_ notify: Int32) -> [(mask: UInt32, name: String)] {
        var events: [(mask: UInt32, name: String)] = []
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let count = buffer.withUnsafeMutableBytes { read(notify, $0.baseAddress, $0.count) }
            guard count > 0 else { return events }
            var offset = 0
            // struct inotify_event: wd i32, mask u32, cookie u32, len u32, then len bytes of name.
            while offset + 16 <= count {
                let (mask, length) = buffer.withUnsafeBytes {
                    ($0.loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self), Int($0.loadUnaligned(fromByteOffset: offset + 12, as: UInt32.self)))
                }
                let name = buffer[(offset + 16)..<(offset + 16 + length)].prefix { $0 != 0 }
                events.append((mask, String(decoding: name, as: UTF8.self)))
                offset += 16 + length
            }
        }
    }
}

/// How many connections a listener handed over.
private final class ConnectionCount: Sendable {
    let value = Mutex(0)
}
