//! A table indexed by [`DeviceId`] that grows without moving what it holds.
//!
//! Owns: a fixed table of chunk pointers, each chunk [`CHUNK`] entries allocated on demand
//! (once, by [`Segmented::grow`]) and never freed or moved before the table is dropped. A reader
//! on any thread finds an entry with two loads and no lock, also while another thread grows the
//! table: an entry's address is fixed from the moment its chunk exists.
//!
//! Always holds: every id below [`Segmented::bound`] has an entry; ids at or above it have none
//! and read as absent. `bound` only grows.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::registry::DeviceId;

/// Entries per chunk: 2^12. A chunk of ownership words is 32 KiB.
pub(crate) const CHUNK: usize = 1 << CHUNK_BITS;

/// Device ids a process can hand out in its life, over every reload: 2^26 (67 million). The
/// chunk-pointer table is fixed at this size (16,384 pointers) so that growing never moves it.
pub const MAX_DEVICE_IDS: usize = CHUNK * MAX_CHUNKS;

const CHUNK_BITS: u32 = 12;
const MAX_CHUNKS: usize = 1 << 14;

/// Entries of `T` for device ids `0..bound`, grown in chunks.
pub(crate) struct Segmented<T> {
    chunks: Box<[OnceLock<Box<[T]>>]>,
    bound: AtomicUsize,
    make: fn() -> T,
}

impl<T> Segmented<T> {
    /// A table with entries for ids `0..len`, each `make()`.
    pub(crate) fn new(len: usize, make: fn() -> T) -> Self {
        let table = Self {
            chunks: (0..MAX_CHUNKS).map(|_| OnceLock::new()).collect(),
            bound: AtomicUsize::new(0),
            make,
        };
        table.grow(len);
        table
    }

    /// Makes sure ids `0..len` have entries (at most [`MAX_DEVICE_IDS`]); existing entries
    /// stay where they are.
    pub(crate) fn grow(&self, len: usize) {
        let len = len.min(MAX_DEVICE_IDS);
        for chunk in &self.chunks[..len.div_ceil(CHUNK)] {
            chunk.get_or_init(|| (0..CHUNK).map(|_| (self.make)()).collect());
        }
        self.bound.fetch_max(len, Ordering::Release);
    }

    /// The entry of `id`, if the table has grown to it.
    pub(crate) fn get(&self, id: DeviceId) -> Option<&T> {
        let i = id.index();
        let chunk = self.chunks.get(i >> CHUNK_BITS)?.get()?;
        chunk.get(i & (CHUNK - 1))
    }

    /// Ids below this have an entry.
    pub(crate) fn bound(&self) -> usize {
        self.bound.load(Ordering::Acquire)
    }
}

impl<T> std::fmt::Debug for Segmented<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segmented")
            .field("bound", &self.bound())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    #[test]
    fn grows_in_chunks_without_moving_entries() {
        let t: Segmented<AtomicU64> = Segmented::new(3, || AtomicU64::new(0));
        let id = |i: usize| DeviceId::for_tests(i as u32);
        assert_eq!(t.bound(), 3);
        let first = t.get(id(2)).expect("within the first chunk") as *const AtomicU64;
        t.get(id(2)).expect("entry").store(7, Ordering::Relaxed);
        assert!(
            t.get(id(CHUNK)).is_none(),
            "the second chunk is not there yet"
        );
        t.grow(CHUNK + 5);
        assert_eq!(t.bound(), CHUNK + 5);
        assert!(t.get(id(CHUNK + 4)).is_some());
        let after = t.get(id(2)).expect("entry");
        assert!(std::ptr::eq(first, after), "an entry never moves");
        assert_eq!(after.load(Ordering::Relaxed), 7);
        t.grow(10);
        assert_eq!(t.bound(), CHUNK + 5, "the bound never shrinks");
        assert!(t.get(id(MAX_DEVICE_IDS)).is_none());
    }
}
