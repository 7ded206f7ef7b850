/// Redis Cluster's key → hash slot mapping, and which argument of a command is its key.
///
/// A key's slot is CRC16 (XMODEM: polynomial 0x1021, initial value 0, as Redis computes it) of its hash
/// tag modulo 16384. The hash tag is the part between the first `{` and the first `}` after it, when
/// that part is not empty; otherwise the whole key.
public enum ClusterSlot {
    public static let count = 16384

    /// CRC16-CCITT (XMODEM) of `bytes`.
    public static func crc16<C: Collection>(_ bytes: C) -> UInt16 where C.Element == UInt8 {
        var crc: UInt16 = 0
        for b in bytes {
            crc ^= UInt16(b) << 8
            for _ in 0..<8 {
                crc = (crc & 0x8000) != 0 ? (crc << 1) ^ 0x1021 : crc << 1
            }
        }
        return crc
    }

    /// The hash slot of `key`.
    public static func of(_ key: String) -> Int {
        let u = Array(key.utf8)
        if let open = u.firstIndex(of: UInt8(ascii: "{")),
            let close = u[(open + 1)...].firstIndex(of: UInt8(ascii: "}")), close > open + 1
        {
            return Int(crc16(u[(open + 1)..<close]) % UInt16(count))
        }
        return Int(crc16(u) % UInt16(count))
    }

    /// Commands that name no key: sent to any master (or the one the batch around them goes to).
    private static let keyless: Set<String> = [
        "PING", "TIME", "INFO", "CONFIG", "SCRIPT", "CLUSTER", "ECHO", "DBSIZE", "PUBLISH", "DEBUG", "FLUSHALL",
        "FLUSHDB", "COMMAND", "CLIENT", "READONLY", "READWRITE", "ASKING", "WAIT", "LASTSAVE", "ROLE", "HELLO",
        "AUTH", "SELECT", "MEMORY", "SLOWLOG", "LATENCY", "BGREWRITEAOF", "BGSAVE", "SAVE", "SHUTDOWN",
    ]

    /// The key a command is routed by: the first key of `EVAL`/`EVALSHA`/`FCALL` (nil with no keys), nil
    /// for commands without keys, else the first argument.
    public static func routingKey(_ args: [String]) -> String? {
        guard let name = args.first?.uppercased() else { return nil }
        switch name {
        case "EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO":
            guard args.count > 3, let n = Int(args[2]), n > 0 else { return nil }
            return args[3]
        default:
            if keyless.contains(name) || args.count < 2 { return nil }
            return args[1]
        }
    }

    /// The slot a command is routed by, or nil when it has no key.
    public static func of(command args: [String]) -> Int? { routingKey(args).map { of($0) } }
}
