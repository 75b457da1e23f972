/// A table from non-zero 32-bit ids (channel ids, method ids) to objects, for the lookups
/// every frame makes: the calls in flight by channel and the router's methods.
///
/// `Dictionary` hashes every key with SipHash (through `Hasher`), which costs more than
/// everything else these lookups do. Here a key is hashed with one multiply (Fibonacci
/// hashing: channel ids that grow by two spread evenly) into an open-addressing array with
/// linear probing; a removal shifts the entries after it back, so there are no tombstones
/// and a lookup stops at the first empty slot. Id 0 never occurs as a key (the control
/// channel carries no call, method id 0 is reserved) and marks an empty slot.
struct IDTable<Value: AnyObject> {
    fileprivate struct Slot {
        var key: UInt32
        var value: Value?
    }

    private var slots: ContiguousArray<Slot>
    /// 32 − log2(slots.count): the multiply's top bits index the array.
    private var shift: UInt32
    /// Entries in the table.
    private(set) var count = 0

    private static var minimumCapacity: Int { 16 }

    init() {
        slots = ContiguousArray(repeating: Slot(key: 0, value: nil), count: Self.minimumCapacity)
        shift = 32 - UInt32(Self.minimumCapacity.trailingZeroBitCount)
    }

    var isEmpty: Bool { count == 0 }

    @inline(__always)
    private func home(_ key: UInt32) -> Int { Int((key &* 0x9E37_79B1) >> shift) }

    /// The slot holding `key`, or nil.
    @inline(__always)
    private func find(_ key: UInt32) -> Int? {
        let mask = slots.count - 1
        var index = home(key)
        while true {
            let stored = slots[index].key
            if stored == key { return index }
            if stored == 0 { return nil }
            index = (index + 1) & mask
        }
    }

    /// The value for `key`; setting nil removes it. `key` must not be 0.
    subscript(key: UInt32) -> Value? {
        get {
            guard key != 0, let index = find(key) else { return nil }
            return slots[index].value
        }
        set {
            if let newValue { insert(key, newValue) } else { remove(key) }
        }
    }

    private mutating func insert(_ key: UInt32, _ value: Value) {
        precondition(key != 0, "IDTable: id 0 cannot be a key")
        // Grown first (a replacement may grow a little early), so one walk of the probe run
        // finds either the key or the empty slot it goes into.
        if (count + 1) * 4 > slots.count * 3 { grow() }
        let mask = slots.count - 1
        var index = home(key)
        while true {
            let stored = slots[index].key
            if stored == key {
                slots[index].value = value
                return
            }
            if stored == 0 {
                slots[index] = Slot(key: key, value: value)
                count += 1
                return
            }
            index = (index + 1) & mask
        }
    }

    /// Removes `key`'s entry and returns its value (nil when there was none).
    @discardableResult
    mutating func removeValue(forKey key: UInt32) -> Value? {
        guard key != 0, let index = find(key) else { return nil }
        let removed = slots[index].value
        delete(at: index)
        return removed
    }

    /// Removes `key`'s entry, if there is one, without handing its value out (one
    /// reference-count update less than ``removeValue(forKey:)``).
    mutating func remove(_ key: UInt32) {
        guard key != 0, let index = find(key) else { return }
        delete(at: index)
    }

    private mutating func delete(at index: Int) {
        var hole = index
        let mask = slots.count - 1
        var next = hole
        // Backward-shift deletion: move each following entry of the probe run into the hole
        // when its home slot does not lie (cyclically) after the hole. Swapping moves the
        // entries without touching reference counts; the deleted entry ends in the last hole.
        while true {
            next = (next + 1) & mask
            let key = slots[next].key
            if key == 0 { break }
            let ideal = home(key)
            let stays = hole <= next ? (hole < ideal && ideal <= next) : (hole < ideal || ideal <= next)
            if !stays {
                slots.swapAt(hole, next)
                hole = next
            }
        }
        slots[hole] = Slot(key: 0, value: nil)
        count -= 1
    }

    private mutating func grow() {
        let old = slots
        slots = ContiguousArray(repeating: Slot(key: 0, value: nil), count: old.count * 2)
        shift -= 1
        count = 0
        for slot in old where slot.key != 0 { insert(slot.key, slot.value!) }
    }

    /// Empties the table (and gives back the memory of a large one).
    mutating func removeAll() {
        self = IDTable()
    }

    /// Every entry, in no particular order (a copy: the table may change while it is used).
    var entries: [(key: UInt32, value: Value)] {
        var result: [(key: UInt32, value: Value)] = []
        result.reserveCapacity(count)
        for slot in slots where slot.key != 0 { result.append((slot.key, slot.value!)) }
        return result
    }

    /// Every value, in no particular order (a copy).
    var values: [Value] {
        var result: [Value] = []
        result.reserveCapacity(count)
        for slot in slots where slot.key != 0 { result.append(slot.value!) }
        return result
    }
}

extension IDTable: Sendable where Value: Sendable {}
extension IDTable.Slot: Sendable where Value: Sendable {}
