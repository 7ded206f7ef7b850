/// `items` in groups of equal `key` (an object's identity: a sink, an event loop), groups in the order
/// their first item comes, each group's items in their order. For handing a batch's answers to each
/// receiver in one call.
///
/// A batch usually has one receiver, or a few (a voucher's runtime, an event loop per core): that case
/// is the array itself, and a few keys are looked up by a scan; a map is built only past 16 groups
/// (issue 13: the map per call was a tenth of the journal thread's answer work).
public func grouped<T>(_ items: [T], by key: (T) -> ObjectIdentifier) -> [[T]] {
    guard let first = items.first else { return [] }
    let k0 = key(first)
    if items.allSatisfy({ key($0) == k0 }) { return [items] }
    var keys: [ObjectIdentifier] = []
    var groups: [[T]] = []
    var index: [ObjectIdentifier: Int]? = nil
    for item in items {
        let k = key(item)
        let found: Int? = if let index { index[k] } else { keys.firstIndex(of: k) }
        if let i = found {
            groups[i].append(item)
            continue
        }
        keys.append(k)
        groups.append([item])
        if index != nil {
            index![k] = groups.count - 1
        } else if keys.count == 16 {
            index = Dictionary(uniqueKeysWithValues: zip(keys, keys.indices))
        }
    }
    return groups
}

/// Calls `body` with each run of consecutive items of `items` whose `key`s are equal, in order (for a batch
/// sorted by its receivers: each receiver's run, with no array made per group).
@inlinable
public func forEachRun<T, Key: Equatable>(_ items: ArraySlice<T>, by key: (T) -> Key, _ body: (ArraySlice<T>) -> Void) {
    var start = items.startIndex
    while start < items.endIndex {
        let k = key(items[start])
        var end = start + 1
        while end < items.endIndex, key(items[end]) == k { end += 1 }
        body(items[start..<end])
        start = end
    }
}
