//! Builders of histories for the checker's tests: addresses `10.0.0.n`,
//! owners by name, times in plain numbers.

use std::net::{IpAddr, Ipv4Addr};

use tonic::Code;

use super::Config;
use crate::history::{
    History, Holding, Input, Operation, Output, Time, WatchKind, WatchRecord, WatchStream,
};

/// `10.0.0.n`.
pub(crate) fn mk_addr(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
}

/// A pool of `10.0.0.1` to `10.0.0.n`.
pub(crate) fn mk_config(n: u8) -> Config {
    Config::new((1..=n).map(mk_addr))
}

/// `owner` holds `10.0.0.n`.
pub(crate) fn mk_holding(n: u8, owner: &str) -> Holding {
    Holding::new(mk_addr(n), owner)
}

/// A history of `ops`.
pub(crate) fn mk_history(ops: Vec<Operation>) -> History {
    History { ops }
}

/// A call of `client` from `from` to `to`.
pub(crate) fn mk_op(
    client: usize,
    (from, to): (Time, Time),
    input: Input,
    output: Output,
) -> Operation {
    Operation::new(client, from, to, input, output)
}

/// Allocate of any address for `owner`, answered `10.0.0.n`.
pub(crate) fn mk_allocate(client: usize, span: (Time, Time), owner: &str, n: u8) -> Operation {
    let output = Output::Allocated {
        address: mk_addr(n),
        revision: 0,
    };
    mk_op(client, span, Input::allocate(owner), output)
}

/// Allocate of `10.0.0.n` for `owner`, answered `output`.
pub(crate) fn mk_allocate_at(
    client: usize,
    span: (Time, Time),
    owner: &str,
    n: u8,
    output: Output,
) -> Operation {
    mk_op(client, span, Input::allocate_at(owner, mk_addr(n)), output)
}

/// Release by `owner`, answered with what it freed.
pub(crate) fn mk_release_owner(
    client: usize,
    span: (Time, Time),
    owner: &str,
    freed: Option<u8>,
) -> Operation {
    let output = Output::Released(freed.map(|n| mk_holding(n, owner)));
    mk_op(client, span, Input::release_owner(owner), output)
}

/// Release of `10.0.0.n`, answered with the owner it was freed from.
pub(crate) fn mk_release_address(
    client: usize,
    span: (Time, Time),
    n: u8,
    freed_from: Option<&str>,
) -> Operation {
    let output = Output::Released(freed_from.map(|o| mk_holding(n, o)));
    mk_op(client, span, Input::release_address(mk_addr(n)), output)
}

/// Get of `10.0.0.n`, answered with its holder.
pub(crate) fn mk_get_address(
    client: usize,
    span: (Time, Time),
    n: u8,
    holder: Option<&str>,
) -> Operation {
    let output = Output::Got(holder.map(|o| mk_holding(n, o)));
    mk_op(client, span, Input::get_address(mk_addr(n)), output)
}

/// Get of `owner`, answered with its address.
pub(crate) fn mk_get_owner(
    client: usize,
    span: (Time, Time),
    owner: &str,
    n: Option<u8>,
) -> Operation {
    let output = Output::Got(n.map(|n| mk_holding(n, owner)));
    mk_op(client, span, Input::get_owner(owner), output)
}

/// List, answered with `table`.
pub(crate) fn mk_list(client: usize, span: (Time, Time), table: &[(u8, &str)]) -> Operation {
    let table = table.iter().map(|(n, o)| mk_holding(*n, o)).collect();
    mk_op(client, span, Input::List, Output::Listed(table))
}

/// A call invoked at `from` whose outcome is unknown.
pub(crate) fn mk_unknown(client: usize, from: Time, input: Input) -> Operation {
    Operation {
        client,
        invoked: from,
        returned: None,
        input,
        output: Output::Unknown("UNAVAILABLE".into()),
    }
}

/// A refusal with `code`.
pub(crate) fn mk_refused(code: Code) -> Output {
    Output::Refused {
        code,
        message: format!("{code:?}"),
    }
}

/// A Watch stream of `replica`.
pub(crate) fn mk_stream(replica: &str, events: Vec<WatchRecord>) -> WatchStream {
    WatchStream {
        replica: replica.into(),
        events,
    }
}

/// A Watch event.
pub(crate) fn mk_event(kind: WatchKind, revision: u64, holding: Option<(u8, &str)>) -> WatchRecord {
    WatchRecord {
        kind,
        revision,
        holding: holding.map(|(n, o)| mk_holding(n, o)),
    }
}
