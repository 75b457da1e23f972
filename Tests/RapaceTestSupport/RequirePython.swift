/// The Python the interop tests run their peers with: `python3` on `PATH`, else
/// `/usr/bin/python3`, whichever first runs `probe` (Python statements that raise when
/// something the test needs is missing: a module, a function of a newer Python).
///
/// Fails, never skips: throws `TestFailure` with `missing` (which says what to install)
/// when no candidate runs the probe.
package func requirePython(probe: String, missing: String) async throws -> String {
    for candidate in ["python3", "/usr/bin/python3"] {
        guard let child = try? ChildProcess("/usr/bin/env", [candidate, "-c", probe + "\nprint('ok')"]) else { continue }
        let line = (try? await child.nextLine(timeout: .seconds(20))) ?? ""
        _ = try? await child.runToExit(timeout: .seconds(20))
        if line == "ok" { return candidate }
    }
    throw TestFailure("\(missing) (tried python3 on PATH and /usr/bin/python3)")
}
