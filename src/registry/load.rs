//! Device lists: CSV and the Link IoT Edge driver config (PROTOCOL.md section 12).
//!
//! Both loaders take the file's text and its path (for messages), add every good entry to the
//! builder and return every bad one as a [`RegistryError`] with its line or JSON path, so that
//! `ringlink check` can show all problems of a file at once.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::registry::{RegistryBuilder, RegistryError};

/// Listener settings found in an imported driver config (`config.json` or `config.kv`). They
/// fill in the listener unless ringlink's own configuration sets them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DriverListener {
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
    pub tls: Option<bool>,
    /// Relative to the driver config file's folder.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl DriverListener {
    /// Reads only the listener settings of a driver config, without its device list: the
    /// configuration loader needs them before any thing model is loaded. Errors as
    /// [`RegistryBuilder::load_driver_config`] reports them.
    pub fn from_driver_config(text: &str, file: &Path) -> Result<Self, RegistryError> {
        let doc: Value = serde_json::from_str(text).map_err(|e| RegistryError {
            file: file.to_owned(),
            line: Some(e.line()),
            json_path: None,
            message: format!("not valid JSON: {e}"),
        })?;
        read_listener(doc.get("config")).map_err(|(path, message)| RegistryError {
            file: file.to_owned(),
            line: None,
            json_path: Some(path),
            message,
        })
    }
}

impl RegistryBuilder {
    /// Adds the devices of a CSV file: `productKey,deviceName[,clientIp]` per line. A first line
    /// that starts with `productKey` is a header; blank lines and lines starting with `#` are
    /// skipped; fields are trimmed. Returns how many devices were added.
    pub fn load_csv(&mut self, text: &str, file: &Path) -> Result<usize, Vec<RegistryError>> {
        let mut errors = Vec::new();
        let mut added = 0;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if i == 0 && fields[0].eq_ignore_ascii_case("productKey") {
                continue;
            }
            let err = |message: String| RegistryError {
                file: file.to_owned(),
                line: Some(i + 1),
                json_path: None,
                message,
            };
            let (pk, dn, ip) = match fields.as_slice() {
                [pk, dn] => (*pk, *dn, None),
                [pk, dn, ip] => (*pk, *dn, Some(*ip).filter(|s| !s.is_empty())),
                _ => {
                    errors.push(err(format!(
                        "expected productKey,deviceName[,clientIp], found {} fields",
                        fields.len()
                    )));
                    continue;
                }
            };
            let Ok(client_ip) = ip.map(str::parse::<IpAddr>).transpose() else {
                errors.push(err(format!(
                    "clientIp {:?} is not an IP address",
                    ip.unwrap_or_default()
                )));
                continue;
            };
            match self.add_device(pk, dn, client_ip) {
                Ok(_) => added += 1,
                Err(message) => errors.push(err(message)),
            }
        }
        if errors.is_empty() {
            Ok(added)
        } else {
            Err(errors)
        }
    }

    /// Imports a Link IoT Edge driver config `{config, deviceList}`: every `deviceList` entry
    /// becomes a device, with `custom.clientIp` (a JSON document encoded as a string, or an
    /// object) as its allowed address. Returns the listener settings found in `config`.
    pub fn load_driver_config(
        &mut self,
        text: &str,
        file: &Path,
    ) -> Result<DriverListener, Vec<RegistryError>> {
        let err = |path: String, message: String| RegistryError {
            file: file.to_owned(),
            line: None,
            json_path: Some(path),
            message,
        };
        let doc: Value = serde_json::from_str(text).map_err(|e| {
            vec![RegistryError {
                file: file.to_owned(),
                line: Some(e.line()),
                json_path: None,
                message: format!("not valid JSON: {e}"),
            }]
        })?;
        let mut errors = Vec::new();
        let listener = match read_listener(doc.get("config")) {
            Ok(l) => l,
            Err((path, message)) => {
                errors.push(err(path, message));
                DriverListener::default()
            }
        };
        match doc.get("deviceList") {
            Some(Value::Array(list)) => {
                for (i, entry) in list.iter().enumerate() {
                    let at = format!("$.deviceList[{i}]");
                    if let Err((path, message)) = self.add_listed_device(entry, &at) {
                        errors.push(err(path, message));
                    }
                }
            }
            None => errors.push(err("$".into(), "no deviceList".into())),
            Some(_) => errors.push(err("$.deviceList".into(), "not an array".into())),
        }
        if errors.is_empty() {
            Ok(listener)
        } else {
            Err(errors)
        }
    }

    fn add_listed_device(&mut self, entry: &Value, at: &str) -> Result<(), (String, String)> {
        let field = |name: &str| match entry.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.as_str()),
            _ => Err((format!("{at}.{name}"), "missing or not a string".to_owned())),
        };
        let (pk, dn) = (field("productKey")?, field("deviceName")?);
        let custom_at = format!("{at}.custom");
        let custom = match entry.get("custom") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => Some(
                serde_json::from_str::<Value>(s)
                    .map_err(|e| (custom_at.clone(), format!("not a JSON document: {e}")))?,
            ),
            Some(obj @ Value::Object(_)) => Some(obj.clone()),
            Some(_) => return Err((custom_at, "not a JSON string or object".into())),
        };
        let client_ip = match custom.as_ref().and_then(|c| c.get("clientIp")) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.parse::<IpAddr>().map_err(|_| {
                (
                    format!("{custom_at}.clientIp"),
                    format!("{s:?} is not an IP address"),
                )
            })?),
            Some(_) => {
                return Err((format!("{custom_at}.clientIp"), "not a string".into()));
            }
        };
        self.add_device(pk, dn, client_ip)
            .map(drop)
            .map_err(|m| (at.to_owned(), m))
    }
}

/// Reads `ip`, `port`, `tls`, `cert`, `key` from `config.json` or else `config.kv`.
fn read_listener(config: Option<&Value>) -> Result<DriverListener, (String, String)> {
    let Some(config) = config else {
        return Ok(DriverListener::default());
    };
    let mut l = DriverListener::default();
    let mut set = |key: &str, v: &Value, at: String| -> Result<(), (String, String)> {
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => return Err((at, "not a string, number or bool".into())),
        };
        let bad = |what: &str| (at.clone(), format!("{text:?} is not {what}"));
        match key {
            "ip" => l.ip = Some(text.parse().map_err(|_| bad("an IP address"))?),
            "port" => {
                let port: u16 = text.parse().map_err(|_| bad("a port 1-65535"))?;
                if port == 0 {
                    return Err(bad("a port 1-65535"));
                }
                l.port = Some(port);
            }
            "tls" => {
                l.tls = Some(match text.as_str() {
                    "true" | "1" | "on" => true,
                    "false" | "0" | "off" => false,
                    _ => return Err(bad("true or false")),
                });
            }
            "cert" => l.cert = Some(PathBuf::from(text)),
            "key" => l.key = Some(PathBuf::from(text)),
            _ => {}
        }
        Ok(())
    };
    if let Some(Value::Object(json)) = config.get("json") {
        for (k, v) in json {
            set(k, v, format!("$.config.json.{k}"))?;
        }
    } else if let Some(Value::Array(kv)) = config.get("kv") {
        for (i, pair) in kv.iter().enumerate() {
            if let (Some(Value::String(k)), Some(v)) = (pair.get("key"), pair.get("value")) {
                set(k, v, format!("$.config.kv[{i}].value"))?;
            }
        }
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::models;
    use crate::registry::Registry;

    fn builder() -> RegistryBuilder {
        let mut b = Registry::builder();
        for m in models() {
            b.add_product(m).expect("distinct");
        }
        b
    }

    #[test]
    fn csv_with_header_comments_and_optional_ip() {
        let mut b = builder();
        let text = "productKey,deviceName,clientIp\n# lab\na1ThermoPK0, t1 ,192.168.1.50\n\na1LightPK00,l1\na1LightPK00,l2,\n";
        assert_eq!(b.load_csv(text, Path::new("devices.csv")), Ok(3));
        let r = b.build();
        let t1 = r.lookup("a1ThermoPK0", "t1").expect("loaded");
        assert_eq!(
            r.device(t1).client_ip,
            Some("192.168.1.50".parse().expect("ip"))
        );
        assert_eq!(
            r.device(r.lookup("a1LightPK00", "l2").expect("loaded"))
                .client_ip,
            None
        );
    }

    #[test]
    fn csv_reports_every_bad_line_with_file_and_line() {
        let mut b = builder();
        let text = "a1ThermoPK0,ok\nonlyone\nnope,x\na1ThermoPK0,bad,999.1.1.1\na1ThermoPK0,ok\n";
        let errors = b.load_csv(text, Path::new("conf/devices.csv")).unwrap_err();
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 4, "{shown:#?}");
        assert!(shown[0].starts_with("conf/devices.csv:2: expected productKey"));
        assert!(shown[1].starts_with("conf/devices.csv:3: unknown productKey \"nope\""));
        assert!(shown[2].starts_with("conf/devices.csv:4: clientIp \"999.1.1.1\""));
        assert!(shown[3].starts_with("conf/devices.csv:5: device a1ThermoPK0/ok is listed twice"));
    }

    #[test]
    fn driver_config_with_custom_as_string_object_or_missing() {
        let mut b = builder();
        let text = r#"{ "config": { "json": { "ip": "0.0.0.0", "port": 17682, "tls": true,
                        "cert": "server.cer", "key": "server.pvk" } },
          "deviceList": [
            { "productKey": "a1ThermoPK0", "deviceName": "thermo-01", "custom": "{\"clientIp\":\"192.168.1.50\"}" },
            { "productKey": "a1ThermoPK0", "deviceName": "thermo-02", "custom": {"clientIp": "10.0.0.9"} },
            { "productKey": "a1LightPK00", "deviceName": "lamp", "custom": "" },
            { "productKey": "a1LightPK00", "deviceName": "lamp2" } ] }"#;
        let l = b
            .load_driver_config(text, Path::new("gw_driverconfig.json"))
            .expect("valid");
        assert_eq!(
            l,
            DriverListener {
                ip: Some("0.0.0.0".parse().expect("ip")),
                port: Some(17682),
                tls: Some(true),
                cert: Some("server.cer".into()),
                key: Some("server.pvk".into()),
            }
        );
        let r = b.build();
        let ip = |dn| {
            r.device(r.lookup("a1ThermoPK0", dn).expect("loaded"))
                .client_ip
        };
        assert_eq!(ip("thermo-01"), Some("192.168.1.50".parse().expect("ip")));
        assert_eq!(ip("thermo-02"), Some("10.0.0.9".parse().expect("ip")));
        assert!(r.lookup("a1LightPK00", "lamp").is_some());
        assert_eq!(r.len(), 4);
    }

    #[test]
    fn driver_config_kv_listener_and_errors_with_json_paths() {
        let mut b = builder();
        let text = r#"{ "config": { "kv": [ {"key":"port","value":"18000","note":""}, {"key":"tls","value":"false"} ] },
          "deviceList": [
            { "productKey": "a1ThermoPK0", "deviceName": "x", "custom": "{not json" },
            { "productKey": "a1ThermoPK0", "deviceName": "y", "custom": "{\"clientIp\":\"abc\"}" },
            { "productKey": "a1ThermoPK0" } ] }"#;
        let errors = b.load_driver_config(text, Path::new("d.json")).unwrap_err();
        let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 3, "{shown:#?}");
        assert!(shown[0].starts_with("d.json: at $.deviceList[0].custom: not a JSON document"));
        assert!(shown[1].starts_with("d.json: at $.deviceList[1].custom.clientIp:"));
        assert!(shown[2].starts_with("d.json: at $.deviceList[2].deviceName:"));

        let mut b = builder();
        let ok = r#"{"config":{"kv":[{"key":"port","value":"18000"},{"key":"tls","value":"false"}]},"deviceList":[]}"#;
        let l = b
            .load_driver_config(ok, Path::new("d.json"))
            .expect("valid");
        assert_eq!((l.port, l.tls), (Some(18000), Some(false)));
    }

    #[test]
    fn driver_config_syntax_error_has_a_line() {
        let mut b = builder();
        let errors = b
            .load_driver_config("{\n\"deviceList\": [,]}", Path::new("d.json"))
            .unwrap_err();
        assert_eq!(errors[0].line, Some(2));
    }
}
