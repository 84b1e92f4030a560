//! Free loopback ports for the members' client and peer listeners.

use std::net::{Ipv4Addr, TcpListener};

/// `n` distinct ports that were free on 127.0.0.1 a moment ago.
///
/// Each is found by binding port 0 and reading the port the kernel chose; all listeners are
/// held until every port is known, so the ports differ, then closed for etcd to bind. Another
/// process may take one in between: the cluster then starts again on new ports.
///
/// # Panics
///
/// When loopback cannot be bound at all.
pub(crate) fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .unwrap_or_else(|e| panic!("bind 127.0.0.1:0 for a free port: {e}"))
        })
        .collect();
    listeners
        .iter()
        .map(|l| match l.local_addr() {
            Ok(addr) => addr.port(),
            Err(e) => panic!("the port of a loopback listener: {e}"),
        })
        .collect()
}
