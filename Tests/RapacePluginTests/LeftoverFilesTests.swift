import EchoService
import Foundation
import Logging
import Rapace
@testable import RapacePlugin
import RapaceTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The names `PluginProcess` gives its files, and which names the sweep of a dead host's
/// files takes for them (`PluginFiles.hostPID(ofFileName:)`): exactly those, nothing else.
@Suite(.sharesProcess) struct PluginFileNameTests {
    @Test func aSegmentNameCarriesTheHostPID() {
        let name = PluginFiles.segmentName(hostPID: 4242, name: "echo", generation: 3, random: 17)
        #expect(name == "rapace-plugin-4242-echo-3-17")
        #expect(PluginFiles.hostPID(ofFileName: name) == 4242)
        #expect(PluginFiles.hostPID(ofFileName: name + ".sock") == 4242)
        #expect(PluginFiles.hostPID(ofFileName: name + ".creating-4242") == 4242)
    }

    @Test(arguments: ["echo", "", "a-b-c", "x y/z.w", "ünïcödé-名前", String(repeating: "long", count: 20), "-", "1-2-3"])
    func everyNameAHostGivesIsRecognised(_ pluginName: String) {
        let name = PluginFiles.segmentName(hostPID: 7, name: pluginName, generation: 12, random: .max)
        #expect(PluginFiles.hostPID(ofFileName: name) == 7, "\(name)")
        #expect(PluginFiles.hostPID(ofFileName: name + ".sock") == 7, "\(name)")
    }

    @Test(arguments: [
        "rapace-plugin-12-echo-1",  // no random part
        "rapace-plugin-12-echo",
        "rapace-plugin-12",
        "rapace-plugin--echo-1-5",  // no pid
        "rapace-plugin-0-echo-1-5",  // pid 0
        "rapace-plugin-012-echo-1-5",  // leading zero
        "rapace-plugin-+12-echo-1-5",
        "rapace-plugin-99999999999-echo-1-5",  // beyond pid_t
        "rapace-plugin-12-echo-0-5",  // generation 0
        "rapace-plugin-12-echo-01-5",
        "rapace-plugin-12-echo-1-4294967296",  // beyond UInt32
        "rapace-plugin-12-echo-1-05",
        "rapace-plugin-12-echo-1-5x",
        "rapace-plugin-12-echo-1-5.tmp",  // another suffix
        "rapace-plugin-12-echo-1-5.sock.old",
        "rapace-plugin-12-echo-1-5.sock.creating-12",
        "rapace-plugin-12-echo-1-5.creating-",
        "rapace-plugin-12-echo-1-5.creating-0",
        "rapace-plugin-12-echo-1-5.",
        "rapace-plugin-12-ec.ho-1-5",  // a character a sanitized name never holds
        "rapace-plugin-12-ec ho-1-5",
        "rapace-plugin-12-\(String(repeating: "n", count: 41))-1-5",  // a name longer than 40
        "rapace-plugins-12-echo-1-5",
        "xrapace-plugin-12-echo-1-5",
        "rapace-bind-AbC123",
        "rapace-test-12-echo-1-5",
    ])
    func anyOtherNameIsNot(_ name: String) {
        #expect(PluginFiles.hostPID(ofFileName: name) == nil)
    }
}

// The sweep of the files of hosts that died without stop(), with the real example host and
// plugin. Part of PluginRuntimeTests: they look at /dev/shm and this process's children.
extension PluginRuntimeTests {
    /// `rapace-example-host --wait` killed with SIGKILL leaves its plugin's segment and
    /// socket in /dev/shm (its plugin dies with it); the next first launch of this process in
    /// /dev/shm removes them and logs them, and leaves alone the same names of this process
    /// and of a live child.
    @Test func theNextLaunchRemovesTheFilesOfAKilledHost() async throws {
        let host = try ChildProcess(exampleHost, ["--wait"])
        let sleeper = try ChildProcess("/bin/sleep", ["30"])
        let live = ["rapace-plugin-\(getpid())-fake-1-123", "rapace-plugin-\(getpid())-fake-1-123.sock", "rapace-plugin-\(sleeper.pid)-fake-1-123"]
        defer {
            host.terminate()
            sleeper.terminate()
            for name in leftoverPluginFiles(hostPID: host.pid) + live { unlink("/dev/shm/" + name) }
        }
        let pluginPID = try await examplePluginPID(of: host)
        let left = leftoverPluginFiles(hostPID: host.pid).sorted()
        try #require(left.count == 2 && left[1] == left[0] + ".sock", "\(left)")
        await killHostExpectingPluginGone(host, plugin: pluginPID)
        #expect(leftoverPluginFiles(hostPID: host.pid).sorted() == left, "the killed host's files are there until a launch sweeps them")
        for name in live { try createFile("/dev/shm/" + name) }

        let capture = LogCapture()
        try await withLeakCheckedReactor { reactor in
            // This process has launched plugins in /dev/shm before: sweep it again.
            PluginFiles.forgetSweepForTesting("/dev/shm")
            let plugin = try await PluginProcess.launch(
                PluginConfiguration(name: "sweeper", executable: examplePlugin, logger: capture.logger(label: "sweeper")), reactor: reactor)
            #expect(leftoverPluginFiles(hostPID: host.pid).isEmpty, "\(leftoverPluginFiles(hostPID: host.pid))")
            for name in live { #expect(access("/dev/shm/" + name, F_OK) == 0, "\(name) of a live process was removed") }
            let removals = capture.entries { $0.message.contains("files of rapace hosts that are gone") }
            #expect(removals.count == 1, "\(capture.lines)")
            let paths = removals.first?.metadata["paths"] ?? ""
            for name in left { #expect(paths.contains("/dev/shm/" + name), "\(paths)") }
            #expect(removals.first?.level == .info)
            #expect(try await EchoClient(plugin).add(1, 2) == 3)
            let pid = try #require(await plugin.currentPID())
            await plugin.stop()
            // Not this process's files, so that the leak check sees none.
            for name in live where name.hasPrefix("rapace-plugin-\(getpid())-") { unlink("/dev/shm/" + name) }
            return [pid]
        }
    }

    /// In a directory of its own: a launch removes exactly the files whose name is one a host
    /// gives, whose host pid no process has, and that are regular files or sockets of this
    /// user; the second launch in that directory sweeps nothing.
    @Test func aSweepRemovesOnlyTheFilesOfDeadHostsOnce() async throws {
        let scratch = try ScratchDirectory("sweep")
        defer { scratch.remove() }
        let directory = scratch.path
        let gone = try deadPID()
        let sleeper = try ChildProcess("/bin/sleep", ["30"])
        defer { sleeper.terminate() }

        let segment = "rapace-plugin-\(gone)-a-1-5"
        let removable = [segment, segment + ".sock", segment + ".creating-\(gone)", "rapace-plugin-\(gone)--2-7", "rapace-plugin-\(gone)-x-y_z-3-4294967295"]
        var kept = [
            "rapace-plugin-\(getpid())-mine-1-5", "rapace-plugin-\(getpid())-mine-1-5.sock", "rapace-plugin-\(sleeper.pid)-live-1-5",
            "rapace-plugin-1-init-1-5", segment + ".tmp", "rapace-plugin-\(gone)-a-1", "rapace-plugin-\(gone)-a-0-5", "xrapace-plugin-\(gone)-a-1-5",
        ]
        for name in removable where !name.hasSuffix(".sock") { try createFile(directory + "/" + name) }
        for name in kept { try createFile(directory + "/" + name) }
        // The socket is a socket; the kept ones of a dead host are not files of this user.
        try #require(mknod(directory + "/" + segment + ".sock", S_IFSOCK | 0o600, 0) == 0)
        let notFiles = ["rapace-plugin-\(gone)-dir-1-5", "rapace-plugin-\(gone)-link-1-5", "rapace-plugin-\(gone)-fifo-1-5"]
        try #require(mkdir(directory + "/" + notFiles[0], 0o700) == 0)
        try #require(symlink(directory + "/" + segment + ".tmp", directory + "/" + notFiles[1]) == 0)
        try #require(mkfifo(directory + "/" + notFiles[2], 0o600) == 0)
        kept += notFiles
        if getuid() == 0 {
            let foreign = "rapace-plugin-\(gone)-foreign-1-5"
            try createFile(directory + "/" + foreign)
            try #require(chown(directory + "/" + foreign, 65534, 65534) == 0)
            kept.append(foreign)
        }

        let capture = LogCapture()
        try await withLeakCheckedReactor { reactor in
            var configuration = PluginConfiguration(name: "sweeper", executable: examplePlugin, segmentDirectory: directory)
            configuration.logger = capture.logger(label: "sweeper")
            let first = try await PluginProcess.launch(configuration, reactor: reactor)
            let names = Set((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [])
            for name in removable { #expect(!names.contains(name), "\(name) was not removed") }
            for name in kept { #expect(names.contains(name), "\(name) was removed") }
            let removals = capture.entries { $0.message.contains("files of rapace hosts that are gone") }
            #expect(removals.map(\.message) == ["removed \(removable.count) files of rapace hosts that are gone"], "\(capture.lines)")
            #expect(removals.first?.metadata["directory"] == directory)
            let paths = removals.first?.metadata["paths"] ?? ""
            for name in removable { #expect(paths.contains("\"\(directory)/\(name)\""), "\(paths)") }
            for name in kept { #expect(!paths.contains("\"\(directory)/\(name)\""), "\(paths)") }

            // Once per process and directory: neither a restart nor another launch sweeps again.
            let later = "rapace-plugin-\(gone)-later-1-5"
            try createFile(directory + "/" + later)
            try await first.restart()
            var second = configuration
            second.name = "sweeper-2"
            let other = try await PluginProcess.launch(second, reactor: reactor)
            #expect(access(directory + "/" + later, F_OK) == 0, "a second launch swept again")
            #expect(capture.entries { $0.message.contains("files of rapace hosts that are gone") }.count == 1, "\(capture.lines)")
            var pids: [pid_t] = []
            for plugin in [first, other] {
                pids.append(try #require(await plugin.currentPID()))
                await plugin.stop()
            }
            return pids
        }
    }
}

/// The sweep's last word is the segment's lock, not the pid in the name: a host in another
/// pid namespace (a container sharing /dev/shm) has a pid that `kill(pid, 0)` does not find
/// here, and holds a shared `flock` on its segment while it lives.
@Suite(.sharesProcess) struct LockedSegmentSweepTests {
    /// Files named for a pid no process has: a segment and its socket whose segment is locked
    /// by a holder (this test, through its own descriptor) are kept; the same names unlocked
    /// are removed; once the lock is dropped the next sweep removes them too. A segment made
    /// by `ShmSegment.create` under such a name is kept while the segment lives.
    ///
    /// It owns the process: a child that another test spawns meanwhile gets a copy of every
    /// descriptor of this process, close-on-exec or not, and keeps it from the spawn's
    /// `clone` to its `exec` (`posix_spawn` copies the descriptor table). A copy of a locked
    /// descriptor holds its `flock`, so the sweep after the `close`s found the four files
    /// still held, in a parallel run on a loaded machine.
    @Test(.ownsProcess("the locks its descriptors hold are shared with any child spawned meanwhile, until that child's exec"))
    func aSegmentSomeoneHoldsLockedIsKept() throws {
        let scratch = try ScratchDirectory("sweep-lock")
        defer { scratch.remove() }
        let directory = scratch.path
        let dead = try deadPID()
        let locked = "rapace-plugin-\(dead)-locked-1-5"
        let building = "rapace-plugin-\(dead)-building-1-5.creating-\(dead)"
        let unlocked = "rapace-plugin-\(dead)-unlocked-1-5"
        for name in [locked, building, unlocked] { try createFile(directory + "/" + name) }
        for name in [locked, unlocked] { try #require(mknod(directory + "/" + name + ".sock", S_IFSOCK | 0o600, 0) == 0) }
        var holders: [Int32] = []
        defer { for fd in holders { close(fd) } }  // a failed check before the end leaks none
        for name in [locked, building] {
            let fd = open(directory + "/" + name, O_RDONLY | O_CLOEXEC)
            try #require(fd >= 0 && Glibc.flock(_:_:)(fd, LOCK_SH | LOCK_NB) == 0)
            holders.append(fd)
        }
        var host: ShmSegment? = try ShmSegment.create(
            path: directory + "/rapace-plugin-\(dead)-host-1-7", config: ShmConfig(ringCapacity: 16, slotSize: 4096, slotCount: 4))
        let heldNames = [locked, locked + ".sock", building, "rapace-plugin-\(dead)-host-1-7"]

        let quiet = Logger(label: "sweep", factory: { _ in SwiftLogNoOpLogHandler() })
        let first = try #require(PluginFiles.sweep(directory, logger: quiet))
        #expect(first.removed.sorted() == [unlocked, unlocked + ".sock"].map { directory + "/" + $0 }.sorted())
        #expect(first.held.sorted() == heldNames.map { directory + "/" + $0 }.sorted())
        #expect(first.failed.isEmpty)
        for name in heldNames { #expect(access(directory + "/" + name, F_OK) == 0, "\(name), locked, was removed") }
        // The plugin's side opens and maps the host's segment as before.
        let mapped = try ShmSegment.open(path: try #require(host).path, expecting: host?.config)
        #expect(mapped.config == host?.config)

        for fd in holders { close(fd) }
        holders = []
        host = nil  // unmapped: its lock goes with its descriptor
        let second = try #require(PluginFiles.sweep(directory, logger: quiet))
        #expect(second.removed.sorted() == heldNames.map { directory + "/" + $0 }.sorted(), "\(second.removed)")
        #expect(second.held.isEmpty)
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []).isEmpty)
    }
}

/// Creates an empty regular file at `path` (mode 0600); throws when it exists or cannot be made.
private func createFile(_ path: String) throws {
    Sys.close(try Sys.open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode: 0o600))
}

/// A directory of its own under /dev/shm (where plugin files live), removed with what is in
/// it (files, sockets, empty directories) by ``remove()``.
private struct ScratchDirectory {
    let path: String

    init(_ tag: String) throws {
        path = temporaryPath(in: "/dev/shm", tag)
        guard mkdir(path, 0o700) == 0 else { throw TestFailure("cannot create \(path): errno \(errno)") }
    }

    func remove() {
        for name in (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? [] where rmdir(path + "/" + name) != 0 {
            unlink(path + "/" + name)
        }
        rmdir(path)
    }
}

/// A pid no process has: that of a child that has exited and been reaped.
private func deadPID() throws -> pid_t {
    let dead = try ChildProcess("/bin/true", [])
    _ = try dead.wait(timeout: .seconds(5))
    try #require(processIsGone(dead.pid))
    return dead.pid
}
