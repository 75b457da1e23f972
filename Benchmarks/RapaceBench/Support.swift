import CRapaceShim

#if canImport(Glibc)
import Glibc
#endif

/// An error of the bench itself (setup, child processes, baselines), with a message meant
/// for the person running it.
struct BenchError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }

    /// An error for a failed system call, with `errno`'s text.
    static func system(_ what: String, errno code: Int32 = errno) -> BenchError {
        BenchError("\(what): \(String(cString: strerror(code))) (errno \(code))")
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock every sample is taken with.
@inline(__always)
func monotonicNanoseconds() -> UInt64 { rapace_monotonic_ns() }

/// Writes `text` to standard error (unbuffered).
func printError(_ text: String) {
    var bytes = Array(text.utf8)
    if bytes.last != UInt8(ascii: "\n") { bytes.append(UInt8(ascii: "\n")) }
    _ = bytes.withUnsafeBytes { write(2, $0.baseAddress, $0.count) }
}

/// Prints to standard output and flushes, so progress shows when stdout is a pipe.
func printFlushed(_ text: String) {
    print(text)
    fflush(nil)
}

/// Formatting without Foundation.
enum Format {
    /// `value` with exactly `digits` decimals (half away from zero).
    static func fixed(_ value: Double, digits: Int = 2) -> String {
        guard value.isFinite else { return value.isNaN ? "nan" : (value < 0 ? "-inf" : "inf") }
        var scale = 1.0
        for _ in 0..<digits { scale *= 10 }
        let negative = value < 0
        let scaled = (abs(value) * scale).rounded()
        guard scaled < 9.0e18 else { return String(value) }
        let whole = UInt64(scaled)
        let scaleInt = UInt64(scale)
        let integer = whole / scaleInt
        var text = (negative && whole != 0 ? "-" : "") + String(integer)
        if digits > 0 {
            let fraction = String(whole % scaleInt)
            text += "." + String(repeating: "0", count: digits - fraction.count) + fraction
        }
        return text
    }

    /// Nanoseconds as microseconds with two decimals.
    static func micros(_ nanoseconds: Double) -> String { fixed(nanoseconds / 1000, digits: 2) }

    /// `text` padded with spaces on the left to `width`.
    static func right(_ text: String, _ width: Int) -> String {
        text.count >= width ? text : String(repeating: " ", count: width - text.count) + text
    }

    /// `text` padded with spaces on the right to `width`.
    static func left(_ text: String, _ width: Int) -> String {
        text.count >= width ? text : text + String(repeating: " ", count: width - text.count)
    }
}

/// Paths of this process and of its sibling executables.
enum Executables {
    /// The absolute path of the running executable (`/proc/self/exe`).
    static func currentExecutable() throws -> String {
        let capacity = Int(PATH_MAX) + 1
        let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: capacity)
        defer { buffer.deallocate() }
        let length = readlink("/proc/self/exe", buffer, capacity - 1)
        guard length > 0 else { throw BenchError.system("readlink(/proc/self/exe)") }
        return String(decoding: UnsafeRawBufferPointer(start: buffer, count: length), as: UTF8.self)
    }
}

/// A private temporary directory for socket files, removed (with its files) by ``remove()``.
final class TemporaryDirectory {
    let path: String
    private var files: [String] = []
    private var removed = false

    init(prefix: String) throws {
        guard let template = strdup("/tmp/\(prefix).XXXXXX") else { throw BenchError.system("strdup") }
        defer { free(template) }
        guard mkdtemp(template) != nil else { throw BenchError.system("mkdtemp(/tmp/\(prefix).XXXXXX)") }
        path = String(cString: template)
        EmergencyCleanup.registerPath(path)
    }

    /// A path inside the directory; the file (if created) is removed with the directory.
    func file(_ name: String) -> String {
        let file = path + "/" + name
        files.append(file)
        EmergencyCleanup.registerPath(file)
        return file
    }

    /// Unlinks the files handed out (if they still exist) and the directory.
    func remove() {
        guard !removed else { return }
        removed = true
        for file in files { unlink(file) }
        if rmdir(path) != 0 && errno != ENOENT {
            printError("rapace-bench: warning: cannot remove \(path): \(String(cString: strerror(errno)))")
        }
    }

    deinit { remove() }
}

/// Last-resort cleanup when the bench is interrupted (SIGINT, SIGTERM, SIGHUP): kills the
/// child servers, reaps them, removes socket files and the temporary directory, exits.
///
/// Everything the handler touches is preallocated C memory, and it only makes
/// async-signal-safe calls (`kill`, `waitpid`, `unlink`, `rmdir`, `_exit`).
enum EmergencyCleanup {
    static let capacity = 16
    nonisolated(unsafe) private static let pids: UnsafeMutablePointer<pid_t> = {
        let pointer = UnsafeMutablePointer<pid_t>.allocate(capacity: capacity)
        pointer.initialize(repeating: 0, count: capacity)
        return pointer
    }()
    nonisolated(unsafe) private static let paths: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?> = {
        let pointer = UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>.allocate(capacity: capacity)
        pointer.initialize(repeating: nil, count: capacity)
        return pointer
    }()

    /// Installs the signal handlers (call once, early, on the main thread).
    static func install() {
        // Touch the storage so the handler never runs a lazy initializer.
        _ = pids
        _ = paths
        let handler: @convention(c) (Int32) -> Void = { signal in
            EmergencyCleanup.runFromSignalHandler(signal)
        }
        for signal in [SIGINT, SIGTERM, SIGHUP] { _ = Glibc.signal(signal, handler) }
    }

    /// Records a child to kill on interruption.
    static func registerChild(_ pid: pid_t) {
        for index in 0..<capacity where pids[index] == 0 {
            pids[index] = pid
            return
        }
    }

    /// Forgets a child once it has been reaped.
    static func unregisterChild(_ pid: pid_t) {
        for index in 0..<capacity where pids[index] == pid { pids[index] = 0 }
    }

    /// Records a file or directory to remove on interruption (removed in reverse order).
    static func registerPath(_ path: String) {
        for index in 0..<capacity where paths[index] == nil {
            paths[index] = strdup(path)
            return
        }
    }

    private static func runFromSignalHandler(_ signal: Int32) -> Never {
        for index in 0..<capacity where pids[index] > 0 { kill(pids[index], SIGKILL) }
        for index in 0..<capacity where pids[index] > 0 {
            var status: Int32 = 0
            _ = waitpid(pids[index], &status, 0)
        }
        var index = capacity - 1
        while index >= 0 {
            if let path = paths[index] {
                if unlink(path) != 0 { _ = rmdir(path) }
            }
            index -= 1
        }
        _exit(128 + signal)
    }
}
