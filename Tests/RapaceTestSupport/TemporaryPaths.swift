import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// The directory holding the package's built products (next to the test bundle): the
/// executables the cross-process tests launch.
package var productsDirectory: String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let count = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    let path = count > 0 ? String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
    return (path as NSString).deletingLastPathComponent
}

/// A path no other test (and no other test process) uses:
/// `DIRECTORY/rapace-test-PID-TAG-RANDOM` followed by `suffix`. Nothing is created; the
/// caller removes whatever it creates there.
package func temporaryPath(in directory: String = "/tmp", _ tag: String, suffix: String = "") -> String {
    "\(directory)/rapace-test-\(getpid())-\(tag)-\(UInt32.random(in: 0...UInt32.max))\(suffix)"
}

/// A unique path for a Unix socket in /tmp, removed by the caller.
package func temporarySocketPath(_ tag: String) -> String {
    temporaryPath(tag, suffix: ".sock")
}
