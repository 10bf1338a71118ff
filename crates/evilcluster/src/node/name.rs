//! Names in the membership: strings shared by pointer, and the interner
//! that gives every process one copy of each worker, actor and type name,
//! however many members carry it.
//!
//! Every process holds every member of the cluster (its directory), so a
//! byte per member is a byte times the cluster's size in every process:
//! the forks of one worker share their worker, actor and type names and
//! their socket directory, and hold one pointer to each.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::hash::Hash;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use rustc_hash::{FxBuildHasher, FxHashSet};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An immutable string that clones by pointer: a path, or a worker, actor,
/// type or socket directory name of a [`Member`](crate::Member).
///
/// It reads as a `&str` (it derefs to one) and compares with `str`,
/// `&str` and `String`. Names that many members carry are interned when a
/// process receives them; a path, one per member, is not.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(Arc<str>);

impl Name {
    /// The one copy of `text` this process shares among everything that
    /// interns it (made if there is none).
    pub fn interned(text: &str) -> Name {
        Name(NAMES.get_or_make(text, |text| Arc::from(text)))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Decodes a name without interning it (a path: one per member, so
    /// nothing to share, and a table entry would only cost).
    pub(crate) fn deserialize_unshared<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Name, D::Error> {
        deserializer.deserialize_str(Visit(|text: &str| Name::from(text)))
    }
}

/// The names interned in this process.
static NAMES: Interner<str> = Interner::new();

/// One shared copy of each value: the values held here and by whatever
/// interned them.
pub(crate) struct Interner<T: ?Sized> {
    table: Mutex<Table<T>>,
}

struct Table<T: ?Sized> {
    values: FxHashSet<Arc<T>>,
    /// How many values were left after the last sweep.
    kept: usize,
}

/// Interned values are swept no sooner than when this many are held.
const SWEEP_FROM: usize = 64;

impl<T: ?Sized + Hash + Eq> Interner<T> {
    pub const fn new() -> Self {
        Interner {
            table: Mutex::new(Table {
                values: HashSet::with_hasher(FxBuildHasher),
                kept: 0,
            }),
        }
    }

    /// The shared copy of `value`, interned now if there is none.
    pub fn intern(&self, value: T) -> Arc<T>
    where
        T: Sized,
    {
        let mut table = self.lock();
        if let Some(found) = table.values.get(&value) {
            return found.clone();
        }
        table.insert(Arc::new(value))
    }

    /// The shared copy equal to `key`, made by `make` if there is none.
    pub fn get_or_make<Q>(&self, key: &Q, make: impl FnOnce(&Q) -> Arc<T>) -> Arc<T>
    where
        Q: ?Sized + Hash + Eq,
        Arc<T>: Borrow<Q>,
    {
        let mut table = self.lock();
        if let Some(found) = table.values.get(key) {
            return found.clone();
        }
        table.insert(make(key))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<T>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many values are held (dead ones included until the next sweep).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().values.len()
    }

    /// Whether a value equal to `key` is held.
    #[cfg(test)]
    pub fn holds<Q>(&self, key: &Q) -> bool
    where
        Q: ?Sized + Hash + Eq,
        Arc<T>: Borrow<Q>,
    {
        self.lock().values.contains(key)
    }
}

impl<T: ?Sized + Hash + Eq> Table<T> {
    fn insert(&mut self, value: Arc<T>) -> Arc<T> {
        self.sweep_if_due();
        self.values.insert(value.clone());
        value
    }

    /// Drops the values nothing else holds any more, once the table has
    /// doubled since the last sweep: amortized O(1) per value, and the
    /// table stays within twice the live values (plus [`SWEEP_FROM`]),
    /// however many workers and actors came and went (hosts that join and
    /// leave through NATS bring names of their own).
    fn sweep_if_due(&mut self) {
        if self.values.len() < SWEEP_FROM.max(2 * self.kept) {
            return;
        }
        // Under the lock, a count of one is the table's own reference, and
        // nothing can clone it without the lock.
        self.values.retain(|value| Arc::strong_count(value) > 1);
        self.kept = self.values.len();
        self.values.shrink_to(2 * self.kept.max(SWEEP_FROM));
    }
}

impl Default for Name {
    /// The empty name.
    fn default() -> Name {
        Name::interned("")
    }
}

impl From<&str> for Name {
    /// A name of its own (not interned).
    fn from(text: &str) -> Name {
        Name(Arc::from(text))
    }
}

impl From<String> for Name {
    /// A name of its own (not interned).
    fn from(text: String) -> Name {
        Name(Arc::from(text))
    }
}

impl From<&String> for Name {
    /// A name of its own (not interned).
    fn from(text: &String) -> Name {
        Name::from(text.as_str())
    }
}

impl From<Name> for String {
    fn from(name: Name) -> String {
        name.as_str().to_owned()
    }
}

impl Deref for Name {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for Name {
    fn as_ref(&self) -> &std::path::Path {
        std::path::Path::new(&*self.0)
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

macro_rules! compare_with_text {
    ($($text:ty),*) => {$(
        impl PartialEq<$text> for Name {
            fn eq(&self, other: &$text) -> bool {
                *self.0 == **other
            }
        }
        impl PartialEq<Name> for $text {
            fn eq(&self, other: &Name) -> bool {
                **self == *other.0
            }
        }
    )*};
}

compare_with_text!(String, &str, &String);

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        *self == *other.0
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    /// Interned: a name received is most likely one this process holds.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Name, D::Error> {
        deserializer.deserialize_str(Visit(Name::interned))
    }
}

/// Makes a [`Name`] from the decoded text, borrowed from the input when
/// the format allows it (no copy on the way).
struct Visit<F>(F);

impl<F: FnOnce(&str) -> Name> serde::de::Visitor<'_> for Visit<F> {
    type Value = Name;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Name, E> {
        Ok((self.0)(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_received_share_one_copy_and_compare_as_text() {
        let a: Name = rmp_serde::from_slice(&rmp_serde::to_vec("name.tests.shared").unwrap()).unwrap();
        let b: Name = rmp_serde::from_slice(&rmp_serde::to_vec("name.tests.shared").unwrap()).unwrap();
        assert!(Arc::ptr_eq(&a.0, &b.0), "one copy for both");
        assert_eq!(a, "name.tests.shared");
        assert_eq!("name.tests.shared".to_owned(), a);
        assert_eq!(&*a, "name.tests.shared");
        assert_eq!(format!("{a} {a:?}"), "name.tests.shared \"name.tests.shared\"");

        // A path is decoded as a copy of its own: nothing to share.
        #[derive(Deserialize)]
        struct Path(#[serde(deserialize_with = "Name::deserialize_unshared")] Name);
        let Path(path) = rmp_serde::from_slice(&rmp_serde::to_vec("name.tests.path").unwrap()).unwrap();
        assert_eq!(path, "name.tests.path");
        assert!(!NAMES.holds("name.tests.path"));
    }

    /// Values that come and go do not pile up (workers, actors, hosts
    /// joining and leaving): the table keeps the live ones, and dead ones
    /// only until it has doubled.
    #[test]
    fn values_nothing_holds_are_swept() {
        let interner: Interner<str> = Interner::new();
        let live: Vec<Arc<str>> = (0..10)
            .map(|i| interner.get_or_make(&*format!("live.{i}"), |t| Arc::from(t)))
            .collect();
        let mut most = 0;
        for cycle in 0..50 {
            let joined: Vec<Arc<str>> = (0..100)
                .map(|i| interner.get_or_make(&*format!("cycle.{cycle}.{i}"), |t| Arc::from(t)))
                .collect();
            most = most.max(interner.len());
            drop(joined);
        }
        assert!(most <= 2 * (10 + 100) + SWEEP_FROM, "{most} values held");
        // The live ones are still the shared copies.
        for (i, value) in live.iter().enumerate() {
            assert!(Arc::ptr_eq(
                value,
                &interner.get_or_make(&*format!("live.{i}"), |t| Arc::from(t))
            ));
        }
        // Interning a value equal to a held one gives the held one.
        let hosting: Interner<(u32, String)> = Interner::new();
        let a = hosting.intern((1, "w".to_owned()));
        assert!(Arc::ptr_eq(&a, &hosting.intern((1, "w".to_owned()))));
        assert_eq!(hosting.len(), 1);
    }
}
