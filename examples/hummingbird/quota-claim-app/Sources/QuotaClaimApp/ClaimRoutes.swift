import Foundation
import HTTPTypes
import Hummingbird
import Logging
import QuotaClient

/// The HTTP routes over one shared ``QuotaClient``.
///
/// | route | answer |
/// |---|---|
/// | `POST /claim/{voucher}` | `201` the claim; `409` sold out / user limit; `403` inactive; `404` unknown voucher; `400` bad input; `503` + `Retry-After` when quotad is unavailable or busy |
/// | `DELETE /claims/{claimID}` | `204` cancelled (idempotent); `404` unknown claim id |
/// | `GET /vouchers/{voucher}/available` | `200` `{"voucher":…,"available":n}` (approximate) |
/// | `GET /health` | `200` when quotad answers `PING`, else `503` |
struct ClaimRoutes: Sendable {
    let quota: QuotaClient
    let logger: Logger

    /// The claim's input: the user from the `X-User-ID` header or the JSON body's `user`; the request id from the
    /// `Idempotency-Key` header or `request_id` (a client retrying with the same key gets the same claim).
    struct ClaimInput: Decodable {
        var user: String?
        var quantity: Int?
        var requestID: String?

        enum CodingKeys: String, CodingKey {
            case user, quantity
            case requestID = "request_id"
        }
    }

    struct Claimed: Encodable {
        var claimID: String
        var voucher: String
        var user: String
        var quantity: Int
        var requestID: String

        enum CodingKeys: String, CodingKey {
            case claimID = "claim_id"
            case voucher, user, quantity
            case requestID = "request_id"
        }
    }

    struct Available: Encodable {
        var voucher: String
        var available: Int
    }

    struct Problem: Encodable {
        var error: String
        var message: String
    }

    static let userHeader = HTTPField.Name("X-User-ID")!
    static let idempotencyHeader = HTTPField.Name("Idempotency-Key")!

    func router() -> Router<BasicRequestContext> {
        let router = Router()
        router.post("claim/:voucher") { request, context in try await claim(request, context) }
        router.delete("claims/:claimID") { _, context in try await unclaim(context) }
        router.get("vouchers/:voucher/available") { _, context in try await available(context) }
        router.get("health") { _, _ in
            do {
                try await quota.ping()
                return Response(status: .ok, body: .init(byteBuffer: ByteBuffer(string: "ok\n")))
            } catch {
                return failure(error)
            }
        }
        return router
    }

    func claim(_ request: Request, _ context: BasicRequestContext) async throws -> Response {
        let voucher = try context.parameters.require("voucher")
        var request = request
        let body = try await request.collectBody(upTo: 16 * 1024)
        var input = ClaimInput()
        if body.readableBytes > 0 {
            do {
                input = try JSONDecoder().decode(ClaimInput.self, from: Data(body.readableBytesView))
            } catch {
                return json(.badRequest, Problem(error: "BAD_REQUEST", message: "the body must be JSON like {\"user\":\"u1\",\"quantity\":1}"))
            }
        }
        guard let user = request.headers[Self.userHeader] ?? input.user, !user.isEmpty else {
            return json(.badRequest, Problem(error: "BAD_REQUEST", message: "no user: send X-User-ID or {\"user\":…}"))
        }
        let quantity = input.quantity ?? 1
        guard quantity >= 1 else { return json(.badRequest, Problem(error: "BAD_REQUEST", message: "quantity must be 1 or more")) }
        do {
            let claim = try await quota.claim(voucher: voucher, user: user, quantity: quantity,
                                              requestID: request.headers[Self.idempotencyHeader] ?? input.requestID)
            let body = Claimed(claimID: claim.id, voucher: voucher, user: user, quantity: quantity, requestID: claim.requestID)
            return json(.created, body, headers: [.location: "/claims/\(claim.id)"])
        } catch {
            return failure(error)
        }
    }

    func unclaim(_ context: BasicRequestContext) async throws -> Response {
        let id = try context.parameters.require("claimID")
        do {
            try await quota.unclaim(id)
            return Response(status: .noContent)
        } catch {
            return failure(error)
        }
    }

    func available(_ context: BasicRequestContext) async throws -> Response {
        let voucher = try context.parameters.require("voucher")
        do {
            let n = try await quota.available(voucher: voucher)
            return json(.ok, Available(voucher: voucher, available: n))
        } catch {
            return failure(error)
        }
    }

    /// A failed call as an HTTP answer: quotad's code and message in the body.
    func failure(_ error: any Error) -> Response {
        guard let error = error as? QuotaError else {
            logger.error("claim failed", metadata: ["error": "\(error)"])
            return json(.internalServerError, Problem(error: "INTERNAL", message: "\(error)"))
        }
        let status = Self.status(for: error)
        if status.code >= 500 { logger.warning("quotad call failed", metadata: ["error": "\(error)"]) }
        // Transient: quotad fails closed or is overloaded and the client's retries ran out. Come back shortly.
        let headers: HTTPFields = error.isRetryable || status == .serviceUnavailable ? [.retryAfter: "1"] : [:]
        return json(status, Problem(error: error.code, message: error.message), headers: headers)
    }

    /// The HTTP status of each quotad answer.
    static func status(for error: QuotaError) -> HTTPResponse.Status {
        switch error {
        case .soldOut, .userLimit: return .conflict
        case .inactive: return .forbidden
        case .noVoucher, .unknownClaim: return .notFound
        case .invalidRequest: return .badRequest
        case .unavailable, .busy, .connectionFailed, .timedOut, .poolExhausted, .shutdown: return .serviceUnavailable
        case .noPermission, .authenticationFailed: return .internalServerError  // this app is misconfigured
        case .server, .unexpectedReply: return .badGateway
        }
    }

    func json(_ status: HTTPResponse.Status, _ value: some Encodable, headers: HTTPFields = [:]) -> Response {
        var headers = headers
        headers[.contentType] = "application/json"
        let data = (try? JSONEncoder().encode(value)) ?? Data("{}".utf8)
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: data)))
    }
}
