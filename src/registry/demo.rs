//! The built-in demo registry: what `ringlink serve` uses when no `[registry]` is configured, so
//! that `cargo run --release` and `loadgen` work together with no set-up.
//!
//! Three products (the thing models in `src/registry/demo/*.json`, compiled in) and 31 000
//! devices, none bound to a `clientIp`:
//!
//! | product | devices |
//! | --- | --- |
//! | `a1ThermoPK0` (thermostat) | `thermo-00000` ..= `thermo-19999` |
//! | `a1LightPK00` (light) | `lamp-00000` ..= `lamp-09999` |
//! | `a1ExportPK0` (a console export with built-ins) | `meter-0000` ..= `meter-0999` |

use crate::model::ThingModel;
use crate::registry::Registry;

/// Thermostat devices: `thermo-00000` ..= `thermo-19999`.
const DEMO_THERMOSTATS: usize = 20_000;
/// Light devices: `lamp-00000` ..= `lamp-09999`.
const DEMO_LAMPS: usize = 10_000;
/// Meter devices of the exported product: `meter-0000` ..= `meter-0999`.
const DEMO_METERS: usize = 1_000;

/// Builds the demo registry (about 31 000 devices; a few milliseconds).
pub fn demo_registry() -> Registry {
    let mut b = Registry::builder();
    let mut keys = Vec::with_capacity(DEMO_TSLS.len());
    for json in DEMO_TSLS {
        // Invariant: the demo TSLs are compiled in and `tests::demo_counts_and_lookups` loads
        // them, so they parse and declare three distinct productKeys.
        let model = ThingModel::from_slice(json).expect("built-in demo TSL loads");
        keys.push(model.product_key().to_owned());
        b.add_product(model)
            .expect("built-in demo productKeys are distinct");
    }
    let families = [
        (&keys[0], "thermo", 5, DEMO_THERMOSTATS),
        (&keys[1], "lamp", 5, DEMO_LAMPS),
        (&keys[2], "meter", 4, DEMO_METERS),
    ];
    for (pk, prefix, width, count) in families {
        for i in 0..count {
            let name = format!("{prefix}-{i:0width$}");
            // Invariant: names are distinct within a product, and the product was added above.
            b.add_device(pk, &name, None)
                .expect("demo device names are distinct");
        }
    }
    b.build()
}

/// Thermostat, light, export; the order `demo_registry` relies on.
const DEMO_TSLS: [&[u8]; 3] = [
    include_bytes!("demo/thermostat.json"),
    include_bytes!("demo/light.json"),
    include_bytes!("demo/export_builtins.json"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_counts_and_lookups() {
        let r = demo_registry();
        assert_eq!(r.len(), DEMO_THERMOSTATS + DEMO_LAMPS + DEMO_METERS);
        let keys: Vec<&str> = r.products().iter().map(ThingModel::product_key).collect();
        assert_eq!(keys, ["a1ThermoPK0", "a1LightPK00", "a1ExportPK0"]);
        for (pk, first, last) in [
            ("a1ThermoPK0", "thermo-00000", "thermo-19999"),
            ("a1LightPK00", "lamp-00000", "lamp-09999"),
            ("a1ExportPK0", "meter-0000", "meter-0999"),
        ] {
            for dn in [first, last] {
                let id = r.lookup(pk, dn).unwrap_or_else(|| panic!("{pk}/{dn}"));
                assert_eq!((r.product_key(id), r.device_name(id)), (pk, dn));
                assert_eq!(r.device(id).client_ip, None);
            }
        }
        assert!(r.lookup("a1ThermoPK0", "thermo-20000").is_none());
        assert!(r.lookup("a1LightPK00", "lamp-10000").is_none());
        assert!(r.lookup("a1ExportPK0", "meter-1000").is_none());
        assert!(r.lookup("a1LightPK00", "thermo-00000").is_none());
        assert!(r.ids().all(|id| r.device(id).client_ip.is_none()));
        let per_product = |pk| {
            let p = r.product_by_key(pk).expect("demo product");
            r.ids().filter(|&id| r.device(id).product == p).count()
        };
        assert_eq!(per_product("a1ThermoPK0"), DEMO_THERMOSTATS);
        assert_eq!(per_product("a1LightPK00"), DEMO_LAMPS);
        assert_eq!(per_product("a1ExportPK0"), DEMO_METERS);
    }
}
