#if canImport(Glibc)
import Glibc
#endif
import Logging
import Rapace
import Synchronization

/// The files a ``PluginProcess`` host makes in its segment directory for each plugin
/// process, how they are named, and the sweep that removes those of hosts that died without
/// ``PluginProcess/stop()`` (Docs/hosting-plugins.md, "Files of a host that died").
///
/// A segment is `rapace-plugin-<host pid>-<name>-<generation>-<random>`; beside it are its
/// bootstrap socket, `SEGMENT.sock`, and while the segment is being built
/// `SEGMENT.creating-<pid>` (Docs/shm.md, "Bootstrap").
enum PluginFiles {
    static let prefix = "rapace-plugin-"
    /// At most this many characters of the plugin's name go into the file name.
    static let maxNameCharacters = 40
    /// A sweep reads at most this many entries of the directory.
    static let maxEntriesScanned = 16_384

    /// The file name of the segment for generation `generation` of plugin `name` of the host
    /// `hostPID` (`random` tells it from an earlier run's).
    static func segmentName(hostPID: pid_t, name: String, generation: Int, random: UInt32) -> String {
        "\(prefix)\(hostPID)-\(sanitized(name))-\(generation)-\(random)"
    }

    /// `name` as it goes into a file name: letters, digits, `-` and `_` kept, any other
    /// character replaced by `_`, at most ``maxNameCharacters`` characters.
    static func sanitized(_ name: String) -> String {
        String(name.map { isNameCharacter($0) ? $0 : "_" }.prefix(maxNameCharacters))
    }

    private static func isNameCharacter(_ character: Character) -> Bool {
        character.isLetter || character.isNumber || character == "-" || character == "_"
    }

    /// The host pid in `fileName` if it is exactly a name a host gives: a segment
    /// (``segmentName(hostPID:name:generation:random:)``), its `.sock`, or a segment being
    /// built (`.creating-<pid>`); nil for any other name.
    static func hostPID(ofFileName fileName: String) -> pid_t? {
        guard fileName.hasPrefix(prefix) else { return nil }
        var segment = fileName.dropFirst(prefix.count)
        // A sanitized name and the numbers hold no '.': the first one begins the suffix.
        if let dot = segment.firstIndex(of: ".") {
            let suffix = segment[dot...]
            let building = ShmSegment.buildingSuffix
            guard
                suffix == ShmBootstrap.socketSuffix
                    || (suffix.hasPrefix(building) && number(suffix.dropFirst(building.count), as: pid_t.self).map({ $0 > 0 }) == true)
            else { return nil }
            segment = segment[..<dot]
        }
        // <pid>-<name>-<generation>-<random>, where the name may hold '-' or be empty.
        let parts = segment.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count >= 4, let pid = number(parts[0], as: pid_t.self), pid > 0,
            let generation = number(parts[parts.count - 2], as: Int.self), generation > 0,
            number(parts[parts.count - 1], as: UInt32.self) != nil
        else { return nil }
        let name = parts[1..<(parts.count - 2)].joined(separator: "-")
        guard name.count <= maxNameCharacters, name.allSatisfy(isNameCharacter) else { return nil }
        return pid
    }

    /// Whether `fileName` is a bootstrap socket's (`SEGMENT.sock`).
    private static func isSocket(_ fileName: String) -> Bool {
        fileName.hasSuffix(ShmBootstrap.socketSuffix)
    }

    /// `text` as a number written the way the host writes it: ASCII digits, no sign, no
    /// leading zero (but "0"), within `T`'s range.
    private static func number<T: FixedWidthInteger>(_ text: Substring, as: T.Type) -> T? {
        guard !text.isEmpty, text.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
            text == "0" || text.utf8.first != UInt8(ascii: "0")
        else { return nil }
        return T(text)
    }

    // MARK: Sweeping

    /// Directories this process has swept (or is sweeping).
    private static let swept = Mutex<Set<String>>([])

    /// ``sweep(_:logger:)`` of `directory`, once per process: nothing if this process has
    /// swept it already (it will again after a failure to read it).
    static func sweepOnce(_ directory: String, logger: Logger) {
        guard swept.withLock({ $0.insert(directory).inserted }) else { return }
        if sweep(directory, logger: logger) == nil { _ = swept.withLock { $0.remove(directory) } }
    }

    /// Lets the next ``sweepOnce(_:logger:)`` of `directory` sweep it again (for tests: the
    /// test process launches plugins in /dev/shm long before a test looks at a sweep there).
    static func forgetSweepForTesting(_ directory: String) {
        _ = swept.withLock { $0.remove(directory) }
    }

    /// What one sweep did.
    struct Sweep {
        /// The files removed.
        var removed: [String] = []
        /// The files that were to go but could not be removed, and why.
        var failed: [(path: String, error: SystemError)] = []
        /// The files of a host pid that no process has here but whose segment a host holds
        /// locked (a host in another pid namespace): kept.
        var held: [String] = []
        /// Whether every entry of the directory was looked at (at most ``maxEntriesScanned``
        /// are).
        var complete = true
    }

    /// Removes the files of hosts that are gone from `directory` (its first
    /// ``maxEntriesScanned`` entries) and logs them at `info`, all in one entry. A file goes
    /// only when all of these hold:
    ///
    /// - its name is exactly one a host gives (``hostPID(ofFileName:)``);
    /// - the host pid in it is not this process's, and no process has it
    ///   (``Sys/processExists(_:)``: `kill(pid, 0)` fails `ESRCH`; asked once per pid) — a
    ///   cheap first filter, which a host in another pid namespace passes while it lives;
    /// - no host holds its segment: this sweep takes an exclusive `flock` (`LOCK_NB`) on the
    ///   segment file — the file itself, or for `SEGMENT.sock` the file `SEGMENT` (a socket
    ///   whose segment is gone goes too) — which fails while a host holds its shared one
    ///   (``ShmSegment/create(path:config:)``; Docs/shm.md, "The host's lock"); the lock is
    ///   held until the files are removed;
    /// - it is a regular file or a socket (not followed through a symbolic link) owned by
    ///   this process's effective user; a segment is the regular file that was locked.
    ///
    /// A file someone else removes meanwhile (another host sweeping) is no error. Nil when
    /// the directory cannot be read.
    @discardableResult
    static func sweep(_ directory: String, logger: Logger) -> Sweep? {
        let listing: (names: [String], complete: Bool)
        do throws(SystemError) { listing = try Sys.directoryEntries(directory, limit: maxEntriesScanned) } catch {
            logger.debug("cannot look for files of rapace hosts that are gone", metadata: ["directory": "\(directory)", "error": "\(error)"])
            return nil
        }
        var sweep = Sweep(complete: listing.complete)
        let me = Sys.processID
        var exists: [pid_t: Bool] = [:]
        // The candidates by the segment file whose lock decides for them: a segment (or one
        // being built) for itself, a socket for its segment.
        var bySegment: [String: [String]] = [:]
        for name in listing.names {
            guard let host = hostPID(ofFileName: name), host != me else { continue }
            let alive = exists[host] ?? Sys.processExists(host)
            exists[host] = alive
            if alive { continue }
            let segment = isSocket(name) ? String(name.dropLast(ShmBootstrap.socketSuffix.count)) : name
            bySegment[segment, default: []].append(name)
        }
        let owner = Sys.effectiveUserID
        for (segment, names) in bySegment.sorted(by: { $0.key < $1.key }) {
            let lock = lockForRemoval(directory + "/" + segment)
            switch lock {
            case .held:
                sweep.held += names.sorted().map { directory + "/" + $0 }
                continue
            case .unusable:
                continue
            case .missing, .free:
                break
            }
            // The socket first, as a host removes them.
            for name in names.sorted(by: { isSocket($0) && !isSocket($1) }) {
                let path = directory + "/" + name
                guard let info = try? Sys.linkStatus(path), info.st_uid == owner else { continue }
                let type = info.st_mode & S_IFMT
                if name == segment {
                    // Only the file this sweep holds locked.
                    guard case .free(_, let locked) = lock, type == S_IFREG,
                        info.st_dev == locked.st_dev, info.st_ino == locked.st_ino
                    else { continue }
                } else {
                    guard type == S_IFREG || type == S_IFSOCK else { continue }
                }
                do throws(SystemError) {
                    try Sys.removeFile(path)
                    sweep.removed.append(path)
                } catch where error.errno == .noSuchFile {
                    // Removed meanwhile, by another host sweeping the same directory.
                } catch {
                    sweep.failed.append((path, error))
                }
            }
            if case .free(let fd, _) = lock { Sys.close(fd) }
        }
        if !sweep.removed.isEmpty {
            logger.info(
                "removed \(sweep.removed.count) files of rapace hosts that are gone",
                metadata: ["directory": "\(directory)", "paths": .array(sweep.removed.map { .string($0) })])
        }
        if !sweep.failed.isEmpty {
            logger.notice(
                "cannot remove \(sweep.failed.count) files of rapace hosts that are gone",
                metadata: ["directory": "\(directory)", "errors": .array(sweep.failed.map { .string("\($0.error)") })])
        }
        if !sweep.held.isEmpty {
            logger.debug(
                "kept \(sweep.held.count) files of rapace hosts whose pid is not seen here but that hold their segment locked (another pid namespace)",
                metadata: ["directory": "\(directory)", "paths": .array(sweep.held.map { .string($0) })])
        }
        if !sweep.complete {
            logger.debug(
                "looked for files of rapace hosts that are gone in the first \(maxEntriesScanned) entries only",
                metadata: ["directory": "\(directory)"])
        }
        return sweep
    }

    /// What decides whether the files of one segment of a dead-looking host can go.
    enum SegmentLock {
        /// No file at the segment's path: its socket can go.
        case missing
        /// A host holds the segment's lock: it lives (in another pid namespace), keep its
        /// files.
        case held
        /// The segment's path is not a regular file, cannot be opened, or changed while it
        /// was opened: keep the files.
        case unusable
        /// This sweep holds the exclusive lock of the segment, the regular file `status`,
        /// through `fd` (to close once its files are removed): no host holds it.
        case free(fd: Int32, status: stat)
    }

    /// Takes the exclusive `flock` of the segment file `path` if no host holds its shared
    /// one: opened read-only, without following a symbolic link and without blocking (a FIFO
    /// put there meanwhile), after `lstat` says it is a regular file, and checked to be the
    /// file `lstat` saw.
    static func lockForRemoval(_ path: String) -> SegmentLock {
        let before: stat
        do throws(SystemError) { before = try Sys.linkStatus(path) } catch where error.errno == .noSuchFile {
            return .missing
        } catch {
            return .unusable
        }
        guard before.st_mode & S_IFMT == S_IFREG else { return .unusable }
        let fd: Int32
        do throws(SystemError) { fd = try Sys.open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK) } catch where error.errno == .noSuchFile {
            return .missing
        } catch {
            return .unusable
        }
        let lock: SegmentLock
        do throws(SystemError) {
            let status = try Sys.fileStatus(fd, path: path)
            if status.st_dev != before.st_dev || status.st_ino != before.st_ino {
                lock = .unusable
            } else if try Sys.tryLock(fd, exclusive: true, path: path) {
                return .free(fd: fd, status: status)
            } else {
                lock = .held
            }
        } catch {
            lock = .unusable
        }
        Sys.close(fd)
        return lock
    }
}
