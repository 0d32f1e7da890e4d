//! The known products (thing models) and devices, immutable once built.
//!
//! Owns: device identity. Every registered device gets a dense [`DeviceId`] at build time, so the
//! rest of ringlink (sessions, routing, shadows) keys on a `u32` instead of two strings. A lookup
//! by `(productKey, deviceName)` borrows the message's strings and allocates nothing.
//! Never: who is online where (that is routing state, not registry state), IO beyond the loaders
//! that read a file's text handed to them.
//!
//! Sources: devices added one by one (inline config), a CSV of `productKey,deviceName[,clientIp]`,
//! and an imported Link IoT Edge driver config (`{config, deviceList}`, PROTOCOL.md section 12).
//!
//! # Reloads: how ids survive a new registry
//!
//! A registry is never changed in place; a reload ([`crate::shard`]'s `reload`) builds a fresh
//! one from the sources with the code `ringlink check` uses, then [`Registry::carry_over`] maps
//! it onto the running one's ids:
//!
//! ```text
//!   old ids   0 1 2 3 4 5            (3 removed before: retired)
//!   old       a b c x d e
//!   sources   a c d e f g            (b removed, f g added, c's clientIp changed)
//!   new ids   0 1 2 3 4 5 6 7
//!   new       a b c x d e f g        b, x retired: kept by id for their names, not looked up
//! ```
//!
//! - A device keeps its id for as long as `(productKey, deviceName)` stays in the sources.
//! - Added devices get new ids appended after the highest id ever handed out.
//! - Removed ids are retired: never reused in the process's life. A retired id may still sit in
//!   a session, a batch or a pending downlink on some shard while the swap goes through; since
//!   the id can never come to mean another device, none of those can be mistaken, and the
//!   offline record of a removed device still carries its names ([`Registry::device_name`]
//!   answers for retired ids; [`Registry::lookup`] and [`Registry::ids`] skip them). The cost
//!   is the name and one ownership word and shadow per retired id until the process restarts,
//!   and an id space of [`MAX_DEVICE_IDS`] over the process's life, which a reload that would
//!   go past refuses.
//! - Products are looked up by productKey; a product that is gone stays (unindexed, after the
//!   live ones) while a retired device of it exists, for that device's names.
//!
//! The ownership table ([`Owners`]) and the shadows are indexed by id and grow in fixed-size
//! chunks ([`segmented`]) before the new registry is published, so their words never move
//! and readers on other threads stay lock-free. What holds which registry, and when the
//! removed devices go offline, is in [`crate::shard`] (`reload.rs`).

mod demo;
mod load;
mod owners;
pub(crate) mod segmented;

use rustc_hash::FxHashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::model::ThingModel;

pub use demo::demo_registry;
pub use load::DriverListener;
pub use owners::{ConnRef, Owners};
pub use segmented::MAX_DEVICE_IDS;

/// A registered device: an index into the registry, stable for the life of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(u32);

impl DeviceId {
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    pub const fn as_u32(self) -> u32 {
        self.0
    }

    /// Any id, for unit tests of code keyed by device.
    #[cfg(test)]
    pub(crate) const fn for_tests(index: u32) -> Self {
        Self(index)
    }
}

/// A registered product (one thing model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProductId(u16);

/// One registered device.
#[derive(Debug)]
pub struct Device {
    pub product: ProductId,
    pub name: Box<str>,
    /// When set, the device may only come online from this peer address (PROTOCOL.md 12).
    pub client_ip: Option<IpAddr>,
    /// Removed by a reload: its id is kept for its names only (see the module docs).
    pub retired: bool,
}

/// Products and devices, immutable and shared by every shard.
#[derive(Debug)]
pub struct Registry {
    /// The live products first (`..live_products`), then those kept for retired devices.
    products: Vec<ThingModel>,
    live_products: usize,
    /// By id; retired ones included.
    devices: Vec<Device>,
    /// Devices not retired.
    live: usize,
    /// By productKey; then by deviceName. Two `&str` lookups, no allocation.
    /// FxHash: the keys come from the configuration and peers only look them up, so there is
    /// no way for a peer to fill a bucket.
    index: FxHashMap<Box<str>, ProductEntry>,
}

#[derive(Debug)]
struct ProductEntry {
    id: ProductId,
    devices: FxHashMap<Box<str>, DeviceId>,
}

impl Registry {
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// The device registered as `(product_key, device_name)`.
    pub fn lookup(&self, product_key: &str, device_name: &str) -> Option<DeviceId> {
        self.index
            .get(product_key)?
            .devices
            .get(device_name)
            .copied()
    }

    /// The product registered under `product_key`.
    pub fn product_by_key(&self, product_key: &str) -> Option<ProductId> {
        self.index.get(product_key).map(|p| p.id)
    }

    pub fn device(&self, id: DeviceId) -> &Device {
        &self.devices[id.index()]
    }

    pub fn product(&self, id: ProductId) -> &ThingModel {
        &self.products[usize::from(id.0)]
    }

    /// The thing model of a device.
    pub fn model(&self, id: DeviceId) -> &ThingModel {
        self.product(self.device(id).product)
    }

    pub fn product_key(&self, id: DeviceId) -> &str {
        self.model(id).product_key()
    }

    pub fn device_name(&self, id: DeviceId) -> &str {
        &self.device(id).name
    }

    /// Whether a device may come online from `peer`: always when it has no `clientIp`; else only
    /// from exactly that address, IPv4-mapped IPv6 compared as IPv4 (PROTOCOL.md section 1).
    pub fn allows_peer(&self, id: DeviceId, peer: IpAddr) -> bool {
        self.device(id)
            .client_ip
            .is_none_or(|allowed| canonical_ip(allowed) == canonical_ip(peer))
    }

    /// Registered devices (retired ids not counted).
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Every id handed out so far is below this: what tables indexed by id must hold.
    pub fn id_bound(&self) -> usize {
        self.devices.len()
    }

    /// The products of the sources (not those kept only for retired devices).
    pub fn products(&self) -> &[ThingModel] {
        &self.products[..self.live_products]
    }

    /// Every registered device id, in id order; retired ids skipped.
    pub fn ids(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.devices
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.retired)
            .map(|(i, _)| DeviceId(i as u32))
    }

    /// Whether `id` was removed by a reload.
    pub fn is_retired(&self, id: DeviceId) -> bool {
        self.devices.get(id.index()).is_none_or(|d| d.retired)
    }

    /// `fresh` (just built from the sources) with the ids of `self` (the running registry)
    /// carried over, per the module docs: kept devices keep their id (with `fresh`'s product and
    /// clientIp), added ones get new ids after every id ever handed out, removed ones are
    /// retired. Fails only when the ids would run past [`MAX_DEVICE_IDS`].
    pub fn carry_over(&self, fresh: Self) -> Result<(Self, Changes), String> {
        let Self {
            mut products,
            live_products,
            devices: fresh_devices,
            index: fresh_index,
            ..
        } = fresh;
        // Old product id -> new one: the fresh product of the same key, else a kept copy.
        let mut product_map = Vec::with_capacity(self.products.len());
        let mut models_changed = Vec::new();
        for (i, model) in self.products.iter().enumerate() {
            let key = model.product_key();
            let id = match fresh_index.get(key) {
                Some(entry) => {
                    if i < self.live_products && products[usize::from(entry.id.0)] != *model {
                        models_changed.push(key.into());
                    }
                    entry.id
                }
                None => {
                    let id = u16::try_from(products.len())
                        .map(ProductId)
                        .map_err(|_| "more than 65535 products, counting removed ones")?;
                    products.push(model.clone());
                    id
                }
            };
            product_map.push(id);
        }
        let model_changed = |old: ProductId, new: ProductId| {
            self.products[usize::from(old.0)] != products[usize::from(new.0)]
        };
        // Fresh id -> whether an old id took it.
        let mut taken = vec![false; fresh_devices.len()];
        let mut devices = Vec::with_capacity(self.devices.len() + fresh_devices.len());
        let mut changes = Changes {
            models_changed,
            ..Changes::default()
        };
        for (i, old) in self.devices.iter().enumerate() {
            let id = DeviceId(i as u32);
            let found = (!old.retired)
                .then(|| fresh_index.get(self.product_key(id)))
                .flatten()
                .and_then(|p| p.devices.get(&old.name));
            let device = match found {
                Some(&fresh_id) => {
                    taken[fresh_id.index()] = true;
                    let new = &fresh_devices[fresh_id.index()];
                    if new.client_ip != old.client_ip || model_changed(old.product, new.product) {
                        changes.changed.push(id);
                    }
                    Device {
                        product: new.product,
                        name: old.name.clone(),
                        client_ip: new.client_ip,
                        retired: false,
                    }
                }
                None => {
                    if !old.retired {
                        changes.removed.push(id);
                    }
                    Device {
                        product: product_map[usize::from(old.product.0)],
                        name: old.name.clone(),
                        client_ip: old.client_ip,
                        retired: true,
                    }
                }
            };
            devices.push(device);
        }
        for (fresh_id, device) in fresh_devices.into_iter().enumerate() {
            if taken[fresh_id] {
                continue;
            }
            if devices.len() >= MAX_DEVICE_IDS {
                return Err(format!(
                    "more than {MAX_DEVICE_IDS} device ids in this process's life (removed \
                     devices' ids are never reused): restart ringlink to renumber"
                ));
            }
            changes.added.push(DeviceId(devices.len() as u32));
            devices.push(device);
        }
        let mut index: FxHashMap<Box<str>, ProductEntry> = fresh_index
            .into_iter()
            .map(|(key, entry)| {
                let entry = ProductEntry {
                    id: entry.id,
                    devices: FxHashMap::default(),
                };
                (key, entry)
            })
            .collect();
        let mut live = 0;
        for (i, d) in devices.iter().enumerate() {
            if d.retired {
                continue;
            }
            live += 1;
            let key = products[usize::from(d.product.0)].product_key();
            if let Some(entry) = index.get_mut(key) {
                entry.devices.insert(d.name.clone(), DeviceId(i as u32));
            }
        }
        let registry = Self {
            products,
            live_products,
            devices,
            live,
            index,
        };
        Ok((registry, changes))
    }
}

/// What a reload changed, by device id (in id order).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// New ids.
    pub added: Vec<DeviceId>,
    /// Retired ids: the devices go offline.
    pub removed: Vec<DeviceId>,
    /// Kept devices whose clientIp or thing model changed.
    pub changed: Vec<DeviceId>,
    /// productKeys whose thing model changed.
    pub models_changed: Vec<Box<str>>,
}

/// Collects products and devices, then [`build`](Self::build)s the immutable [`Registry`].
#[derive(Debug)]
pub struct RegistryBuilder(Registry);

impl Default for RegistryBuilder {
    fn default() -> Self {
        Self(Registry {
            products: Vec::new(),
            live_products: 0,
            devices: Vec::new(),
            live: 0,
            index: FxHashMap::default(),
        })
    }
}

impl RegistryBuilder {
    /// Adds a product; its productKey must be new.
    pub fn add_product(&mut self, model: ThingModel) -> Result<ProductId, String> {
        let r = &mut self.0;
        let key = model.product_key();
        if r.index.contains_key(key) {
            return Err(format!("product {key} is defined twice"));
        }
        let id = u16::try_from(r.products.len())
            .map(ProductId)
            .map_err(|_| "more than 65535 products".to_owned())?;
        let entry = ProductEntry {
            id,
            devices: FxHashMap::default(),
        };
        r.index.insert(key.into(), entry);
        r.products.push(model);
        r.live_products = r.products.len();
        Ok(id)
    }

    /// Adds a device of a product added before; `(productKey, deviceName)` must be new.
    pub fn add_device(
        &mut self,
        product_key: &str,
        device_name: &str,
        client_ip: Option<IpAddr>,
    ) -> Result<DeviceId, String> {
        if device_name.is_empty() {
            return Err("deviceName is empty".to_owned());
        }
        let r = &mut self.0;
        if r.devices.len() >= MAX_DEVICE_IDS {
            return Err(format!("more than {MAX_DEVICE_IDS} devices"));
        }
        let next = DeviceId(r.devices.len() as u32);
        let Some(product) = r.index.get_mut(product_key) else {
            return Err(format!(
                "unknown productKey {product_key:?} (no thing model declares it)"
            ));
        };
        if product.devices.contains_key(device_name) {
            return Err(format!(
                "device {product_key}/{device_name} is listed twice"
            ));
        }
        product.devices.insert(device_name.into(), next);
        r.devices.push(Device {
            product: product.id,
            name: device_name.into(),
            client_ip,
            retired: false,
        });
        r.live += 1;
        Ok(next)
    }

    pub fn device_count(&self) -> usize {
        self.0.live
    }

    pub fn build(self) -> Registry {
        self.0
    }
}

/// A registry source error with the place it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryError {
    pub file: PathBuf,
    /// 1-based line, where the source has lines that mean something (CSV).
    pub line: Option<usize>,
    /// Where in a JSON document, e.g. `$.deviceList[3].custom`.
    pub json_path: Option<String>,
    pub message: String,
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(path) = &self.json_path {
            write!(f, ": at {path}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for RegistryError {}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) as IPv4; everything else unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The thermostat of PROTOCOL.md 11.2 and the light product, from the test data.
    pub(crate) fn models() -> Vec<ThingModel> {
        [
            include_bytes!("demo/thermostat.json").as_slice(),
            include_bytes!("demo/light.json").as_slice(),
        ]
        .into_iter()
        .map(|json| ThingModel::from_slice(json).expect("test TSL loads"))
        .collect()
    }

    /// A small registry: thermo-01 (clientIp 127.0.0.2), thermo-02..04, lamp-1, lamp-2.
    pub(crate) fn registry() -> Registry {
        let mut b = Registry::builder();
        for m in models() {
            b.add_product(m).expect("distinct products");
        }
        b.add_device(
            "a1ThermoPK0",
            "thermo-01",
            Some("127.0.0.2".parse().expect("ip")),
        )
        .expect("new device");
        for name in ["thermo-02", "thermo-03", "thermo-04"] {
            b.add_device("a1ThermoPK0", name, None).expect("new device");
        }
        for name in ["lamp-1", "lamp-2"] {
            b.add_device("a1LightPK00", name, None).expect("new device");
        }
        b.build()
    }

    #[test]
    fn lookup_by_borrowed_strings() {
        let r = registry();
        let id = r.lookup("a1ThermoPK0", "thermo-02").expect("registered");
        assert_eq!(r.device_name(id), "thermo-02");
        assert_eq!(r.product_key(id), "a1ThermoPK0");
        assert!(r.lookup("a1ThermoPK0", "lamp-1").is_none());
        assert!(r.lookup("nope", "thermo-02").is_none());
        assert_eq!(r.len(), 6);
        assert_eq!(r.ids().count(), 6);
    }

    #[test]
    fn client_ip_check_compares_mapped_v6_as_v4() {
        let r = registry();
        let id = r.lookup("a1ThermoPK0", "thermo-01").expect("registered");
        assert!(r.allows_peer(id, "127.0.0.2".parse().expect("ip")));
        assert!(r.allows_peer(id, "::ffff:127.0.0.2".parse().expect("ip")));
        assert!(!r.allows_peer(id, "127.0.0.1".parse().expect("ip")));
        let free = r.lookup("a1ThermoPK0", "thermo-02").expect("registered");
        assert!(r.allows_peer(free, "10.9.8.7".parse().expect("ip")));
    }

    fn light_without_last_property() -> ThingModel {
        let mut tsl: serde_json::Value =
            serde_json::from_slice(include_bytes!("demo/light.json")).expect("JSON");
        let props = tsl["properties"].as_array_mut().expect("properties");
        props.pop();
        ThingModel::from_slice(tsl.to_string().as_bytes()).expect("still a TSL")
    }

    /// The test registry's products (the light one replaced by `light_model`) and `devices`.
    fn rebuilt(
        devices: &[(&str, &str, Option<&str>)],
        light_model: Option<ThingModel>,
    ) -> Registry {
        let mut b = Registry::builder();
        let mut ms = models();
        if let Some(m) = light_model {
            ms[1] = m;
        }
        for m in ms {
            b.add_product(m).expect("distinct products");
        }
        for (pk, dn, ip) in devices {
            let ip = ip.map(|ip| ip.parse().expect("ip"));
            b.add_device(pk, dn, ip).expect("new device");
        }
        b.build()
    }

    #[test]
    fn carry_over_keeps_ids_appends_added_and_retires_removed() {
        let old = registry();
        let id = |r: &Registry, dn: &str| {
            r.lookup(
                if dn.starts_with("lamp") {
                    "a1LightPK00"
                } else {
                    "a1ThermoPK0"
                },
                dn,
            )
        };
        // thermo-02 and lamp-1 removed, thermo-01's clientIp dropped, two added (one before
        // the kept ones in file order: file order does not decide ids).
        let fresh = rebuilt(
            &[
                ("a1ThermoPK0", "thermo-new", None),
                ("a1ThermoPK0", "thermo-01", None),
                ("a1ThermoPK0", "thermo-03", None),
                ("a1ThermoPK0", "thermo-04", None),
                ("a1LightPK00", "lamp-2", None),
                ("a1LightPK00", "lamp-new", None),
            ],
            None,
        );
        let (new, changes) = old.carry_over(fresh).expect("fits");
        for dn in ["thermo-01", "thermo-03", "thermo-04", "lamp-2"] {
            assert_eq!(id(&new, dn), id(&old, dn), "{dn} keeps its id");
        }
        assert_eq!(id(&new, "thermo-new"), Some(DeviceId(6)));
        assert_eq!(id(&new, "lamp-new"), Some(DeviceId(7)));
        assert_eq!(id(&new, "thermo-02"), None, "removed: not looked up");
        let t2 = id(&old, "thermo-02").expect("was there");
        assert!(new.is_retired(t2));
        assert_eq!(
            new.device_name(t2),
            "thermo-02",
            "a retired id keeps its names"
        );
        assert_eq!(new.product_key(t2), "a1ThermoPK0");
        assert_eq!((new.len(), new.id_bound()), (6, 8));
        assert_eq!(new.ids().count(), 6);
        assert_eq!(changes.added, vec![DeviceId(6), DeviceId(7)]);
        assert_eq!(
            changes.removed,
            vec![t2, id(&old, "lamp-1").expect("was there")]
        );
        assert_eq!(
            changes.changed,
            vec![id(&old, "thermo-01").expect("was there")]
        );
        assert!(changes.models_changed.is_empty());
        let t1 = id(&new, "thermo-01").expect("kept");
        assert!(
            new.allows_peer(t1, "10.0.0.1".parse().expect("ip")),
            "new clientIp"
        );

        // Again, with thermo-02 back: a new id, the retired one is never reused.
        let fresh = rebuilt(&[("a1ThermoPK0", "thermo-02", None)], None);
        let (again, changes) = new.carry_over(fresh).expect("fits");
        assert_eq!(id(&again, "thermo-02"), Some(DeviceId(8)));
        assert_eq!(changes.added, vec![DeviceId(8)]);
        assert_eq!(changes.removed.len(), 6);
        assert_eq!((again.len(), again.id_bound()), (1, 9));
    }

    #[test]
    fn carry_over_names_changed_models_and_keeps_removed_products() {
        let old = registry();
        let light = light_without_last_property();
        let fresh = rebuilt(
            &[
                ("a1LightPK00", "lamp-1", None),
                ("a1LightPK00", "lamp-2", None),
            ],
            Some(light),
        );
        let (new, changes) = old.carry_over(fresh).expect("fits");
        assert_eq!(changes.models_changed, vec![Box::from("a1LightPK00")]);
        assert_eq!(changes.changed.len(), 2, "both lamps have a new model");
        assert_eq!(changes.removed.len(), 4);
        // Same sources again: nothing changed.
        let (_, none) = new
            .carry_over(rebuilt(
                &[
                    ("a1LightPK00", "lamp-1", None),
                    ("a1LightPK00", "lamp-2", None),
                ],
                Some(light_without_last_property()),
            ))
            .expect("fits");
        assert_eq!(none, Changes::default());
    }

    #[test]
    fn duplicates_and_unknown_products_are_refused() {
        let mut b = Registry::builder();
        let [thermo, _] = <[ThingModel; 2]>::try_from(models()).expect("two models");
        b.add_product(thermo).expect("first");
        let again = models().swap_remove(0);
        assert!(b.add_product(again).unwrap_err().contains("twice"));
        b.add_device("a1ThermoPK0", "t", None).expect("new");
        assert!(b
            .add_device("a1ThermoPK0", "t", None)
            .unwrap_err()
            .contains("twice"));
        assert!(b
            .add_device("a1LightPK00", "x", None)
            .unwrap_err()
            .contains("unknown productKey"));
        assert!(b.add_device("a1ThermoPK0", "", None).is_err());
    }
}
