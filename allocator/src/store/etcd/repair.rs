//! Orphaned owner keys ([`Orphan`]): an owner key whose address key does
//! not name its owner, left by hand, by an older version or by a fault.
//! Every allocation of that owner would fail, since it requires the owner
//! key absent; so when the writer's decisions come across one
//! (`staged.rs`), the flush deletes it first, with a transaction that
//! applies only while the owner key has the mod revision the copy shows
//! and the address key it names is as the copy shows it (so still does not
//! name the owner), and says so in a warning naming the key. The writer
//! then decides again, on a copy that has caught up.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::{Inner, keys::Keys, mirror::Orphan, send_txn};
use crate::store::{Result, StoreError};

/// The transaction that deletes `orphan`'s owner key while it is still an
/// orphan, as the copy showed it.
fn txn(keys: &Keys, orphan: &Orphan) -> Txn {
    let key = keys.owner(&orphan.owner);
    let mut compares = vec![Compare::mod_revision(
        key.clone(),
        CompareOp::Equal,
        orphan.key.mod_revision,
    )];
    if let Some(ip) = orphan.names {
        let address = keys.address(ip);
        compares.push(match &orphan.address {
            Some(entry) => Compare::mod_revision(address, CompareOp::Equal, entry.mod_revision),
            None => Compare::version(address, CompareOp::Equal, 0),
        });
    }
    Txn::new()
        .when(compares)
        .and_then(vec![TxnOp::delete(key, None)])
}

/// Deletes the owner key of each of `orphans` that is still an orphan in
/// etcd.
pub(super) async fn delete(inner: &Inner, orphans: &[Orphan]) -> Result<()> {
    for orphan in orphans {
        let key = String::from_utf8_lossy(&inner.keys.owner(&orphan.owner)).into_owned();
        let holder = orphan.address.as_ref().map(|e| e.record.owner.as_str());
        let response = send_txn(&inner.members, txn(&inner.keys, orphan))
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!(
                    "deleting the orphaned owner key {key} (nothing else of this flush was \
                     sent): {e}"
                ))
            })?;
        if response.succeeded() {
            tracing::warn!(
                key = %key,
                names = %orphan.key.value,
                holder = holder.unwrap_or("nobody"),
                "deleted the owner key {key}: the address it names is not its owner's"
            );
        } else {
            tracing::info!(
                key = %key,
                "the orphaned owner key {key} changed before it could be deleted"
            );
        }
    }
    Ok(())
}
