#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif
import CRapaceShim

// Files, mappings and directories, for the shared-memory segment and its bootstrap socket.
// Every operation names the path it worked on, so a `SystemError` reads on its own
// ("open(/dev/shm/x) failed: No such file or directory (errno 2)").
extension Sys {
    // MARK: files

    /// `open(2)`; `O_CLOEXEC` is always added. EINTR (possible while opening a FIFO or on
    /// some file systems) is retried.
    package static func open(_ path: String, _ flags: Int32, mode: mode_t = 0) throws(SystemError) -> Int32 {
        try call("open(\(path))") { Glibc.open(path, flags | O_CLOEXEC, mode) }
    }

    /// `ftruncate(2)`: sets the size of the file open as `fd` (named `path` in errors).
    static func truncate(_ fd: Int32, to size: Int, path: String) throws(SystemError) {
        _ = try call("ftruncate(\(path), \(size))") { ftruncate(fd, off_t(size)) }
    }

    /// `fstat(2)` of the file open as `fd` (named `path` in errors).
    package static func fileStatus(_ fd: Int32, path: String) throws(SystemError) -> stat {
        var info = stat()
        _ = try call("fstat(\(path))") { fstat(fd, &info) }
        return info
    }

    /// `lstat(2)`: the status of `path` itself (a symbolic link is not followed). A missing
    /// path throws with `Errno.noSuchFile`.
    package static func linkStatus(_ path: String) throws(SystemError) -> stat {
        var info = stat()
        _ = try call("lstat(\(path))") { lstat(path, &info) }
        return info
    }

    /// `pread(2)` into `buffer` from `offset` of the file open as `fd` (named `path` in
    /// errors): the number of bytes read, short only at the end of the file.
    static func read(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: Int, path: String) throws(SystemError) -> Int {
        var total = 0
        while total < buffer.count {
            let from = total
            let n = try call("pread(\(path))") { pread(fd, buffer.baseAddress! + from, buffer.count - from, off_t(offset + from)) }
            if n == 0 { break }
            total += n
        }
        return total
    }

    /// `unlink(2)` of `path`, for a caller that needs to know whether it removed it (unlike
    /// ``unlink(_:)``): throws, with `Errno.noSuchFile` when `path` was gone already.
    package static func removeFile(_ path: String) throws(SystemError) {
        _ = try call("unlink(\(path))") { Glibc.unlink(path) }
    }

    /// `flock(2)` without blocking (`LOCK_NB`): takes a shared (`LOCK_SH`) or exclusive
    /// (`LOCK_EX`) advisory lock on the file open as `fd` (named `path` in errors), or
    /// converts the lock this open file description holds. True when it is held now; false
    /// when another open file description holds a lock that conflicts (`EWOULDBLOCK`).
    /// `EINTR` is retried. The lock belongs to the open file description: it lasts until the
    /// last descriptor of it closes, whatever pid namespace the holders are in (the segment
    /// host's lock, Docs/shm.md).
    package static func tryLock(_ fd: Int32, exclusive: Bool, path: String) throws(SystemError) -> Bool {
        let operation = (exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB
        // Named with its argument labels: plain `flock` is the `struct flock` of fcntl(2).
        switch try retrying("flock(\(path), \(exclusive ? "LOCK_EX" : "LOCK_SH") | LOCK_NB)", { Glibc.flock(_:_:)(fd, operation) }) {
        case .done: return true
        case .wouldBlock: return false
        }
    }

    /// `rename(2)`: atomically replaces `destination` (if any) with `source`.
    static func rename(_ source: String, to destination: String) throws(SystemError) {
        _ = try call("rename(\(source), \(destination))") { Glibc.rename(source, destination) }
    }


    // MARK: relative to a directory descriptor

    /// Opens the directory `path` as an `O_PATH` handle (close-on-exec; a symbolic link in
    /// the last component is not followed): it grants no access of its own, but serves the
    /// `*at` calls below and names the directory as `/proc/self/fd/N`.
    static func openDirectoryHandle(_ path: String) throws(SystemError) -> Int32 {
        try call("open(\(path), O_PATH | O_DIRECTORY)") { rapace_open_directory_path(path) }
    }

    /// `fchmodat(2)` of `name` in the directory open as `directory` (named `directoryPath`
    /// in errors).
    static func chmod(_ name: String, in directory: Int32, _ mode: mode_t, directoryPath: String) throws(SystemError) {
        _ = try call("fchmodat(\(directoryPath)/\(name), \(String(mode, radix: 8)))") { fchmodat(directory, name, mode, 0) }
    }

    /// `renameat(2)`: atomically replaces `destination` (if any) with `name` in the directory
    /// open as `directory` (named `directoryPath` in errors).
    static func rename(_ name: String, in directory: Int32, to destination: String, directoryPath: String) throws(SystemError) {
        _ = try call("renameat(\(directoryPath)/\(name), \(destination))") { renameat(directory, name, AT_FDCWD, destination) }
    }

    /// `unlinkat(2)` of `name` in the directory open as `directory`; errors are ignored (for
    /// clean-up).
    static func unlink(_ name: String, in directory: Int32) {
        _ = unlinkat(directory, name, 0)
    }

    // MARK: directories

    /// `mkdtemp(3)`: creates a new directory `<prefix>XXXXXX` (mode 0700, the X's replaced
    /// by random characters) and returns its path.
    static func makeTemporaryDirectory(prefix: String) throws(SystemError) -> String {
        var template = Array((prefix + "XXXXXX").utf8CString)
        // Not retried on EINTR: mkdir(2) does not return it, and a failed call may have
        // rewritten the template's X's.
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        guard made != nil else {
            let code = Glibc.errno  // before the message is built
            throw SystemError("mkdtemp(\(prefix)XXXXXX)", errno: Errno(rawValue: code))
        }
        return String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The names in the directory `path` (not `.` and `..`; names that are not valid UTF-8
    /// are skipped), in the order the file system lists them, at most `limit` of them: the
    /// names, and whether they are all there were. Opening the directory throws (`open`
    /// with `O_DIRECTORY`, then `fdopendir`, which reads `errno` right after its one call);
    /// reading it does not: `readdir(3)` fails only for a bad stream, and its end and an
    /// error both end the list.
    package static func directoryEntries(_ path: String, limit: Int) throws(SystemError) -> (names: [String], complete: Bool) {
        let fd = try open(path, O_RDONLY | O_DIRECTORY)
        guard let stream = fdopendir(fd) else {
            let code = Glibc.errno  // before the message is built
            close(fd)
            throw SystemError("fdopendir(\(path))", errno: Errno(rawValue: code))
        }
        defer { closedir(stream) }  // closes `fd`
        var names: [String] = []
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(validatingCString: raw.baseAddress!.assumingMemoryBound(to: CChar.self))
            }
            guard let name, name != ".", name != ".." else { continue }
            guard names.count < limit else { return (names, false) }
            names.append(name)
        }
        return (names, true)
    }

    /// `rmdir(2)`; errors are ignored (for clean-up).
    static func removeDirectory(_ path: String) {
        _ = Glibc.rmdir(path)
    }

    // MARK: shared mappings

    /// Maps `size` bytes of the file open as `fd` (named `path` in errors) read-write and
    /// `MAP_SHARED`.
    static func mapShared(_ fd: Int32, size: Int, path: String) throws(SystemError) -> UnsafeMutableRawPointer {
        let base = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let base, base != MAP_FAILED else {
            let code = Glibc.errno  // before the message is built
            throw SystemError("mmap(\(path), \(size))", errno: Errno(rawValue: code))
        }
        return base
    }

    /// `munmap(2)`. It fails only for arguments no mapping returned (a bug), so the result is
    /// checked in debug builds only.
    static func unmap(_ base: UnsafeMutableRawPointer, size: Int) {
        let result = munmap(base, size)
        assert(result == 0, "munmap of a mapping of \(size) bytes failed")
    }
}
