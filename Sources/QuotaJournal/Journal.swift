import Foundation
import Glibc
import Logging
import NIOConcurrencyHelpers
import QuotaCore
import Synchronization

/// Where a durable record is: its segment and its sequence number in this process.
public struct JournalPosition: Sendable, Equatable {
    public var segment: UInt64
    public var sequence: UInt64
}

public struct JournalError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

/// A durable claim handed to the shipper.
public struct DurableClaim: Sendable {
    public var position: JournalPosition
    public var event: ClaimEvent
}

/// The local write-ahead journal: append-only segment files under `dir`, one record per
/// claim and per lease grant/close, checksummed, group-committed with `fdatasync`.
///
/// One writer thread owns the open segment: it takes everything queued, writes it,
/// syncs once, then answers every record of the batch. Each segment starts with a
/// snapshot of the open leases (granted, served), so a segment can be deleted once its
/// claims are shipped without losing what recovery needs. A failed write (disk full) is
/// cut back to the last good offset and its records are answered with an error.
public final class Journal: @unchecked Sendable {
    public struct Options: Sendable {
        public var dir: String
        /// Roll to a new segment past this size. Default 4 MiB.
        public var segmentBytes: Int = 4 << 20
        /// Roll a segment holding claims after this long, so shipped segments get deleted. Default 2 s.
        public var rollAfter: Duration = .seconds(2)
        /// Bound on unshipped bytes. Default 1 GiB.
        public var maxBytes: Int = 1 << 30
        /// Keep fully shipped segments this long (so `REQ` answers and `UNCLAIM` survive a restart). Default 60 s.
        public var retention: Duration = .seconds(60)
        public init(dir: String) { self.dir = dir }
    }

    private struct Pending {
        var record: JournalRecord
        var done: (@Sendable (Result<JournalPosition, JournalError>) -> Void)?
    }

    private struct Segment {
        var bytes: Int
        var claims: Int
        var shipped: Int = 0
        var sealed: Bool
        var sealedAt = ContinuousClock.now
        var markedShipped = false
        var done: Bool { sealed && shipped >= claims }
    }

    public let options: Options
    private let logger: Logger
    private let lock = ConditionLock(value: 0)
    private var queue: [Pending] = []  // guarded by lock
    private var stopping = false  // guarded by lock

    private let state = NIOLockedValueBox(State())
    /// Hot-path views of `state` (read on every claim).
    private let healthyFlag = Atomic<Bool>(true)
    private let backlog = Atomic<Int>(0)
    private struct State {
        var segments: [UInt64: Segment] = [:]
        var healthy = true
        var lastError: String?
        var syncs = 0
        var recordsSynced = 0
    }

    // Writer thread only.
    private var fd: Int32 = -1
    private var current: UInt64 = 0
    private var goodOffset = 0
    private var openedAt = ContinuousClock.now
    private var nextSequence: UInt64 = 1
    private var leases: [LeaseKey: JournalRecord.OpenLease] = [:]
    private var thread: Thread?
    private let onDurable: @Sendable ([DurableClaim]) -> Void

    struct LeaseKey: Hashable {
        var voucher: String
        var lease: String
    }

    /// Open the journal after ``JournalRecovery/read(dir:)``: a new segment starts with a snapshot of
    /// `openLeases`; the recovered segments stay until their claims are shipped.
    public init(options: Options, recovered: JournalRecovery, logger: Logger,
                onDurable: @escaping @Sendable ([DurableClaim]) -> Void) throws(JournalError) {
        self.options = options
        self.logger = logger
        self.onDurable = onDurable
        for o in recovered.openLeases { leases[LeaseKey(voucher: o.voucher, lease: o.lease)] = o }
        state.withLockedValue { s in
            for seg in recovered.segments {
                var info = Segment(bytes: seg.bytes, claims: seg.claims.count, sealed: true)
                if seg.shipped {
                    info.shipped = info.claims
                    info.markedShipped = true
                }
                s.segments[seg.id] = info
            }
        }
        current = (recovered.segments.map(\.id).max() ?? 0)
        try openNextSegment()
        publish()
        let t = Thread { [unowned self] in self.run() }
        t.name = "journal"
        thread = t
        t.start()
    }

    /// Queue a record; `done` runs (on the writer thread) once it is on disk, or failed.
    public func append(_ r: JournalRecord, done: (@Sendable (Result<JournalPosition, JournalError>) -> Void)? = nil) {
        lock.lock()
        if stopping {
            lock.unlock()
            done?(.failure(JournalError(message: "journal closed")))
            return
        }
        queue.append(Pending(record: r, done: done))
        lock.unlock(withValue: 1)
    }

    /// The shipper acknowledged `count` claims of `segment`.
    public func markShipped(segment: UInt64, count: Int) {
        state.withLockedValue { s in s.segments[segment]?.shipped += count }
        sweep()
    }

    /// Mark fully shipped segments (`.shipped` file) and delete those older than the retention.
    private func sweep() {
        var mark: [UInt64] = []
        var delete: [UInt64] = []
        state.withLockedValue { s in
            for (id, seg) in s.segments where seg.done {
                if !seg.markedShipped {
                    mark.append(id)
                    s.segments[id]?.markedShipped = true
                }
                if ContinuousClock.now - seg.sealedAt >= options.retention { delete.append(id) }
            }
        }
        for id in mark {
            let p = JournalRecovery.path(dir: options.dir, id: id) + ".shipped"
            let f = open(p, O_WRONLY | O_CREAT | O_CLOEXEC, 0o640)
            if f >= 0 { Glibc.close(f) }
        }
        for id in delete { deleteSegment(id) }
        publish()
    }

    /// Bytes in segments not yet deleted (their claims are not all shipped).
    public var backlogBytes: Int { backlog.load(ordering: .relaxed) }
    public var unshippedClaims: Int {
        state.withLockedValue { $0.segments.values.reduce(0) { $0 + $1.claims - $1.shipped } }
    }
    public var segmentCount: Int { state.withLockedValue { $0.segments.count } }
    public var isHealthy: Bool { healthyFlag.load(ordering: .relaxed) }
    public var lastError: String? { state.withLockedValue { $0.lastError } }
    public var isOverBound: Bool { backlogBytes > options.maxBytes }
    /// Fsyncs done and records they made durable (records per sync = group-commit factor).
    public var syncStats: (syncs: Int, records: Int) { state.withLockedValue { ($0.syncs, $0.recordsSynced) } }

    /// Write what is queued, stop the writer thread, close the segment.
    public func close() {
        lock.lock()
        stopping = true
        lock.unlock(withValue: 1)
        while thread?.isFinished == false { usleep(5_000) }
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
    }

    /// Mirror `state` into the hot-path atomics; call after every change.
    private func publish() {
        let (h, b) = state.withLockedValue { s in (s.healthy, s.segments.values.reduce(0) { $0 + ($1.done ? 0 : $1.bytes) }) }
        healthyFlag.store(h, ordering: .relaxed)
        backlog.store(b, ordering: .relaxed)
    }

    // MARK: - Writer thread

    private func run() {
        while true {
            let got = lock.lock(whenValue: 1, timeoutSeconds: 0.5)
            var batch: [Pending] = []
            var stop = false
            if got {
                batch = queue
                queue.removeAll(keepingCapacity: true)
                stop = stopping
                lock.unlock(withValue: 0)
            }
            if !batch.isEmpty { write(batch) }
            maybeRoll(force: false)
            sweep()
            if stop { return }
        }
    }

    private func write(_ batch: [Pending]) {
        if fd < 0 {
            do { try openNextSegment() } catch {
                fail(batch, error.message)
                return
            }
        }
        var buf: [UInt8] = []
        buf.reserveCapacity(batch.count * 128)
        var claims: [DurableClaim] = []
        var positions: [JournalPosition] = []
        let saved = leases
        for p in batch {
            JournalCodec.encode(p.record, into: &buf)
            let pos = JournalPosition(segment: current, sequence: nextSequence)
            nextSequence += 1
            positions.append(pos)
            apply(p.record)
            if case .claim(let e) = p.record, e.kind != .intent { claims.append(DurableClaim(position: pos, event: e)) }
        }
        if let err = writeAll(buf) ?? sync() {
            // Cut the segment back to the last good record, and the file position with it: nothing
            // half-written stays behind and the next write does not leave a hole.
            _ = ftruncate(fd, off_t(goodOffset))
            _ = lseek(fd, off_t(goodOffset), SEEK_SET)
            leases = saved
            nextSequence -= UInt64(batch.count)
            fail(batch, err)
            return
        }
        goodOffset += buf.count
        state.withLockedValue { s in
            s.segments[current]?.bytes = goodOffset
            s.segments[current]?.claims += claims.count
            if !s.healthy { logger.info("journal writes again", metadata: ["journal.dir": "\(options.dir)"]) }
            s.healthy = true
            s.lastError = nil
            s.syncs += 1
            s.recordsSynced += batch.count
        }
        publish()
        // The shipper learns of the claims before their waiters are answered (kafka mode waits on it).
        if !claims.isEmpty { onDurable(claims) }
        for (p, pos) in zip(batch, positions) { p.done?(.success(pos)) }
        if goodOffset >= options.segmentBytes { maybeRoll(force: true) }
    }

    private func fail(_ batch: [Pending], _ message: String) {
        state.withLockedValue { s in
            if s.healthy { logger.error("journal write failed", metadata: ["error": "\(message)"]) }
            s.healthy = false
            s.lastError = message
        }
        publish()
        for p in batch { p.done?(.failure(JournalError(message: message))) }
    }

    private func apply(_ r: JournalRecord) {
        switch r {
        case .leaseGranted(let v, let l, let g):
            leases[LeaseKey(voucher: v, lease: l)] = .init(voucher: v, lease: l, granted: g, served: 0)
        case .leaseClosed(let v, let l):
            leases.removeValue(forKey: LeaseKey(voucher: v, lease: l))
        case .claim(let e):
            guard e.kind != .intent else { break }
            for s in e.shares {
                let k = LeaseKey(voucher: e.voucher, lease: s.leaseId)
                leases[k]?.served += e.kind == .claimed ? s.tokens : -s.tokens
            }
        case .snapshot:
            break
        }
    }

    private func maybeRoll(force: Bool) {
        guard fd >= 0 else { return }
        let (claims, shipped) = state.withLockedValue { s in (s.segments[current]?.claims ?? 0, s.segments[current]?.shipped ?? 0) }
        let old = ContinuousClock.now - openedAt >= options.rollAfter
        guard force || (old && claims > 0) else { return }
        let previous = current
        Glibc.close(fd)
        fd = -1
        do { try openNextSegment() } catch {
            state.withLockedValue { s in
                s.healthy = false
                s.lastError = error.message
            }
            publish()
            return
        }
        _ = shipped
        state.withLockedValue { s in
            s.segments[previous]?.sealed = true
            s.segments[previous]?.sealedAt = .now
        }
        sweep()
    }

    private func openNextSegment() throws(JournalError) {
        do {
            try FileManager.default.createDirectory(atPath: options.dir, withIntermediateDirectories: true)
        } catch {
            throw JournalError(message: "cannot create journal.dir \(options.dir): \(error)")
        }
        let id = current + 1
        let path = JournalRecovery.path(dir: options.dir, id: id)
        let f = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o640)
        guard f >= 0 else { throw JournalError(message: "cannot open \(path): \(String(cString: strerror(errno)))") }
        fd = f
        current = id
        goodOffset = 0
        openedAt = .now
        state.withLockedValue { $0.segments[id] = Segment(bytes: 0, claims: 0, sealed: false) }
        var buf: [UInt8] = []
        JournalCodec.encode(.snapshot(leases.values.sorted { ($0.voucher, $0.lease) < ($1.voucher, $1.lease) }), into: &buf)
        if let err = writeAll(buf) ?? sync() ?? syncDir() {
            Glibc.close(f)
            fd = -1
            unlink(path)
            state.withLockedValue { _ = $0.segments.removeValue(forKey: id) }
            current = id - 1
            throw JournalError(message: "cannot start segment \(path): \(err)")
        }
        goodOffset = buf.count
        state.withLockedValue { $0.segments[id]?.bytes = goodOffset }
    }

    private func deleteSegment(_ id: UInt64) {
        unlink(JournalRecovery.path(dir: options.dir, id: id))
        unlink(JournalRecovery.path(dir: options.dir, id: id) + ".shipped")
        state.withLockedValue { _ = $0.segments.removeValue(forKey: id) }
    }

    private func writeAll(_ buf: [UInt8]) -> String? {
        var off = 0
        while off < buf.count {
            let n = buf.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + off, buf.count - off) }
            if n < 0 {
                if errno == EINTR { continue }
                return "write: \(String(cString: strerror(errno)))"
            }
            off += n
        }
        return nil
    }

    private func sync() -> String? {
        fdatasync(fd) == 0 ? nil : "fdatasync: \(String(cString: strerror(errno)))"
    }

    private func syncDir() -> String? {
        let d = open(options.dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard d >= 0 else { return "open dir: \(String(cString: strerror(errno)))" }
        defer { Glibc.close(d) }
        return fsync(d) == 0 ? nil : "fsync dir: \(String(cString: strerror(errno)))"
    }
}
