/// A reply from Redis.
public enum RedisValue: Sendable, Equatable, CustomStringConvertible {
    case status(String)
    case error(String)
    case integer(Int64)
    case string(String)
    case null
    case array([RedisValue])

    public var string: String? {
        switch self {
        case .status(let s), .string(let s): return s
        case .integer(let i): return String(i)
        default: return nil
        }
    }

    public var int: Int? {
        switch self {
        case .integer(let i): return Int(i)
        case .string(let s), .status(let s): return Int(s)
        default: return nil
        }
    }

    public var array: [RedisValue]? {
        if case .array(let a) = self { return a }
        return nil
    }

    public var description: String {
        switch self {
        case .status(let s): return s
        case .error(let e): return "(error) \(e)"
        case .integer(let i): return "(integer) \(i)"
        case .string(let s): return "\"\(s)\""
        case .null: return "(nil)"
        case .array(let a): return "[" + a.map(\.description).joined(separator: ", ") + "]"
        }
    }
}

/// Why a Redis call failed.
public enum RedisError: Error, Sendable, Equatable, CustomStringConvertible {
    /// Could not connect: it was not sent.
    case unreachable(String)
    /// It waited in the queue behind slower calls past its deadline: it was not sent (and never will be).
    case queuedTooLong(String)
    /// Sent, but no reply came in time, or the connection broke before it: it may have been executed.
    case timedOut(String)
    /// The server answered with an error reply.
    case server(String)
    /// Too many requests queued on the connection.
    case overloaded
    case invalidURL(String)
    /// The connection was closed by its owner.
    case closed
    /// A reply had an unexpected shape.
    case badReply(String)
    /// Redis holds another generation of this voucher than the caller knew, or none at all: it lost
    /// data or the voucher was created again (docs/accounting.md, "Redis that forgets").
    case generation(String)

    /// Whether the call was certainly not sent (nothing of it ran).
    public var wasNotSent: Bool {
        switch self {
        case .unreachable, .queuedTooLong: return true
        default: return false
        }
    }

    /// Whether the call may have been executed although no answer came back.
    public var outcomeUnknown: Bool {
        if case .timedOut = self { return true }
        return false
    }

    public var description: String {
        switch self {
        case .unreachable(let s): return "Redis unreachable: \(s)"
        case .timedOut(let s): return "Redis did not answer: \(s)"
        case .queuedTooLong(let s): return "Redis call not sent in time: \(s)"
        case .generation(let s): return "Redis lost this voucher's state: \(s)"
        case .server(let s): return "Redis error: \(s)"
        case .overloaded: return "Redis request queue full"
        case .invalidURL(let s): return s
        case .closed: return "Redis connection closed"
        case .badReply(let s): return "unexpected Redis reply: \(s)"
        }
    }
}
