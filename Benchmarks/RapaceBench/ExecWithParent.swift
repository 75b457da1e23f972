import ArgumentParser
import CRapaceShim

#if canImport(Glibc)
import Glibc
#endif

/// Hidden trampoline: arranges for SIGTERM when the bench dies (even by SIGKILL or a
/// crash), then `execv`s the given server. `rapace-echo` has no such option itself.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that spawned the process exits, so the
/// bench spawns from a thread that outlives its children (see
/// ``ChildProcess/spawn(on:_:_:name:)``).
struct ExecWithParent: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec-with-parent",
        abstract: "Runs a command that gets SIGTERM when rapace-bench dies (used by `stream`).",
        shouldDisplay: false)

    @Option(name: .long, help: "The process id of the bench; exits at once if it is already gone.")
    var parent: Int32

    @Argument(parsing: .captureForPassthrough, help: "The executable (absolute path) and its arguments.")
    var command: [String] = []

    func run() throws {
        var command = self.command
        if command.first == "--" { command.removeFirst() }
        guard let executable = command.first else { throw ValidationError("missing the command to run") }
        guard rapace_set_parent_death_signal(SIGTERM) == 0 else { throw BenchError.system("prctl(PR_SET_PDEATHSIG)") }
        // The bench may have died before the prctl: then we were re-parented already.
        guard getppid() == parent else { throw BenchError("exec-with-parent: rapace-bench (pid \(parent)) is gone") }
        var argv: [UnsafeMutablePointer<CChar>?] = command.map { strdup($0) }
        argv.append(nil)
        _ = argv.withUnsafeMutableBufferPointer { buffer -> Int32 in
            guard let base = buffer.baseAddress else { return -1 }
            return execv(executable, base)
        }
        throw BenchError.system("execv \(executable)")
    }
}
