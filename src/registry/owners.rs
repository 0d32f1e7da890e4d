//! Which connection each device is online on: the routing table every shard shares.
//!
//! Owns: one atomic word per registered device, holding the owning connection (shard, slot,
//! generation) or 0 when the device is offline. Dense [`DeviceId`]s make this a plain array:
//! a lookup is one load, a takeover one swap, a release one compare-and-swap; there is no lock
//! and no hashing, which is why this is not a concurrent hash map.
//!
//! Always holds: a device has at most one owner; the word only changes through the three
//! operations below, so "online uplink, no offline in between" on a takeover is decided here.
//!
//! Reloads: the table is a [`Segmented`] array, so a registry reload that appends device ids
//! grows it ([`Owners::grow`], before any shard sees the new registry) without moving a word
//! another thread may be reading or swapping. A removed device's word stays (its id is retired,
//! never handed out again); the shard that owns it releases it when it swaps registries.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::registry::segmented::Segmented;
use crate::registry::DeviceId;

/// A connection, named so that a reused slot is never mistaken for its previous connection.
///
/// ```text
///  63      56 55                32 31                     0
/// +----------+--------------------+------------------------+
/// |  shard   |        slot        |  generation (>= 1)     |
/// +----------+--------------------+------------------------+
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnRef(u64);

impl ConnRef {
    /// Largest slot a shard may use (24 bits).
    pub const MAX_SLOT: usize = (1 << 24) - 1;

    /// `generation` must be at least 1 (0 would read as "offline").
    pub fn new(shard: u8, slot: usize, generation: u32) -> Self {
        debug_assert!(slot <= Self::MAX_SLOT && generation >= 1);
        Self(u64::from(shard) << 56 | ((slot as u64) & 0xff_ffff) << 32 | u64::from(generation))
    }

    pub const fn shard(self) -> u8 {
        (self.0 >> 56) as u8
    }

    pub const fn slot(self) -> usize {
        ((self.0 >> 32) & 0xff_ffff) as usize
    }

    pub const fn generation(self) -> u32 {
        self.0 as u32
    }
}

/// The owner of every device, shared by all shards and the API.
#[derive(Debug)]
pub struct Owners {
    table: Segmented<AtomicU64>,
    online: AtomicUsize,
}

impl Owners {
    /// A table for `devices` devices, all offline.
    pub fn new(devices: usize) -> Self {
        Self {
            table: Segmented::new(devices, || AtomicU64::new(0)),
            online: AtomicUsize::new(0),
        }
    }

    /// Makes room for device ids `0..devices` (a reload added some); nothing moves.
    pub fn grow(&self, devices: usize) {
        self.table.grow(devices);
    }

    /// The connection `device` is online on.
    pub fn owner(&self, device: DeviceId) -> Option<ConnRef> {
        self.table
            .get(device)
            .map(|w| w.load(Ordering::Acquire))
            .filter(|&w| w != 0)
            .map(ConnRef)
    }

    /// Makes `me` the owner; returns the previous owner when it was another connection (a
    /// takeover: the caller tells that connection).
    pub fn claim(&self, device: DeviceId, me: ConnRef) -> Option<ConnRef> {
        // Every id a registry hands out has a word: the table grows before the registry is
        // published. An id without one cannot be claimed, and reads as offline.
        let Some(word) = self.table.get(device) else {
            debug_assert!(false, "device {device:?} beyond the ownership table");
            return None;
        };
        let prev = word.swap(me.0, Ordering::AcqRel);
        if prev == 0 {
            self.online.fetch_add(1, Ordering::Relaxed);
        }
        Some(prev).filter(|&p| p != 0 && p != me.0).map(ConnRef)
    }

    /// Takes `device` offline if `me` still owns it; false when another connection took it
    /// over (then no offline uplink is due) or it was offline already.
    pub fn release(&self, device: DeviceId, me: ConnRef) -> bool {
        let released = self.table.get(device).is_some_and(|w| {
            w.compare_exchange(me.0, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        });
        if released {
            self.online.fetch_sub(1, Ordering::Relaxed);
        }
        released
    }

    /// How many devices are online.
    pub fn online(&self) -> usize {
        self.online.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(n: u32) -> DeviceId {
        // Test-only: registry ids are dense from 0.
        crate::registry::tests::registry()
            .ids()
            .nth(n as usize)
            .expect("test registry has the device")
    }

    #[test]
    fn conn_ref_packs_and_unpacks() {
        let c = ConnRef::new(7, ConnRef::MAX_SLOT, u32::MAX);
        assert_eq!(
            (c.shard(), c.slot(), c.generation()),
            (7, ConnRef::MAX_SLOT, u32::MAX)
        );
        let c = ConnRef::new(0, 0, 1);
        assert_eq!((c.shard(), c.slot(), c.generation()), (0, 0, 1));
    }

    #[test]
    fn claim_takeover_and_release() {
        let owners = Owners::new(4);
        let (a, b) = (ConnRef::new(0, 1, 1), ConnRef::new(1, 1, 1));
        let d = dev(2);
        assert_eq!(owners.owner(d), None);
        assert_eq!(owners.claim(d, a), None);
        assert_eq!(owners.claim(d, a), None, "claiming again is not a takeover");
        assert_eq!(owners.online(), 1);
        assert_eq!(owners.claim(d, b), Some(a), "takeover names the old owner");
        assert_eq!(owners.online(), 1);
        assert!(
            !owners.release(d, a),
            "the old owner cannot release it any more"
        );
        assert_eq!(owners.owner(d), Some(b));
        assert!(owners.release(d, b));
        assert_eq!(owners.owner(d), None);
        assert_eq!(owners.online(), 0);
        assert!(!owners.release(d, b));
    }

    #[test]
    fn reused_slot_with_new_generation_is_another_connection() {
        let owners = Owners::new(1);
        let d = dev(0);
        let old = ConnRef::new(0, 5, 1);
        let new = ConnRef::new(0, 5, 2);
        owners.claim(d, old);
        assert_eq!(owners.claim(d, new), Some(old));
        assert!(!owners.release(d, old));
    }
}
