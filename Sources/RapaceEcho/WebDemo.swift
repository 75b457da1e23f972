import Foundation
import Rapace

/// The browser demo `rapace-echo serve --ws` serves next to its WebSocket: `GET /` is the
/// page (`index.html`), `GET /rapace.js` the browser client, both read from `tools/web`.
enum WebDemo {
    /// `tools/web` of the source tree this binary was built from.
    static var defaultRoot: String {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("tools/web").path
    }

    /// Loads the demo files from `root` (fails when they are missing).
    static func files(root: String) throws -> [String: WebSocketHTTPResponse] {
        func load(_ name: String, _ type: String) throws -> WebSocketHTTPResponse {
            let path = (root as NSString).appendingPathComponent(name)
            guard let data = FileManager.default.contents(atPath: path) else {
                throw DemoError(description: "cannot read \(path) (pass --web-root DIR holding index.html and rapace.js)")
            }
            return WebSocketHTTPResponse(contentType: type, body: [UInt8](data))
        }
        return [
            "/": try load("index.html", "text/html; charset=utf-8"),
            "/rapace.js": try load("rapace.js", "text/javascript; charset=utf-8"),
        ]
    }

    /// The listener configuration: the demo files on GET, the query string ignored. The
    /// page opened with `?report` sends its results to `GET /report?TEXT`, printed to
    /// stdout as `browser report: LINE` lines (used by the browser test).
    static func configuration(root: String) throws -> WebSocketListener.Configuration {
        let files = try files(root: root)
        var configuration = WebSocketListener.Configuration()
        configuration.httpHandler = { path in
            if path.hasPrefix("/report?") {
                let text = String(path.dropFirst("/report?".count)).removingPercentEncoding ?? "(undecodable report)"
                for line in text.split(separator: "\n") { print("browser report: \(line)") }
                fflush(nil)
                return WebSocketHTTPResponse(text: "reported\n")
            }
            let bare = path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? path
            return files[bare == "/index.html" ? "/" : bare]
        }
        return configuration
    }

    struct DemoError: Error, CustomStringConvertible {
        var description: String
    }
}
