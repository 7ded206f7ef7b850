import Yams

/// A configuration error. `key` is the dotted path of the offending key.
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    public var key: String
    public var message: String
    public init(key: String, _ message: String) {
        self.key = key
        self.message = message
    }
    public var description: String { key.isEmpty ? "config: \(message)" : "config key '\(key)': \(message)" }
}

/// A YAML tree reduced to what configuration needs: mappings, lists and scalars.
public indirect enum ConfigNode: Sendable, Equatable {
    case map([(String, ConfigNode)])
    case list([ConfigNode])
    case scalar(String)
    case null

    public static func == (a: ConfigNode, b: ConfigNode) -> Bool {
        switch (a, b) {
        case (.map(let x), .map(let y)): return x.map(\.0) == y.map(\.0) && x.map(\.1) == y.map(\.1)
        case (.list(let x), .list(let y)): return x == y
        case (.scalar(let x), .scalar(let y)): return x == y
        case (.null, .null): return true
        default: return false
        }
    }

    /// Parse YAML text.
    public static func parse(yaml: String) throws(ConfigError) -> ConfigNode {
        let node: Node?
        do {
            node = try Yams.compose(yaml: yaml)
        } catch {
            throw ConfigError(key: "", "invalid YAML: \(error)")
        }
        guard let node else { return .map([]) }
        return try convert(node, path: "")
    }

    private static func convert(_ n: Node, path: String) throws(ConfigError) -> ConfigNode {
        switch n {
        case .scalar(let s):
            if s.style == .plain && (s.string == "~" || s.string == "null" || s.string.isEmpty) { return .null }
            return .scalar(s.string)
        case .sequence(let seq):
            var items: [ConfigNode] = []
            for (i, x) in seq.enumerated() { items.append(try convert(x, path: "\(path)[\(i)]")) }
            return .list(items)
        case .mapping(let m):
            var out: [(String, ConfigNode)] = []
            for (k, v) in m {
                guard case .scalar(let ks) = k else { throw ConfigError(key: path, "keys must be plain strings") }
                let p = path.isEmpty ? ks.string : "\(path).\(ks.string)"
                if out.contains(where: { $0.0 == ks.string }) { throw ConfigError(key: p, "duplicate key") }
                out.append((ks.string, try convert(v, path: p)))
            }
            return .map(out)
        case .alias:
            throw ConfigError(key: path, "YAML aliases are not supported")
        }
    }

    /// Set `value` at a dotted `path`, creating mappings on the way (for `--set key=value` flags).
    public mutating func set(path: [String], value: ConfigNode) throws(ConfigError) {
        guard let head = path.first else {
            self = value
            return
        }
        var entries: [(String, ConfigNode)]
        switch self {
        case .map(let m): entries = m
        case .null: entries = []
        default: throw ConfigError(key: head, "cannot set a key inside a non-mapping value")
        }
        var child = entries.first(where: { $0.0 == head })?.1 ?? .null
        try child.set(path: Array(path.dropFirst()), value: value)
        if let i = entries.firstIndex(where: { $0.0 == head }) {
            entries[i].1 = child
        } else {
            entries.append((head, child))
        }
        self = .map(entries)
    }
}

/// Reads one mapping, remembering which keys were read, so that unknown keys can be refused by name.
public struct ConfigReader {
    public let path: String
    private let entries: [(String, ConfigNode)]
    private var used: Set<String> = []

    public init(_ node: ConfigNode, path: String = "") throws(ConfigError) {
        self.path = path
        switch node {
        case .map(let m): entries = m
        case .null: entries = []
        default: throw ConfigError(key: path, "must be a mapping")
        }
    }

    public func key(_ k: String) -> String { path.isEmpty ? k : "\(path).\(k)" }

    public var keys: [String] { entries.map(\.0) }

    public mutating func node(_ k: String) -> ConfigNode? {
        used.insert(k)
        guard let v = entries.first(where: { $0.0 == k })?.1, v != .null else { return nil }
        return v
    }

    public mutating func string(_ k: String) throws(ConfigError) -> String? {
        guard let v = node(k) else { return nil }
        guard case .scalar(let s) = v else { throw ConfigError(key: key(k), "must be a string") }
        return s
    }

    public mutating func int(_ k: String, min: Int? = nil, max: Int? = nil) throws(ConfigError) -> Int? {
        guard let s = try string(k) else { return nil }
        var v: Int?
        if s.hasPrefix("0o") { v = Int(s.dropFirst(2), radix: 8) } else { v = Int(s) }
        guard let v else { throw ConfigError(key: key(k), "must be an integer, got '\(s)'") }
        if let min, v < min { throw ConfigError(key: key(k), "must be >= \(min), got \(v)") }
        if let max, v > max { throw ConfigError(key: key(k), "must be <= \(max), got \(v)") }
        return v
    }

    public mutating func double(_ k: String, min: Double? = nil, max: Double? = nil) throws(ConfigError) -> Double? {
        guard let s = try string(k) else { return nil }
        guard let v = Double(s), v.isFinite else { throw ConfigError(key: key(k), "must be a number, got '\(s)'") }
        if let min, v < min { throw ConfigError(key: key(k), "must be >= \(min), got \(v)") }
        if let max, v > max { throw ConfigError(key: key(k), "must be <= \(max), got \(v)") }
        return v
    }

    public mutating func bool(_ k: String) throws(ConfigError) -> Bool? {
        guard let s = try string(k) else { return nil }
        switch s.lowercased() {
        case "true", "yes", "on": return true
        case "false", "no", "off": return false
        default: throw ConfigError(key: key(k), "must be true or false, got '\(s)'")
        }
    }

    public mutating func intList(_ k: String) throws(ConfigError) -> [UInt32]? {
        guard let v = node(k) else { return nil }
        guard case .list(let items) = v else { throw ConfigError(key: key(k), "must be a list of integers") }
        var out: [UInt32] = []
        for item in items {
            guard case .scalar(let s) = item, let n = UInt32(s) else {
                throw ConfigError(key: key(k), "must be a list of non-negative integers")
            }
            out.append(n)
        }
        return out
    }

    public mutating func child(_ k: String) throws(ConfigError) -> ConfigReader {
        try ConfigReader(node(k) ?? .null, path: key(k))
    }

    /// Refuse every key that was not read.
    public func finish(notBuilt: [String: String] = [:]) throws(ConfigError) {
        for (k, _) in entries where !used.contains(k) {
            if let why = notBuilt[k] { throw ConfigError(key: key(k), "not supported yet: \(why)") }
            throw ConfigError(key: key(k), "unknown key")
        }
    }
}
