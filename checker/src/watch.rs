//! Checking what a watch delivered, and what a read at a past revision returned, against the
//! writes that were made ([`check_scan_at`] for the reads).
//!
//! A watch of keys `[start, end)` from revision `from` must deliver every change of a watched
//! key with a revision at or above `from`, exactly once, in revision order (keys in order
//! within a revision), each as it was made; and nothing else. [`check_watch`] decides that for
//! the part of the watch up to a revision `through` that every write of interest is known at:
//!
//! - an acknowledged write (its revision known) of a watched key at a revision in
//!   `[from, through]` must be delivered, with its key, its value (or as a delete) and its
//!   revision; a delete that removed nothing changes nothing and is not delivered;
//! - a write whose result is unknown may have been made at any revision: its change may be
//!   delivered once, or not at all;
//! - an event that matches no write is a phantom; an event at or before the previous one
//!   (revision, then key) is a repeat or out of order.

use std::collections::{BTreeMap, BTreeSet};

use crate::history::{in_range, Shown};

/// A write a client made: a put (`value` set) or a delete (`None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub outcome: WriteOutcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Applied at this revision. For a delete, `existed` says whether it removed the key.
    Acked { revision: u64, existed: bool },
    /// May or may not have applied (a timeout).
    Unknown,
}

/// One change a watch delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub revision: u64,
    pub key: Vec<u8>,
    /// The new value; `None` for a delete.
    pub value: Option<Vec<u8>>,
}

/// Checks `events` (in the order delivered) of a watch of `[start, end)` (an empty `end`: no
/// upper bound) from revision `from`, up to revision `through`, against `writes`; the error
/// says which event or write breaks which rule.
pub fn check_watch(
    writes: &[Write],
    events: &[Event],
    (start, end): (&[u8], &[u8]),
    from: u64,
    through: u64,
) -> Result<(), String> {
    let show = |e: &Event| {
        format!(
            "{} {} at revision {}",
            Shown(&e.key),
            e.value
                .as_ref()
                .map_or("deleted".to_string(), |v| format!("= {}", Shown(v))),
            e.revision
        )
    };
    let mut previous: Option<&Event> = None;
    for e in events.iter().filter(|e| e.revision <= through) {
        if !in_range(&e.key, start, end) {
            return Err(format!("event {} is outside the watched range", show(e)));
        }
        if e.revision < from {
            return Err(format!(
                "event {} is before the watch's revision {from}",
                show(e)
            ));
        }
        if let Some(p) = previous {
            if (e.revision, &e.key) <= (p.revision, &p.key) {
                return Err(format!(
                    "event {} comes after {}: repeated or out of order",
                    show(e),
                    show(p)
                ));
            }
        }
        previous = Some(e);
    }
    // Acknowledged changes by (revision, key); unknown writes by (key, value), each usable once.
    let mut acked: BTreeMap<(u64, &[u8]), Option<&[u8]>> = BTreeMap::new();
    let mut unknown: BTreeMap<(&[u8], Option<&[u8]>), usize> = BTreeMap::new();
    for w in writes.iter().filter(|w| in_range(&w.key, start, end)) {
        match w.outcome {
            WriteOutcome::Acked { existed: false, .. } if w.value.is_none() => {}
            WriteOutcome::Acked { revision, .. } => {
                acked.insert((revision, &w.key), w.value.as_deref());
            }
            WriteOutcome::Unknown => {
                *unknown.entry((&w.key, w.value.as_deref())).or_insert(0) += 1;
            }
        }
    }
    let mut delivered = BTreeSet::new();
    for e in events.iter().filter(|e| e.revision <= through) {
        match acked.get(&(e.revision, &e.key[..])) {
            Some(value) if *value == e.value.as_deref() => {
                delivered.insert((e.revision, &e.key[..]));
            }
            Some(value) => {
                return Err(format!(
                    "event {} does not match the write made there ({})",
                    show(e),
                    value.map_or("a delete".to_string(), |v| format!("= {}", Shown(v)))
                ))
            }
            None => match unknown.get_mut(&(&e.key[..], e.value.as_deref())) {
                Some(n) if *n > 0 => *n -= 1,
                _ => return Err(format!("event {} matches no write: a phantom", show(e))),
            },
        }
    }
    for (&(revision, key), value) in acked.range((from, &[][..])..) {
        if revision > through {
            break;
        }
        if !delivered.contains(&(revision, key)) {
            return Err(format!(
                "the acknowledged write {} {} at revision {revision} was not delivered",
                Shown(key),
                value.map_or("(delete)".to_string(), |v| format!("= {}", Shown(v)))
            ));
        }
    }
    Ok(())
}

/// A key as a read at a past revision returned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScannedKey {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The revision of the write that gave it this value.
    pub mod_revision: u64,
}

/// Checks what a range read of `[start, end)` at `revision` returned (`kvs`, in the order
/// returned) against `writes`, every write made to the keys of that range (with their
/// revisions when acknowledged). The error names the key and the rule it breaks:
///
/// - keys are in the range and in strictly increasing order;
/// - a key's `mod_revision` is at or below `revision`, and its value is the one written
///   there: by the acknowledged write at that revision, or else by a write whose result is
///   unknown (whose revision is not known);
/// - no acknowledged write of the key has a revision after its `mod_revision` and at or
///   below `revision` (the read would be stale);
/// - a key whose last acknowledged write at or below `revision` is a put is returned, unless
///   a delete of it with an unknown result may have come between.
pub fn check_scan_at(
    writes: &[Write],
    (start, end): (&[u8], &[u8]),
    revision: u64,
    kvs: &[ScannedKey],
) -> Result<(), String> {
    // Per key: acknowledged writes by revision, and unknown ones.
    let mut acked: BTreeMap<&[u8], BTreeMap<u64, Option<&[u8]>>> = BTreeMap::new();
    let mut unknown: BTreeSet<(&[u8], Option<&[u8]>)> = BTreeSet::new();
    for w in writes.iter().filter(|w| in_range(&w.key, start, end)) {
        match w.outcome {
            WriteOutcome::Acked { revision, .. } => {
                acked
                    .entry(&w.key)
                    .or_default()
                    .insert(revision, w.value.as_deref());
            }
            WriteOutcome::Unknown => {
                unknown.insert((&w.key, w.value.as_deref()));
            }
        }
    }
    let none = BTreeMap::new();
    let mut previous: Option<&[u8]> = None;
    for kv in kvs {
        let shown = format!(
            "{} = {} (mod revision {})",
            Shown(&kv.key),
            Shown(&kv.value),
            kv.mod_revision
        );
        if !in_range(&kv.key, start, end) {
            return Err(format!("{shown} is outside the range read"));
        }
        if previous.is_some_and(|p| p >= &kv.key[..]) {
            return Err(format!("{shown} is out of order or repeated"));
        }
        previous = Some(&kv.key);
        if kv.mod_revision > revision {
            return Err(format!("{shown} was written after revision {revision}"));
        }
        let of_key = acked.get(&kv.key[..]).unwrap_or(&none);
        match of_key.get(&kv.mod_revision) {
            Some(Some(v)) if *v == &kv.value[..] => {}
            Some(other) => {
                return Err(format!(
                    "{shown} does not match the write made there ({})",
                    other.map_or("a delete".to_string(), |v| format!("= {}", Shown(v)))
                ))
            }
            None if unknown.contains(&(&kv.key[..], Some(&kv.value[..]))) => {}
            None => return Err(format!("{shown} matches no write: a phantom")),
        }
        let later = of_key.range(kv.mod_revision + 1..).next();
        if let Some((r, _)) = later.filter(|(r, _)| **r <= revision) {
            return Err(format!(
                "{shown} is stale at revision {revision}: the acknowledged write at revision \
                 {r} came after it"
            ));
        }
    }
    for (key, of_key) in &acked {
        let Some((r, Some(value))) = of_key.range(..=revision).next_back() else {
            continue; // never written by then, or deleted last
        };
        let returned = kvs.iter().any(|kv| &kv.key[..] == *key);
        if !returned && !unknown.contains(&(*key, None)) {
            return Err(format!(
                "{} = {} (acknowledged at revision {r}) is missing from the read at revision \
                 {revision}",
                Shown(key),
                Shown(value)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str, revision: u64) -> Write {
        Write {
            key: key.into(),
            value: Some(value.into()),
            outcome: WriteOutcome::Acked {
                revision,
                existed: true,
            },
        }
    }

    fn event(revision: u64, key: &str, value: Option<&str>) -> Event {
        Event {
            revision,
            key: key.into(),
            value: value.map(Into::into),
        }
    }

    const ALL: (&[u8], &[u8]) = (b"a/", b"a0");

    #[test]
    fn a_complete_watch_passes() {
        let writes = vec![
            put("a/1", "x", 3),
            put("b", "y", 4),
            Write {
                key: "a/1".into(),
                value: None,
                outcome: WriteOutcome::Acked {
                    revision: 5,
                    existed: true,
                },
            },
            Write {
                key: "a/2".into(),
                value: None,
                outcome: WriteOutcome::Acked {
                    revision: 6,
                    existed: false,
                },
            },
        ];
        let events = vec![event(3, "a/1", Some("x")), event(5, "a/1", None)];
        assert_eq!(check_watch(&writes, &events, ALL, 1, 10), Ok(()));
        // From a later revision the earlier change is not owed.
        assert_eq!(check_watch(&writes, &events[1..], ALL, 4, 10), Ok(()));
    }

    #[test]
    fn a_skipped_event_fails() {
        let writes = vec![put("a/1", "x", 3), put("a/2", "y", 7)];
        let events = vec![event(3, "a/1", Some("x"))];
        let e = check_watch(&writes, &events, ALL, 1, 10).unwrap_err();
        assert!(
            e.contains("\"a/2\" = \"y\" at revision 7 was not delivered"),
            "{e}"
        );
        // Not owed yet if the watch was checked only through revision 6.
        assert_eq!(check_watch(&writes, &events, ALL, 1, 6), Ok(()));
    }

    #[test]
    fn a_repeated_or_reordered_event_fails() {
        let writes = vec![put("a/1", "x", 3), put("a/2", "y", 7)];
        let twice = vec![
            event(3, "a/1", Some("x")),
            event(3, "a/1", Some("x")),
            event(7, "a/2", Some("y")),
        ];
        let e = check_watch(&writes, &twice, ALL, 1, 10).unwrap_err();
        assert!(e.contains("repeated or out of order"), "{e}");
        let swapped = vec![event(7, "a/2", Some("y")), event(3, "a/1", Some("x"))];
        assert!(check_watch(&writes, &swapped, ALL, 1, 10).is_err());
    }

    #[test]
    fn phantoms_wrong_values_and_foreign_keys_fail() {
        let writes = vec![put("a/1", "x", 3)];
        let phantom = vec![event(3, "a/1", Some("x")), event(4, "a/9", Some("z"))];
        assert!(check_watch(&writes, &phantom, ALL, 1, 10)
            .unwrap_err()
            .contains("phantom"));
        let wrong = vec![event(3, "a/1", Some("other"))];
        assert!(check_watch(&writes, &wrong, ALL, 1, 10)
            .unwrap_err()
            .contains("does not match"));
        let foreign = vec![event(3, "a/1", Some("x")), event(4, "b", Some("y"))];
        assert!(check_watch(&writes, &foreign, ALL, 1, 10)
            .unwrap_err()
            .contains("outside"));
    }

    #[test]
    fn an_unknown_write_may_be_delivered_once_or_not_at_all() {
        let writes = vec![
            put("a/1", "x", 3),
            Write {
                key: "a/2".into(),
                value: Some("maybe".into()),
                outcome: WriteOutcome::Unknown,
            },
        ];
        let without = vec![event(3, "a/1", Some("x"))];
        assert_eq!(check_watch(&writes, &without, ALL, 1, 10), Ok(()));
        let with = vec![event(3, "a/1", Some("x")), event(8, "a/2", Some("maybe"))];
        assert_eq!(check_watch(&writes, &with, ALL, 1, 10), Ok(()));
        let twice = vec![
            event(3, "a/1", Some("x")),
            event(8, "a/2", Some("maybe")),
            event(9, "a/2", Some("maybe")),
        ];
        assert!(check_watch(&writes, &twice, ALL, 1, 10).is_err());
    }
    fn scanned(key: &str, value: &str, mod_revision: u64) -> ScannedKey {
        ScannedKey {
            key: key.into(),
            value: value.into(),
            mod_revision,
        }
    }

    fn delete(key: &str, revision: u64) -> Write {
        Write {
            key: key.into(),
            value: None,
            outcome: WriteOutcome::Acked {
                revision,
                existed: true,
            },
        }
    }

    #[test]
    fn a_scan_at_a_past_revision_sees_the_writes_up_to_it() {
        let writes = vec![
            put("a/1", "x", 3),
            put("a/2", "y", 4),
            put("a/1", "x2", 6),
            delete("a/2", 7),
        ];
        let at5 = vec![scanned("a/1", "x", 3), scanned("a/2", "y", 4)];
        assert_eq!(check_scan_at(&writes, ALL, 5, &at5), Ok(()));
        let at7 = vec![scanned("a/1", "x2", 6)];
        assert_eq!(check_scan_at(&writes, ALL, 7, &at7), Ok(()));
        let e = check_scan_at(&writes, ALL, 6, &at7[..1]).unwrap_err();
        assert!(e.contains("missing"), "{e}");
        assert_eq!(check_scan_at(&writes, ALL, 2, &[]), Ok(()));
    }

    #[test]
    fn a_scan_that_misses_a_committed_key_or_reads_stale_fails() {
        let writes = vec![put("a/1", "x", 3), put("a/2", "y", 4), put("a/1", "x2", 6)];
        let missing = vec![scanned("a/1", "x", 3)];
        let e = check_scan_at(&writes, ALL, 5, &missing).unwrap_err();
        assert!(
            e.contains("\"a/2\" = \"y\" (acknowledged at revision 4) is missing"),
            "{e}"
        );
        let stale = vec![scanned("a/1", "x", 3), scanned("a/2", "y", 4)];
        let e = check_scan_at(&writes, ALL, 6, &stale).unwrap_err();
        assert!(e.contains("stale at revision 6"), "{e}");
        let future = vec![scanned("a/1", "x2", 6), scanned("a/2", "y", 4)];
        let e = check_scan_at(&writes, ALL, 5, &future).unwrap_err();
        assert!(e.contains("written after revision 5"), "{e}");
        let wrong = vec![scanned("a/1", "other", 3), scanned("a/2", "y", 4)];
        assert!(check_scan_at(&writes, ALL, 5, &wrong)
            .unwrap_err()
            .contains("does not match"));
        let phantom = vec![
            scanned("a/1", "x", 3),
            scanned("a/2", "y", 4),
            scanned("a/3", "z", 5),
        ];
        assert!(check_scan_at(&writes, ALL, 5, &phantom)
            .unwrap_err()
            .contains("phantom"));
        let unordered = vec![scanned("a/2", "y", 4), scanned("a/1", "x", 3)];
        assert!(check_scan_at(&writes, ALL, 5, &unordered).is_err());
    }

    #[test]
    fn unknown_writes_may_or_may_not_show_in_a_past_scan() {
        let mut writes = vec![put("a/1", "x", 3)];
        writes.push(Write {
            key: "a/1".into(),
            value: None,
            outcome: WriteOutcome::Unknown,
        });
        writes.push(Write {
            key: "a/2".into(),
            value: Some("maybe".into()),
            outcome: WriteOutcome::Unknown,
        });
        assert_eq!(
            check_scan_at(&writes, ALL, 9, &[]),
            Ok(()),
            "a/1 maybe deleted"
        );
        let both = vec![scanned("a/1", "x", 3), scanned("a/2", "maybe", 8)];
        assert_eq!(check_scan_at(&writes, ALL, 9, &both), Ok(()));
    }
}
