import Foundation
import Glibc
import Logging
import NIOConcurrencyHelpers
import QuotaCore
import Synchronization

/// Where a durable record is: its segment, and for shipped events its index in that segment.
public struct JournalPosition: Sendable, Equatable, Hashable {
    public var segment: UInt64
    public var index: Int
    public init(segment: UInt64, index: Int) {
        self.segment = segment
        self.index = index
    }
}

public struct JournalError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(message: String) { self.message = message }
    public var description: String { message }
}

/// A durable event handed to the shipper.
public struct DurableEvent: Sendable {
    public var position: JournalPosition
    public var event: ShippedEvent
}

/// Receives the answers of records appended with ``Journal/append(_:sink:token:)``, one call per write
/// batch (and run between records answered by closures), on the writer thread, each sink's in its append
/// order. Different sinks' answers are not ordered among themselves.
public protocol JournalBatchSink: AnyObject, Sendable {
    /// These records are durable, at these positions (`positions[i]` is `tokens[i]`'s).
    func journaled(tokens: [Int], positions: [JournalPosition])
    /// These records could not be written (the journal failed or is stopping).
    func failed(_ tokens: [Int])
}

/// The local write-ahead journal: append-only segment files under `dir`, checksummed,
/// group-committed with `fdatasync`.
///
/// One writer thread owns the open segment: it takes everything queued, writes it, syncs once,
/// then answers every record of the batch. Each segment starts with a snapshot of the host's
/// books (``LeaseLedger``), so a segment can be deleted once its events are shipped without
/// losing what recovery needs. A failed write (disk full) is cut back to the last good offset and
/// its records are answered with an error.
///
/// The directory is locked (`flock` on `dir/LOCK`) for the journal's life: a second process on
/// the same directory is refused at start. Kafka acknowledgements are tracked per event; a
/// segment whose events are all acknowledged gets a `.shipped` marker, and at close every segment
/// not fully acknowledged gets one listing what is missing, so a restart re-ships only that.
public final class Journal: @unchecked Sendable {
    public struct Options: Sendable {
        public var dir: String
        /// Roll to a new segment past this size. Default 4 MiB.
        public var segmentBytes: Int = 4 << 20
        /// Roll a segment holding events after this long, so shipped segments get deleted. Default 2 s.
        public var rollAfter: Duration = .seconds(2)
        /// Bound on unshipped bytes. Default 1 GiB.
        public var maxBytes: Int = 1 << 30
        /// Keep fully shipped segments this long (so `REQ` answers and `UNCLAIM` survive a restart). Default 60 s.
        public var retention: Duration = .seconds(60)
        /// Whether events are shipped (Kafka is configured). Without a shipper the journal is a recovery log
        /// only: each segment gets an empty `.shipped` marker when it is opened (so a crash leaves nothing
        /// "to ship" either, and a later start with Kafka ships nothing of this run, never a fragment), and
        /// sealed segments go after the retention. Events a previous run with Kafka left unshipped are never
        /// dropped: a start without Kafka on them is refused.
        public var ships = true
        public init(dir: String) { self.dir = dir }
    }

    private struct Pending {
        var record: JournalRecord
        var done: (@Sendable (Result<JournalPosition, JournalError>) -> Void)?
        /// Answered with the other records of its batch that name the same sink (``append(_:sink:token:)``).
        var sink: (any JournalBatchSink)?
        var token = 0
    }

    private struct Segment {
        var bytes: Int
        /// Shipped events written (their indexes are 0..<events).
        var events: Int
        /// Indexes not yet acknowledged by Kafka.
        var unacked = AckBits()
        var sealed: Bool
        var sealedAt = ContinuousClock.now
        var markedShipped = false
        var done: Bool { sealed && unacked.isEmpty }
    }

    public let options: Options
    private let logger: Logger
    private let lock = ConditionLock(value: 0)
    private var queue: [Pending] = []  // guarded by lock
    /// The writer thread's batch buffer: swapped with `queue`, emptied (keeping its capacity) after each
    /// write, so neither grows again batch after batch (issue 13: growing `queue` was ~145 instructions a claim).
    private var spare: [Pending] = []  // writer thread only
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
    private var lockFD: Int32 = -1
    private var current: UInt64 = 0
    private var goodOffset = 0
    private var openedAt = ContinuousClock.now
    private var ledger: LeaseLedger
    private var thread: Thread?
    private let onDurable: @Sendable ([DurableEvent]) -> Void

    /// Lock `options.dir` and open the journal after ``JournalRecovery/read(dir:)``: a new segment starts
    /// with a snapshot of the recovered books; the recovered segments stay until their events are shipped.
    /// `boot` is written (durably) before anything else.
    /// - Throws: ``JournalError`` when the directory is locked by another process or cannot be written.
    public init(options: Options, recovered: JournalRecovery, boot: JournalBoot? = nil, logger: Logger,
                onDurable: @escaping @Sendable ([DurableEvent]) -> Void) throws(JournalError) {
        self.options = options
        self.logger = logger
        self.onDurable = onDurable
        self.ledger = recovered.ledger
        // Served counts that cannot be proven: keep the leases (for audit and reconciliation), never
        // return them on this journal's word.
        if !recovered.leaseStateTrusted { ledger.distrustAll() }
        if !options.ships {
            let left = recovered.segments.reduce(0) { $0 + $1.toShip.count }
            if left > 0 {
                throw JournalError(message: "journal.dir \(options.dir) holds \(left) events a previous run did not ship to "
                    + "Kafka (not shipped yet), and no kafka section is configured: configure kafka to ship them, or "
                    + "ship them with quotactl journal ship, or move the directory away to discard them (they then "
                    + "never reach the ledger)")
            }
        }
        lockFD = try Self.lockDirectory(options.dir)
        state.withLockedValue { s in
            for seg in recovered.segments {
                var info = Segment(bytes: seg.bytes, events: seg.events.count, sealed: true)
                info.unacked = AckBits(seg.toShip.map(\.0))
                if info.unacked.isEmpty, seg.unacked != nil { info.markedShipped = true }
                s.segments[seg.id] = info
            }
        }
        current = (recovered.segments.map(\.id).max() ?? 0)
        do {
            try openNextSegment()
        } catch {
            Glibc.close(lockFD)
            throw error
        }
        if let boot {
            var buf: [UInt8] = []
            JournalCodec.encode(.boot(boot), into: &buf)
            if let err = writeAll(buf) ?? sync() {
                Glibc.close(fd)
                Glibc.close(lockFD)
                throw JournalError(message: "cannot write to journal.dir \(options.dir): \(err)")
            }
            goodOffset += buf.count
            state.withLockedValue { $0.segments[current]?.bytes = goodOffset }
        }
        publish()
        let t = Thread { [self] in self.run() }
        t.name = "journal"
        thread = t
        t.start()
    }

    /// `flock` the directory's `LOCK` file (created), or explain who holds it.
    private static func lockDirectory(_ dir: String) throws(JournalError) -> Int32 {
        do {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        } catch {
            throw JournalError(message: "cannot create journal.dir \(dir): \(error)")
        }
        let path = dir + "/LOCK"
        let f = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o640)
        guard f >= 0 else { throw JournalError(message: "cannot open \(path): \(String(cString: strerror(errno)))") }
        if flock(f, LOCK_EX | LOCK_NB) != 0 {
            let holder = (try? String(contentsOfFile: path, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
            Glibc.close(f)
            throw JournalError(message: "journal.dir \(dir) is in use by another quotad (pid \(holder ?? "?")); "
                + "two processes must never share a journal")
        }
        let pid = Array("\(getpid())\n".utf8)
        _ = ftruncate(f, 0)
        _ = pid.withUnsafeBytes { pwrite(f, $0.baseAddress, $0.count, 0) }
        return f
    }

    /// Queue a record; `done` runs (on the writer thread) once it is on disk, or failed.
    public func append(_ r: consuming JournalRecord, done: (@Sendable (Result<JournalPosition, JournalError>) -> Void)? = nil) {
        lock.lock()
        if stopping {
            lock.unlock()
            done?(.failure(JournalError(message: "journal closed")))
            return
        }
        enqueueLocked(Pending(record: r, done: done))
    }

    /// Queue `p` and release the lock (held). Only the first record of an empty queue wakes the writer: the
    /// condition's value is 1 whenever the queue is not empty (the writer sets 0 only as it takes the queue, which
    /// leaves it empty), so a later record's broadcast woke nobody (with the record moved in, not copied: −120
    /// instructions a claim; issue 13).
    @inline(__always)
    private func enqueueLocked(_ p: consuming Pending) {
        let wake = queue.isEmpty
        queue.append(p)
        if wake { lock.unlock(withValue: 1) } else { lock.unlock() }
    }

    /// Queue a record whose answer goes to `sink` together with every other record of the same write
    /// batch that names it: one call per sink and batch, not one closure per record (the claim path's
    /// hot records). Returns false, and calls nothing, when the journal is stopping (the record failed).
    public func append(_ r: consuming JournalRecord, sink: any JournalBatchSink, token: Int) -> Bool {
        lock.lock()
        if stopping {
            lock.unlock()
            return false
        }
        // (The record is consumed: moved into the queue, not copied.)
        enqueueLocked(Pending(record: r, done: nil, sink: sink, token: token))
        return true
    }

    /// Kafka acknowledged these events.
    public func markShipped(_ positions: [JournalPosition]) {
        state.withLockedValue { s in
            // A run of positions in one segment: one lookup, and the segment taken out of the dictionary
            // while it changes (so its bits are changed in place, not copied).
            var i = 0
            while i < positions.count {
                let id = positions[i].segment
                var j = i
                while j < positions.count && positions[j].segment == id { j += 1 }
                if var seg = s.segments.removeValue(forKey: id) {
                    for k in i..<j { seg.unacked.remove(positions[k].index) }
                    s.segments[id] = seg
                }
                i = j
            }
        }
        sweep()
    }

    /// Every event not yet acknowledged (to ship again after the producer was recreated).
    public var unacknowledged: [JournalPosition] {
        state.withLockedValue { s in
            s.segments.flatMap { id, seg in seg.unacked.map { JournalPosition(segment: id, index: $0) } }
        }
    }

    /// Mark fully shipped segments (`.shipped` file) and delete those older than the retention, oldest
    /// first only: the journal on disk is always a suffix of what was written, so a cancellation is never
    /// found without its claim's later records, nor a claim without its cancellation.
    private func sweep() {
        var mark: [UInt64] = []
        var delete: [UInt64] = []
        state.withLockedValue { s in
            for (id, seg) in s.segments where seg.done && !seg.markedShipped {
                mark.append(id)
                s.segments[id]?.markedShipped = true
            }
            for id in s.segments.keys.sorted() {
                guard let seg = s.segments[id], seg.done, ContinuousClock.now - seg.sealedAt >= options.retention else { break }
                delete.append(id)
            }
        }
        for id in mark { writeMarker(id, unacked: []) }
        for id in delete { deleteSegment(id) }
        publish()
    }

    private func writeMarker(_ id: UInt64, unacked: [Int]) {
        let p = JournalRecovery.path(dir: options.dir, id: id) + ".shipped"
        let text = unacked.sorted().map(String.init).joined(separator: "\n")
        let tmp = p + ".tmp"
        let f = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o640)
        guard f >= 0 else { return }
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { Glibc.write(f, $0.baseAddress, $0.count) }
        _ = fdatasync(f)
        Glibc.close(f)
        rename(tmp, p)
    }

    /// Bytes in segments not yet deleted (their events are not all shipped).
    public var backlogBytes: Int { backlog.load(ordering: .relaxed) }
    public var unshippedClaims: Int {
        state.withLockedValue { $0.segments.values.reduce(0) { $0 + $1.unacked.count } }
    }
    public var segmentCount: Int { state.withLockedValue { $0.segments.count } }
    public var isHealthy: Bool { healthyFlag.load(ordering: .relaxed) }
    public var lastError: String? { state.withLockedValue { $0.lastError } }
    public var isOverBound: Bool { backlogBytes > options.maxBytes }
    /// Fsyncs done and records they made durable (records per sync = group-commit factor).
    public var syncStats: (syncs: Int, records: Int) { state.withLockedValue { ($0.syncs, $0.recordsSynced) } }

    /// Write what is queued and stop the writer thread: later appends fail. Acknowledgements are still
    /// taken until ``close()``.
    public func stopWriting() {
        lock.lock()
        stopping = true
        lock.unlock(withValue: 1)
        while thread?.isFinished == false { usleep(5_000) }
    }

    /// The shipped events of one segment, read back from its file (to ship them again).
    public func readEvents(segment: UInt64) -> [ShippedEvent] {
        let p = JournalRecovery.path(dir: options.dir, id: segment)
        guard let data = FileManager.default.contents(atPath: p) else { return [] }
        let bytes = [UInt8](data)
        var out: [ShippedEvent] = []
        var offset = 0
        while case .record(let r, let next) = JournalCodec.decode(bytes, at: offset) {
            if let e = ShippedEvent(r) { out.append(e) }
            offset = next
        }
        return out
    }

    /// Write what is queued, stop the writer thread, record what Kafka acknowledged, close the segment,
    /// release the directory lock.
    public func close() {
        stopWriting()
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
        // Record acknowledgements of every segment, so the next start ships only what Kafka lacks.
        let marks = state.withLockedValue { s -> [(UInt64, [Int])] in
            s.segments.compactMap { id, seg in seg.markedShipped ? nil : (id, Array(seg.unacked)) }
        }
        for (id, unacked) in marks { writeMarker(id, unacked: unacked) }
        if lockFD >= 0 { Glibc.close(lockFD) }
        lockFD = -1
    }

    /// Mirror `state` into the hot-path atomics; call after every change.
    private func publish() {
        // Every segment from the oldest one still waiting for Kafka on: none of them can be deleted yet.
        let (h, b) = state.withLockedValue { s -> (Bool, Int) in
            var oldest = UInt64.max
            for (id, seg) in s.segments where !seg.done && id < oldest { oldest = id }
            return (s.healthy, s.segments.reduce(0) { $0 + ($1.key >= oldest ? $1.value.bytes : 0) })
        }
        healthyFlag.store(h, ordering: .relaxed)
        backlog.store(b, ordering: .relaxed)
    }

    // MARK: - Writer thread

    private func run() {
        while true {
            let got = lock.lock(whenValue: 1, timeoutSeconds: 0.5)
            var stop = false
            if got {
                swap(&spare, &queue)
                stop = stopping
                lock.unlock(withValue: 0)
            }
            if !spare.isEmpty {
                write(&spare)
                // (Kept for the next batch, unless a burst made it huge: then given back; helper-48.)
                if spare.capacity > 65_536 { spare = [] } else { spare.removeAll(keepingCapacity: true) }
            }
            maybeRoll(force: false)
            sweep()
            if stop { return }
        }
    }

    /// (The batch's records, sinks and completions are taken out of it as they are used: what is left in it is
    /// destroyed by the caller.)
    private func write(_ batch: inout [Pending]) {
        if fd < 0 {
            do { try openNextSegment() } catch {
                fail(&batch, error.message)
                return
            }
        }
        var buf: [UInt8] = []
        buf.reserveCapacity(batch.count * 128)
        var shipped: [DurableEvent] = []
        if options.ships { shipped.reserveCapacity(batch.count) }
        var positions: [JournalPosition] = []
        positions.reserveCapacity(batch.count)
        let saved = ledger
        var next = state.withLockedValue { $0.segments[current]?.events ?? 0 }
        let ships = options.ships
        // (By index: `for p in batch` copied each record, its closure and its sink, a retain and a release each.
        // The record is taken out of the batch, a record with no heap parts left in its place (nothing reads it
        // after this): `batch[i].record` was a copy of it, an outlined copy of the enum (~145 instructions) and a
        // retain and a release, once into a local or once per call; issue 13.)
        for i in batch.indices {
            var record = JournalRecord.generation("")
            swap(&record, &batch[i].record)
            JournalCodec.encode(record, into: &buf)
            ledger.apply(record)
            if ShippedEvent.isShipped(record) {
                let pos = JournalPosition(segment: current, index: next)
                next += 1
                positions.append(pos)
                // (Without Kafka nobody reads the events: not made.)
                if ships, let ev = ShippedEvent(record) { shipped.append(DurableEvent(position: pos, event: ev)) }
            } else {
                positions.append(JournalPosition(segment: current, index: -1))
            }
        }
        if let err = writeAll(buf) ?? sync() {
            // Cut the segment back to the last good record, and the file position with it: nothing
            // half-written stays behind and the next write does not leave a hole.
            _ = ftruncate(fd, off_t(goodOffset))
            _ = lseek(fd, off_t(goodOffset), SEEK_SET)
            ledger = saved
            fail(&batch, err)
            return
        }
        goodOffset += buf.count
        state.withLockedValue { s in
            s.segments[current]?.bytes = goodOffset
            s.segments[current]?.events = next
            if options.ships, let first = shipped.first, var seg = s.segments.removeValue(forKey: current) {
                seg.unacked.insert(first.position.index..<next)
                s.segments[current] = seg
            }
            if !s.healthy { logger.info("journal writes again", metadata: ["journal.dir": "\(options.dir)"]) }
            s.healthy = true
            s.lastError = nil
            s.syncs += 1
            s.recordsSynced += batch.count
        }
        publish()
        // The shipper learns of the events before their waiters are answered (kafka mode waits on it).
        if !shipped.isEmpty && options.ships { onDurable(shipped) }
        answer(&batch, .success(positions))
        if goodOffset >= options.segmentBytes { maybeRoll(force: true) }
    }

    private func fail(_ batch: inout [Pending], _ message: String) {
        state.withLockedValue { s in
            if s.healthy { logger.error("journal write failed", metadata: ["error": "\(message)"]) }
            s.healthy = false
            s.lastError = message
        }
        publish()
        answer(&batch, .failure(JournalError(message: message)))
    }

    /// Answer a written (or failed) batch: records with a sink are gathered per sink and handed over
    /// together, before the next record with a closure is answered (a closure's answer never overtakes an
    /// earlier record's, nor follows a later one's; each sink's answers are in its append order).
    private func answer(_ batch: inout [Pending], _ result: Result<[JournalPosition], JournalError>) {
        /// The sink records met since the last closure: sink, token, index in the batch. (A struct, not a tuple: an
        /// array of tuples is destroyed through the tuple's metadata: measured 95 instructions a record; issue 13.)
        struct Entry {
            let sink: any JournalBatchSink
            let token: Int
            let index: Int
        }
        var run: [Entry] = []
        func handOver() {
            for g in grouped(run, by: { ObjectIdentifier($0.sink) }) {
                switch result {
                case .success(let positions): g[0].sink.journaled(tokens: g.map(\.token), positions: g.map { positions[$0.index] })
                case .failure: g[0].sink.failed(g.map(\.token))
                }
            }
            run.removeAll(keepingCapacity: true)
        }
        // (Each sink and completion is taken out of the batch, not copied: a copy retained the sink for each record
        // and released it when the batch was emptied; issue 13.)
        for i in batch.indices {
            if let sink = batch[i].sink.take() {
                run.append(Entry(sink: sink, token: batch[i].token, index: i))
            } else if let done = batch[i].done.take() {
                handOver()
                switch result {
                case .success(let positions): done(.success(positions[i]))
                case .failure(let e): done(.failure(e))
                }
            }
        }
        handOver()
    }

    private func maybeRoll(force: Bool) {
        guard fd >= 0 else { return }
        let events = state.withLockedValue { s in s.segments[current]?.events ?? 0 }
        let old = ContinuousClock.now - openedAt >= options.rollAfter
        guard force || (old && events > 0) else { return }
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
        state.withLockedValue { s in
            s.segments[previous]?.sealed = true
            s.segments[previous]?.sealedAt = .now
        }
        sweep()
    }

    private func openNextSegment() throws(JournalError) {
        let id = current + 1
        let path = JournalRecovery.path(dir: options.dir, id: id)
        let f = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o640)
        guard f >= 0 else { throw JournalError(message: "cannot open \(path): \(String(cString: strerror(errno)))") }
        fd = f
        current = id
        goodOffset = 0
        openedAt = .now
        state.withLockedValue { $0.segments[id] = Segment(bytes: 0, events: 0, sealed: false) }
        var buf: [UInt8] = []
        JournalCodec.encode(.snapshot(ledger.snapshot), into: &buf)
        // Releases waiting for their claim's cancellation are not in the snapshot: written again after it, so a
        // cancellation in this segment still makes them owed (helper-43: after a roll between the two, a stop
        // lost the release).
        for r in ledger.releasesAwaitingCancel.values.sorted(by: { $0.claimID < $1.claimID }) {
            JournalCodec.encode(.releaseOwed(voucher: r.voucher, user: r.user, claimID: r.claimID), into: &buf)
        }
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
        // Nothing of this run is shipped: say so before the segment holds any event (after it exists, so a
        // marker never outlives a segment that was not created and then names another one).
        if !options.ships {
            writeMarker(id, unacked: [])
            state.withLockedValue { $0.segments[id]?.markedShipped = true }
        }
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
