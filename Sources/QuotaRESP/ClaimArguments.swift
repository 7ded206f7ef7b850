import NIOCore

/// `CLAIM voucher user [QTY n] [REQ id]` checked and split without any server state:
/// what ConnectionHandler does with a decoded CLAIM before it reaches the engine.
/// Pure, so the fuzz target (Fuzz/) runs it on every frame the decoder accepts.
public struct ClaimArguments: Sendable, Equatable {
    public var voucher: String
    public var user: ByteBuffer
    public var qty: Int
    public var req: ByteBuffer?

    public init(voucher: String, user: ByteBuffer, qty: Int, req: ByteBuffer?) {
        self.voucher = voucher
        self.user = user
        self.qty = qty
        self.req = req
    }

    /// Why a CLAIM is refused before it reaches the engine.
    public enum Failure: Error, Sendable, Equatable {
        /// Fewer than three arguments.
        case arity
        /// A bad option or id: the text of the `ERR` reply.
        case syntax(String)
        /// The voucher id (as text) fails `isValidVoucher`.
        case badVoucher(String)
    }

    /// Parse `a` (the whole command, `a[0]` is the name). Checked in this order: arity, the options
    /// (`QTY` 1...`maxQty`, `REQ` 1-128 bytes; a repeated option overrides), the voucher id, the user id (1-256 bytes).
    public static func parse(
        _ a: [ByteBuffer], maxQty: Int, isValidVoucher: (String) -> Bool
    ) -> Result<ClaimArguments, Failure> {
        parse(a, maxQty: maxQty, voucherID: { b in
            let v = String(buffer: b)
            return isValidVoucher(v) ? v : nil
        })
    }

    /// As ``parse(_:maxQty:isValidVoucher:)``, with the voucher id read by `voucherID`: the id's text, or nil
    /// when it is not a valid id (a caller may remember the last id it validated and answer it again for the
    /// same bytes, without a new `String` or a new check).
    public static func parse(
        _ a: [ByteBuffer], maxQty: Int, voucherID: (ByteBuffer) -> String?
    ) -> Result<ClaimArguments, Failure> {
        parseFields(a, maxQty: maxQty, voucherID: { _ in voucherID(a[1]) }).map { f in
            ClaimArguments(voucher: f.voucher, user: a[2], qty: f.qty, req: f.reqIndex.map { a[$0] })
        }
    }

    /// What ``parse(_:maxQty:voucherID:)`` finds, with the user id and the request id left where they are: the
    /// user id is argument 2, the request id argument `reqIndex`.
    public struct Fields: Sendable, Equatable {
        public var voucher: String
        public var qty: Int
        public var reqIndex: Int?
    }

    /// ``parse(_:maxQty:voucherID:)`` of arguments read in place (``RESPArgumentBytes``), the same checks in the
    /// same order: the claim path reads a `CLAIM` where it was decoded, without a slice of the read buffer per
    /// argument (issue 13).
    public static func parseFields<A: RESPArgumentBytes>(
        _ a: A, maxQty: Int, voucherID: (UnsafeRawBufferPointer) -> String?
    ) -> Result<Fields, Failure> {
        let n = a.argumentCount
        guard n >= 3 else { return .failure(.arity) }
        var qty = 1
        var reqIndex: Int?
        var i = 3
        while i < n {
            if a.withArgument(i, { RESPBytes.equalsUppercased($0, "QTY") }) {
                guard i + 1 < n else { return .failure(.syntax("QTY needs a value")) }
                guard let v = a.withArgument(i + 1, RESPBytes.parsePositiveInt), v >= 1, v <= maxQty else {
                    return .failure(.syntax("QTY must be an integer from 1 to \(maxQty)"))
                }
                qty = v
                i += 2
            } else if a.withArgument(i, { RESPBytes.equalsUppercased($0, "REQ") }) {
                guard i + 1 < n else { return .failure(.syntax("REQ needs a request id")) }
                guard a.withArgument(i + 1, { $0.count >= 1 && $0.count <= 128 }) else {
                    return .failure(.syntax("REQ request id must be 1-128 bytes"))
                }
                reqIndex = i + 1
                i += 2
            } else {
                let option = a.withArgument(i) { String(decoding: $0, as: UTF8.self) }
                return .failure(.syntax("unknown CLAIM option '\(option.prefix(32))' (expected QTY n or REQ id)"))
            }
        }
        guard let v = a.withArgument(1, voucherID) else {
            return .failure(.badVoucher(a.withArgument(1) { String(decoding: $0, as: UTF8.self) }))
        }
        guard a.withArgument(2, { $0.count > 0 && $0.count <= 256 }) else {
            return .failure(.syntax("user id must be 1-256 bytes"))
        }
        return .success(Fields(voucher: v, qty: qty, reqIndex: reqIndex))
    }
}
