#if canImport(Glibc)
import Glibc
#endif

/// A log-log line chart as SVG (no dependencies): latency against payload size, one line
/// per series.
struct LatencyChart {
    struct Series {
        let name: String
        let color: String
        var points: [(size: Int, microseconds: Double)]
    }

    var title: String
    var series: [Series]

    func svg() -> String {
        let width = 860.0, height = 520.0
        let left = 80.0, right = 200.0, top = 50.0, bottom = 60.0
        let plotWidth = width - left - right, plotHeight = height - top - bottom
        let all = series.flatMap(\.points).filter { $0.microseconds > 0 }
        guard let minSize = all.map(\.size).min(), let maxSize = all.map(\.size).max(),
            let minY = all.map(\.microseconds).min(), let maxY = all.map(\.microseconds).max()
        else { return "<svg xmlns=\"http://www.w3.org/2000/svg\"/>" }
        let x0 = log2(Double(minSize)), x1 = max(log2(Double(maxSize)), x0 + 1)
        let y0 = floor(log10(minY)), y1 = max(ceil(log10(maxY)), y0 + 1)
        func x(_ size: Int) -> Double { left + (log2(Double(size)) - x0) / (x1 - x0) * plotWidth }
        func y(_ micros: Double) -> Double { top + plotHeight - (log10(micros) - y0) / (y1 - y0) * plotHeight }
        var out = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" font-family=\"sans-serif\" font-size=\"12\">\n"
        out += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
        out += "<text x=\"\(left)\" y=\"28\" font-size=\"16\">\(escape(title))</text>\n"
        // Grid and axes.
        var decade = y0
        while decade <= y1 {
            let yy = y(pow(10, decade))
            out += "<line x1=\"\(left)\" y1=\"\(yy)\" x2=\"\(left + plotWidth)\" y2=\"\(yy)\" stroke=\"#ddd\"/>\n"
            out += "<text x=\"\(left - 8)\" y=\"\(yy + 4)\" text-anchor=\"end\">\(Self.micros(pow(10, decade)))</text>\n"
            decade += 1
        }
        var exponent = Int(x0.rounded(.up))
        while Double(exponent) <= x1 {
            let size = 1 << exponent
            let xx = x(size)
            out += "<line x1=\"\(xx)\" y1=\"\(top)\" x2=\"\(xx)\" y2=\"\(top + plotHeight)\" stroke=\"#eee\"/>\n"
            if exponent % 2 == 0 {
                out += "<text x=\"\(xx)\" y=\"\(top + plotHeight + 18)\" text-anchor=\"middle\">\(Self.bytes(size))</text>\n"
            }
            exponent += 1
        }
        out += "<rect x=\"\(left)\" y=\"\(top)\" width=\"\(plotWidth)\" height=\"\(plotHeight)\" fill=\"none\" stroke=\"#333\"/>\n"
        out += "<text x=\"\(left + plotWidth / 2)\" y=\"\(height - 15)\" text-anchor=\"middle\">payload size</text>\n"
        out += "<text x=\"18\" y=\"\(top + plotHeight / 2)\" transform=\"rotate(-90 18 \(top + plotHeight / 2))\" text-anchor=\"middle\">p50 latency</text>\n"
        // Lines and legend.
        for (index, line) in series.enumerated() {
            let points = line.points.filter { $0.microseconds > 0 }.sorted { $0.size < $1.size }
            let path = points.map { "\(x($0.size)),\(y($0.microseconds))" }.joined(separator: " ")
            out += "<polyline fill=\"none\" stroke=\"\(line.color)\" stroke-width=\"2\" points=\"\(path)\"/>\n"
            for point in points {
                out += "<circle cx=\"\(x(point.size))\" cy=\"\(y(point.microseconds))\" r=\"3\" fill=\"\(line.color)\"/>\n"
            }
            let ly = top + 10 + Double(index) * 20
            out += "<line x1=\"\(left + plotWidth + 12)\" y1=\"\(ly)\" x2=\"\(left + plotWidth + 32)\" y2=\"\(ly)\" stroke=\"\(line.color)\" stroke-width=\"3\"/>\n"
            out += "<text x=\"\(left + plotWidth + 38)\" y=\"\(ly + 4)\">\(escape(line.name))</text>\n"
        }
        out += "</svg>\n"
        return out
    }

    private func escape(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
    }

    static func bytes(_ size: Int) -> String {
        if size >= 1 << 20 { return "\(size >> 20) MiB" }
        if size >= 1 << 10 { return "\(size >> 10) KiB" }
        return "\(size) B"
    }

    static func micros(_ value: Double) -> String {
        if value >= 1000 { return "\(Int(value / 1000)) ms" }
        if value >= 1 { return "\(Int(value)) µs" }
        return "\(Int((value * 1000).rounded())) ns"
    }
}

extension String {
    fileprivate func replacingOccurrences(of target: String, with replacement: String) -> String {
        var result = ""
        var rest = Substring(self)
        while let range = rest.range(of: target) {
            result += rest[..<range.lowerBound]
            result += replacement
            rest = rest[range.upperBound...]
        }
        return result + rest
    }
}

extension Substring {
    fileprivate func range(of target: String) -> Range<Substring.Index>? {
        guard !target.isEmpty else { return nil }
        var index = startIndex
        while index < endIndex {
            if self[index...].hasPrefix(target) { return index..<self.index(index, offsetBy: target.count) }
            index = self.index(after: index)
        }
        return nil
    }
}
