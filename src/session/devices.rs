//! The devices online on one connection.

use std::collections::HashSet;

use crate::registry::DeviceId;

/// A set of devices sized for the common cases: a direct device keeps its one device inline,
/// a sub-gateway gets a hash set. An idle direct-device connection allocates nothing here.
#[derive(Debug, Default)]
pub(super) enum Devices {
    #[default]
    None,
    One(DeviceId),
    // Boxed on purpose: the enum stays 16 bytes in every session instead of 48; only a
    // sub-gateway pays for the extra allocation.
    #[allow(clippy::box_collection)]
    Many(Box<HashSet<DeviceId>>),
}

impl Devices {
    /// Adds `d`; false when it was there already.
    pub(super) fn insert(&mut self, d: DeviceId) -> bool {
        match self {
            Self::None => {
                *self = Self::One(d);
                true
            }
            Self::One(x) if *x == d => false,
            Self::One(x) => {
                let set = HashSet::from([*x, d]);
                *self = Self::Many(Box::new(set));
                true
            }
            Self::Many(set) => set.insert(d),
        }
    }

    /// Removes `d`; false when it was not there.
    pub(super) fn remove(&mut self, d: DeviceId) -> bool {
        match self {
            Self::One(x) if *x == d => {
                *self = Self::None;
                true
            }
            Self::Many(set) => set.remove(&d),
            _ => false,
        }
    }

    pub(super) fn contains(&self, d: DeviceId) -> bool {
        match self {
            Self::None => false,
            Self::One(x) => *x == d,
            Self::Many(set) => set.contains(&d),
        }
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = DeviceId> + '_ {
        let (one, many) = match self {
            Self::None => (None, None),
            Self::One(x) => (Some(*x), None),
            Self::Many(set) => (None, Some(set.iter().copied())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    /// Empties the set; returns its devices in id order.
    pub(super) fn take_sorted(&mut self) -> Vec<DeviceId> {
        let mut all: Vec<DeviceId> = self.iter().collect();
        all.sort_unstable();
        *self = Self::None;
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_from_inline_to_a_set_and_back_to_empty() {
        let ids: Vec<DeviceId> = crate::registry::tests::registry().ids().take(3).collect();
        let mut d = Devices::default();
        assert!(!d.contains(ids[0]) && !d.remove(ids[0]));
        assert!(d.insert(ids[1]));
        assert!(matches!(d, Devices::One(_)));
        assert!(!d.insert(ids[1]));
        assert!(d.insert(ids[0]) && d.insert(ids[2]));
        assert!(d.contains(ids[0]) && d.contains(ids[1]) && d.contains(ids[2]));
        assert!(d.remove(ids[1]) && !d.remove(ids[1]));
        assert_eq!(d.take_sorted(), vec![ids[0], ids[2]]);
        assert_eq!(d.iter().count(), 0);
        assert!(d.insert(ids[2]) && d.remove(ids[2]));
        assert!(matches!(d, Devices::None));
    }
}
