import Rapace

/// Starts `first` and `second`, the two ends of one connection, and waits for both
/// handshakes; throws `first`'s error if its handshake failed, else `second`'s.
///
/// Both starts are handed to the sessions' loops before this task waits, so the handshake
/// runs on the reactors alone. Starting one end from a child task (`async let`) needs a free
/// cooperative thread first: at the start of a full run, with a few hundred tests beginning
/// on the two threads of a two-core machine, that took longer than the other end's 5 s
/// handshake timeout.
package func startTogether(_ first: Session, _ second: Session) async throws(RPCError) {
    let results = await withCheckedContinuation { (continuation: CheckedContinuation<[Result<Void, RPCError>], Never>) in
        let pending = Locked<[Result<Void, RPCError>?]>([nil, nil])
        @Sendable func record(_ index: Int, _ result: Result<Void, RPCError>) {
            let both = pending.withLock { results -> [Result<Void, RPCError>]? in
                results[index] = result
                let done = results.compactMap { $0 }
                return done.count == 2 ? done : nil
            }
            if let both { continuation.resume(returning: both) }
        }
        for (index, session) in [first, second].enumerated() {
            let started = session.reactor.execute { session.start { record(index, $0) } }
            if !started { record(index, .failure(Session.reactorGone)) }
        }
    }
    for result in results { try result.get() }
}
