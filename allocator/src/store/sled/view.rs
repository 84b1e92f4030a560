//! What the sled engine's committed reads see: the database, except for
//! the keys a failed flush wrote, which read as they were before it
//! ([`Hidden`]). sled applies a batch in memory before it writes it out, and
//! after a failed write it refuses every later one, so the batch of a flush
//! that failed may stay in its memory until the database is reopened.

use std::{
    iter::Peekable,
    ops::{Bound, RangeBounds},
    sync::Arc,
};

use sled::IVec;

use super::staged::Hidden;

/// A range of keys.
pub(super) type Range = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// Every key that starts with `prefix`.
pub(super) fn prefix(prefix: u8) -> Range {
    (
        Bound::Included(vec![prefix]),
        Bound::Excluded(vec![prefix.saturating_add(1)]),
    )
}

/// The keys from `first` to `last`, both included.
pub(super) fn inclusive(first: impl Into<Vec<u8>>, last: impl Into<Vec<u8>>) -> Range {
    (Bound::Included(first.into()), Bound::Included(last.into()))
}

/// The database as the committed reads see it.
#[derive(Clone)]
pub(super) struct View {
    pub db: sled::Db,
    pub hidden: Arc<Hidden>,
}

impl View {
    /// The committed value of `key`.
    pub fn get(&self, key: &[u8]) -> sled::Result<Option<IVec>> {
        match self.hidden.get(key) {
            Some(before) => Ok(before.clone()),
            None => self.db.get(key),
        }
    }

    /// The committed entries of `range`, by key.
    pub fn range(&self, range: Range) -> Merged {
        // Hidden keys are few (one failed batch's) and usually none.
        let hidden: Vec<(Vec<u8>, Option<IVec>)> = self
            .hidden
            .iter()
            .filter(|(key, _)| range.contains(*key))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        Merged {
            db: self.db.range(range).peekable(),
            hidden: hidden.into_iter().peekable(),
            failed: false,
        }
    }
}

/// The entries of a range of the database merged with the hidden values of
/// the same range: a hidden value takes the place of the database's, and a
/// hidden `None` drops the key. It ends after its first error (a sled
/// iterator over a database that failed a write may repeat one forever).
pub(super) struct Merged {
    db: Peekable<sled::Iter>,
    hidden: Peekable<std::vec::IntoIter<(Vec<u8>, Option<IVec>)>>,
    failed: bool,
}

impl Iterator for Merged {
    type Item = sled::Result<(IVec, IVec)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            let order = match (self.db.peek(), self.hidden.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) => {
                    self.failed = true;
                    return self.db.next();
                }
                (Some(Ok(_)), None) => return self.db.next(),
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(Ok((db_key, _))), Some((hidden_key, _))) => {
                    db_key.as_ref().cmp(hidden_key.as_slice())
                }
            };
            match order {
                std::cmp::Ordering::Less => return self.db.next(),
                std::cmp::Ordering::Equal => {
                    // The database's value is the failed flush's.
                    self.db.next();
                }
                std::cmp::Ordering::Greater => {}
            }
            if let Some((key, Some(value))) = self.hidden.next() {
                return Some(Ok((IVec::from(key), value)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view of a database holding `entries`, with `hidden` values.
    fn mk_view(entries: &[(&str, &str)], hidden: &[(&str, Option<&str>)]) -> View {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .expect("a temporary database");
        for (key, value) in entries {
            db.insert(key.as_bytes(), value.as_bytes()).expect("insert");
        }
        let hidden = hidden
            .iter()
            .map(|(key, value)| (key.as_bytes().to_vec(), value.map(IVec::from)))
            .collect();
        View {
            db,
            hidden: Arc::new(hidden),
        }
    }

    fn mk_range(first: &str, last: &str) -> Range {
        inclusive(first.as_bytes(), last.as_bytes())
    }

    fn read(merged: Merged) -> Vec<(String, String)> {
        merged
            .map(|entry| {
                let (k, v) = entry.expect("entry");
                let text = |b: &[u8]| String::from_utf8_lossy(b).to_string();
                (text(&k), text(&v))
            })
            .collect()
    }

    #[test]
    fn hidden_values_replace_insert_and_drop_keys_in_order() {
        let view = mk_view(
            &[("a", "1"), ("c", "new"), ("d", "added"), ("f", "6")],
            &[
                ("b", Some("2")),
                ("c", Some("3")),
                ("d", None),
                ("e", Some("5")),
            ],
        );
        let expected = [("a", "1"), ("b", "2"), ("c", "3"), ("e", "5"), ("f", "6")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(read(view.range(mk_range("a", "z"))), expected);
        assert_eq!(
            read(view.range(mk_range("c", "e"))),
            expected[2..4].to_vec(),
            "hidden keys outside the range stay out"
        );
        assert_eq!(view.get(b"c").expect("get"), Some(IVec::from("3")));
        assert_eq!(view.get(b"d").expect("get"), None);
        assert_eq!(view.get(b"f").expect("get"), Some(IVec::from("6")));
    }

    #[test]
    fn without_hidden_values_a_range_reads_the_database() {
        let view = mk_view(&[("a", "1"), ("b", "2")], &[]);
        assert_eq!(
            read(view.range(prefix(b'a'))),
            vec![("a".into(), "1".into())]
        );
        assert_eq!(read(view.range(mk_range("a", "b"))).len(), 2);
    }
}
