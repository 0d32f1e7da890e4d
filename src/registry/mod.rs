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

mod demo;
mod load;
mod owners;

use rustc_hash::FxHashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::model::ThingModel;

pub use demo::demo_registry;
pub use load::DriverListener;
pub use owners::{ConnRef, Owners};

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
}

/// Products and devices, immutable and shared by every shard.
#[derive(Debug)]
pub struct Registry {
    products: Vec<ThingModel>,
    devices: Vec<Device>,
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

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    pub fn products(&self) -> &[ThingModel] {
        &self.products
    }

    /// Every device id, in registration order.
    pub fn ids(&self) -> impl ExactSizeIterator<Item = DeviceId> + '_ {
        (0..self.devices.len()).map(|i| DeviceId(i as u32))
    }
}

/// Collects products and devices, then [`build`](Self::build)s the immutable [`Registry`].
#[derive(Debug)]
pub struct RegistryBuilder(Registry);

impl Default for RegistryBuilder {
    fn default() -> Self {
        Self(Registry {
            products: Vec::new(),
            devices: Vec::new(),
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
        let next = u32::try_from(r.devices.len())
            .map(DeviceId)
            .map_err(|_| "more than 2^32 devices".to_owned())?;
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
        });
        Ok(next)
    }

    pub fn device_count(&self) -> usize {
        self.0.devices.len()
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
