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
        guard a.count >= 3 else { return .failure(.arity) }
        var qty = 1
        var req: ByteBuffer?
        var i = 3
        while i < a.count {
            if a[i].equalsUppercased("QTY") {
                guard i + 1 < a.count else { return .failure(.syntax("QTY needs a value")) }
                guard let n = a[i + 1].parsePositiveInt(), n >= 1, n <= maxQty else {
                    return .failure(.syntax("QTY must be an integer from 1 to \(maxQty)"))
                }
                qty = n
                i += 2
            } else if a[i].equalsUppercased("REQ") {
                guard i + 1 < a.count else { return .failure(.syntax("REQ needs a request id")) }
                guard a[i + 1].readableBytes >= 1, a[i + 1].readableBytes <= 128 else {
                    return .failure(.syntax("REQ request id must be 1-128 bytes"))
                }
                req = a[i + 1]
                i += 2
            } else {
                return .failure(.syntax(
                    "unknown CLAIM option '\(String(buffer: a[i]).prefix(32))' (expected QTY n or REQ id)"))
            }
        }
        guard let v = voucherID(a[1]) else { return .failure(.badVoucher(String(buffer: a[1]))) }
        guard a[2].readableBytes > 0, a[2].readableBytes <= 256 else {
            return .failure(.syntax("user id must be 1-256 bytes"))
        }
        return .success(ClaimArguments(voucher: v, user: a[2], qty: qty, req: req))
    }
}
