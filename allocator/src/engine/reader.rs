//! The read side: allocations by owner and by address, List pages, pool
//! reports and the change history as events, read from the committed state
//! of the store, on any thread, never waiting for the writer.

use std::{net::IpAddr, sync::Arc, sync::atomic::Ordering};

use crate::{
    addresses::intervals::Span,
    addresses::pool::{Family, Pools, to_int},
    engine::stats::Stats,
    error::{Error, Result},
    model::{Allocation, Event, ListArgs, Page, PoolReport, PoolsReport, Record, Scope},
    policy::{checks::MAX_PAGE_SIZE, scope},
    store::{Scan, Store},
};

/// Most records one List call reads before it returns a (possibly short) page.
pub const MAX_SCAN_PER_PAGE: usize = 10_000;
/// Most allocations outside pools that a pool report lists.
pub const OUTSIDE_LISTED: usize = 100;

/// Reads over the store; clones share it.
#[derive(Clone)]
pub struct Reader {
    store: Store,
    pools: Arc<Pools>,
    stats: Arc<Stats>,
}

impl Reader {
    /// Reads over `store`, placing addresses in `pools`, with the writer's
    /// counters `stats`.
    pub fn new(store: Store, pools: Arc<Pools>, stats: Arc<Stats>) -> Reader {
        Reader {
            store,
            pools,
            stats,
        }
    }

    /// The configured pools.
    pub fn pools(&self) -> &Arc<Pools> {
        &self.pools
    }

    /// Shared counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Waits up to `limit` until the store has shown every change up to
    /// `revision`, which a client may have got from another allocator
    /// sharing the store; the revision it has shown. Blocks.
    pub fn catch_up(&self, revision: u64, limit: std::time::Duration) -> Result<u64> {
        Ok(self.store.catch_up(revision, limit)?)
    }

    /// Whether the store can serve now; the reason when it cannot.
    pub fn health(&self) -> std::result::Result<(), String> {
        self.store.health()
    }

    fn allocation(&self, address: IpAddr, record: Record) -> Allocation {
        Allocation::at(&self.pools, address, record)
    }

    /// The allocation held by an owner, if the caller may read it.
    pub fn get_by_owner(&self, owner: &str, scope: &Scope) -> Result<Allocation> {
        let not_found = || Error::NotFound {
            what: format!("owner {owner:?}"),
        };
        let ip = self.store.owner_address(owner)?.ok_or_else(not_found)?;
        let record = self.store.get(ip)?.ok_or_else(not_found)?;
        let allocation = self.allocation(ip, record);
        let what = format!("the allocation of owner {owner:?}");
        scope::check_read(scope, what, owner, allocation.pool.as_deref())?;
        Ok(allocation)
    }

    /// The allocation at an address, if the caller may read it.
    pub fn get_by_address(&self, ip: IpAddr, scope: &Scope) -> Result<Allocation> {
        let record = self.store.get(ip)?.ok_or_else(|| Error::NotFound {
            what: format!("address {ip}"),
        })?;
        let allocation = self.allocation(ip, record);
        let what = format!("the allocation at {ip}");
        let owner = &allocation.record.owner;
        scope::check_read(scope, what, owner, allocation.pool.as_deref())?;
        Ok(allocation)
    }

    /// One page of the allocations the caller may read, by address.
    pub fn list(&self, args: &ListArgs) -> Result<Page> {
        let ListArgs {
            pool,
            owner_prefix,
            scope,
            page_size,
            after,
        } = args;
        let page_size = (*page_size).clamp(1, MAX_PAGE_SIZE);
        let mut page = Page::default();
        let mut last_seen = None;
        for (scanned, entry) in self.entries(pool.as_deref(), *after)?.enumerate() {
            if scanned == MAX_SCAN_PER_PAGE {
                page.next_after = last_seen;
                return Ok(page);
            }
            let (ip, record) = entry?;
            last_seen = Some(ip);
            if !record.owner.starts_with(owner_prefix.as_str()) {
                continue;
            }
            let allocation = self.allocation(ip, record);
            if scope::sees(scope, &allocation.record.owner, allocation.pool.as_deref()) {
                page.allocations.push(allocation);
                if page.allocations.len() == page_size {
                    page.next_after = Some(ip);
                    return Ok(page);
                }
            }
        }
        Ok(page)
    }

    /// The committed allocations after `after`, by address: of one pool
    /// (its covered spans) or of every one.
    fn entries(&self, pool: Option<&str>, after: Option<IpAddr>) -> Result<Scan<(IpAddr, Record)>> {
        let Some(name) = pool else {
            return Ok(self.store.scan_after(after));
        };
        let index = self
            .pools
            .index_of(name)
            .ok_or_else(|| Error::UnknownPool {
                pool: name.to_string(),
            })?;
        let pool = self.pools.at(index);
        let store = self.store.clone();
        let after = after.map(to_int);
        let spans: Vec<(Family, Span)> = Family::ALL
            .into_iter()
            .flat_map(|f| pool.covered(f).iter().map(move |s| (f, *s)))
            .collect();
        Ok(Box::new(spans.into_iter().flat_map(
            move |(family, span)| {
                // Where this span's scan starts, or None when the page token is
                // already past it.
                let first = match after {
                    Some((f, x)) if f == family && x >= span.last => None,
                    Some((f, x)) if f == family => Some((x + 1).max(span.first)),
                    Some((f, _)) if f > family => None,
                    _ => Some(span.first),
                };
                let store = store.clone();
                first
                    .into_iter()
                    .flat_map(move |first| store.scan(family, first, span.last))
            },
        )))
    }

    /// Figures of every pool, and the first allocations outside them.
    pub fn pools_report(&self) -> Result<PoolsReport> {
        let pools = self
            .pools
            .iter()
            .enumerate()
            .map(|(index, pool)| {
                let size = pool.size();
                let usable_taken =
                    u128::from(self.stats.usable_in_pool[index].load(Ordering::Relaxed));
                PoolReport {
                    index,
                    size,
                    allocated: self.stats.in_pool[index].load(Ordering::Relaxed),
                    free: size.saturating_sub(usable_taken),
                }
            })
            .collect();
        let mut outside = Vec::new();
        'families: for family in Family::ALL {
            for span in self.pools.outside(family) {
                for entry in self.store.scan(family, span.first, span.last) {
                    if outside.len() == OUTSIDE_LISTED {
                        break 'families;
                    }
                    let (ip, record) = entry?;
                    outside.push(self.allocation(ip, record));
                }
            }
        }
        Ok(PoolsReport {
            pools,
            outside_count: self.stats.outside.load(Ordering::Relaxed),
            outside,
        })
    }

    /// The oldest revision a watch can resume from, given the last one
    /// `published`.
    pub fn oldest_resumable(&self, published: u64) -> Result<u64> {
        Ok(match self.store.first_change()? {
            Some(first) => first.saturating_sub(1).min(published),
            None => published,
        })
    }

    /// The changes after `after` up to `last`, which the history must
    /// cover.
    pub fn read_changes(&self, after: u64, last: u64) -> Result<Vec<Event>> {
        let out = self
            .store
            .changes(after, last)
            .map(|change| Ok(Event::from_change(&self.pools, change?)))
            .collect::<Result<Vec<_>>>()?;
        // Checked after reading: history trimmed meanwhile shows here.
        let oldest = self.oldest_resumable(last)?;
        if after < oldest {
            return Err(Error::HistoryTrimmed {
                since: after,
                oldest,
            });
        }
        Ok(out)
    }
}
