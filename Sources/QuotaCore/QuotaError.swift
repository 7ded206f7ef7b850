/// The stable error codes of the claim protocol. The RESP error word is derived
/// from the code in exactly one place (``QuotaErrorCode/word``).
public enum QuotaErrorCode: String, Sendable, CaseIterable, Hashable {
    case soldout, userlimit, unavailable, novoucher, inactive, busy, noperm, err

    /// The first word of the RESP error reply (`SOLDOUT`, `UNAVAILABLE`, ...).
    public var word: String { rawValue.uppercased() }
}

/// A typed error with a stable code and a human-readable message.
public struct QuotaError: Error, Sendable, Equatable, CustomStringConvertible {
    public var code: QuotaErrorCode
    public var message: String

    public init(_ code: QuotaErrorCode, _ message: String) {
        self.code = code
        self.message = message
    }

    /// `CODE message`, the text of a RESP error reply.
    public var description: String { "\(code.word) \(message)" }
}
