#if canImport(Glibc)
import Glibc
#endif

/// Pins threads to CPUs with `sched_setaffinity`.
///
/// Swift's Glibc module does not import `sched_setaffinity` (it sits behind `_GNU_SOURCE`)
/// and CRapaceShim has no wrapper yet, so the libc symbol is looked up with `dlsym`.
/// The kernel's CPU mask is an array of `unsigned long`; on little-endian machines bit `n`
/// of the mask is bit `n % 8` of byte `n / 8`.
enum CPUAffinity {
    private typealias SetAffinity = @convention(c) (pid_t, Int, UnsafeRawPointer) -> Int32

    private static func setAffinity() throws -> SetAffinity {
        guard let handle = dlopen(nil, RTLD_NOW), let symbol = dlsym(handle, "sched_setaffinity") else {
            throw BenchError("sched_setaffinity not found in libc")
        }
        return unsafeBitCast(symbol, to: SetAffinity.self)
    }

    /// Pins thread `tid` (0 = the calling thread) to `cpu`. Threads it creates inherit it.
    static func pin(thread tid: pid_t = 0, to cpu: Int) throws {
        let code = try setAffinity(of: tid, to: cpu)
        guard code == 0 else { throw failure(tid, cpu, code) }
    }

    private static func failure(_ tid: pid_t, _ cpu: Int, _ code: Int32) -> BenchError {
        if code == EINVAL {
            return BenchError("cannot pin to CPU \(cpu): it is not online or not allowed for this process (\(sysconf(Int32(_SC_NPROCESSORS_ONLN))) CPUs online)")
        }
        return BenchError.system("sched_setaffinity(thread \(tid), CPU \(cpu))", errno: code)
    }

    /// 0 on success, else the errno of `sched_setaffinity`.
    private static func setAffinity(of tid: pid_t, to cpu: Int) throws -> Int32 {
        var mask = cpu_set_t()
        let bits = MemoryLayout<cpu_set_t>.size * 8
        guard cpu >= 0, cpu < bits else { throw BenchError("CPU \(cpu) is outside 0..<\(bits)") }
        withUnsafeMutableBytes(of: &mask) { $0[cpu / 8] |= UInt8(1) << UInt8(cpu % 8) }
        let function = try setAffinity()
        return withUnsafeBytes(of: &mask) { raw -> Int32 in
            guard let base = raw.baseAddress else { return EINVAL }
            return function(tid, raw.count, base) == 0 ? 0 : errno
        }
    }

    /// Pins every thread of this process to `cpu` (threads created later inherit it from
    /// their creator).
    static func pinProcess(to cpu: Int) throws {
        guard let directory = opendir("/proc/self/task") else { throw BenchError.system("opendir(/proc/self/task)") }
        defer { closedir(directory) }
        var pinned = 0
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
            }
            guard let tid = pid_t(name) else { continue }  // "." and ".."
            switch try setAffinity(of: tid, to: cpu) {
            case 0: pinned += 1
            case ESRCH: continue  // the thread exited meanwhile
            case let code: throw failure(tid, cpu, code)
            }
        }
        guard pinned > 0 else { throw BenchError("no thread of this process could be pinned to CPU \(cpu)") }
    }
}

/// Where the bench's threads and its servers run.
enum Placement: CustomStringConvertible {
    /// No pinning: the scheduler places every thread.
    case floating
    /// The bench's threads on `client`, the server processes on `server` (may be equal).
    case pinned(client: Int, server: Int)

    /// Parses `none`, `N` (everything on CPU N) or `C,S` (bench on C, servers on S).
    init(parsing text: String) throws {
        if text == "none" {
            self = .floating
            return
        }
        let parts = text.split(separator: ",", omittingEmptySubsequences: false)
        guard (1...2).contains(parts.count), let client = Int(parts[0]), let server = Int(parts[parts.count - 1]), client >= 0, server >= 0 else {
            throw BenchError("--cpus takes none, N or CLIENT,SERVER (CPU numbers), got \"\(text)\"")
        }
        self = .pinned(client: client, server: server)
    }

    var serverCPU: Int? {
        if case .pinned(_, let server) = self { return server }
        return nil
    }

    var description: String {
        switch self {
        case .floating: "floating (no pinning; expect bimodal results from thread placement)"
        case .pinned(let client, let server) where client == server: "everything pinned to CPU \(client)"
        case .pinned(let client, let server): "bench threads pinned to CPU \(client), servers to CPU \(server)"
        }
    }
}
