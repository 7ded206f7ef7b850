/// `items` in groups of equal `key` (an object's identity: a sink, an event loop), groups in the order
/// their first item comes, each group's items in their order. For handing a batch's answers to each
/// receiver in one call.
public func grouped<T>(_ items: [T], by key: (T) -> ObjectIdentifier) -> [[T]] {
    var groups: [[T]] = []
    var index: [ObjectIdentifier: Int] = [:]
    for item in items {
        let k = key(item)
        if let i = index[k] {
            groups[i].append(item)
        } else {
            index[k] = groups.count
            groups.append([item])
        }
    }
    return groups
}
