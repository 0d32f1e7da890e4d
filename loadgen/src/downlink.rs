//! Downlinks through the server's northbound API at a fixed open-loop rate, round robin over
//! this process's online devices, a weighted mix of get, set and call. Each HTTP round trip is
//! measured from its intended time.
//!
//! A set that succeeded is remembered; a later get of the same device asks for that property
//! and must return the value set, unless another set to the device started in between
//! (error kind `downlink_mismatch`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};
use tokio::time::sleep_until;

use crate::conn::{micros, OnlineSet};
use crate::http::HttpConn;
use crate::model::Model;
use crate::profile::Profile;
use crate::schedule::Schedule;
use crate::stats::{Hist, Stats};

/// The downlink generator of one process.
pub struct Downlinks {
    pub profile: Arc<Profile>,
    pub model: Arc<Model>,
    /// Every API of the gateway; each downlink goes to a random one.
    pub apis: Vec<SocketAddr>,
    pub online: Arc<OnlineSet>,
    /// Global device index of local device 0.
    pub first_device: u64,
    pub stats: Rc<RefCell<Stats>>,
    pub rate: f64,
    /// Idle keep-alive connections, one pool per API.
    pools: Vec<RefCell<Vec<HttpConn>>>,
    checks: RefCell<HashMap<usize, Check>>,
}

/// Per device: how many sets were started, and the last one that completed.
#[derive(Default)]
struct Check {
    sets_started: u64,
    last_set: Option<(u64, String, Value)>,
}

#[derive(Clone, Copy)]
enum Op {
    Get,
    Set,
    Call,
}

impl Downlinks {
    pub fn new(
        profile: Arc<Profile>,
        model: Arc<Model>,
        apis: Vec<SocketAddr>,
        online: Arc<OnlineSet>,
        first_device: u64,
        stats: Rc<RefCell<Stats>>,
        rate: f64,
    ) -> Self {
        Self {
            profile,
            model,
            pools: apis.iter().map(|_| RefCell::new(Vec::new())).collect(),
            apis,
            online,
            first_device,
            stats,
            rate,
            checks: RefCell::new(HashMap::new()),
        }
    }

    /// Issues downlinks from `start` until `stop`, then waits for those in flight.
    pub async fn run(self: Rc<Self>, start: Instant, stop: Instant) {
        let mut rng = fastrand::Rng::new();
        let Some(mut schedule) = Schedule::new(start, self.rate, 0.2, &mut rng) else {
            return;
        };
        let n = self.online.len();
        let settle = Duration::from_millis(self.profile.downlink_settle_ms);
        let mut cursor = 0;
        let mut tasks = Vec::new();
        loop {
            let at = schedule.next();
            if at >= stop {
                break;
            }
            sleep_until(at.into()).await;
            while let Some(intended) = schedule.take_due(Instant::now(), &mut rng) {
                let now = Instant::now();
                let Some(dev) = (0..n)
                    .map(|i| (cursor + i) % n)
                    .find(|&i| self.online.online_for(i, settle, now))
                else {
                    // Nothing online yet (ramp) or any more: no downlink is due.
                    continue;
                };
                cursor = (dev + 1) % n;
                let op = self.pick(&mut rng);
                let this = self.clone();
                let seed = rng.u64(..);
                tasks.push(tokio::task::spawn_local(async move {
                    this.one(dev, op, intended, seed).await;
                }));
                tasks.retain(|t| !t.is_finished());
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    fn pick(&self, rng: &mut fastrand::Rng) -> Op {
        let m = self.profile.downlink_mix;
        let x = rng.f64() * (m.get + m.set + m.call);
        if x < m.get {
            Op::Get
        } else if x < m.get + m.set {
            Op::Set
        } else {
            Op::Call
        }
    }

    async fn one(&self, dev: usize, op: Op, intended: Instant, seed: u64) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let model = &*self.model;
        let name = self.profile.device_name(self.first_device + dev as u64);
        let base = format!("/v1/devices/{}/{}", model.product_key, name);
        let mut expect: Option<(u64, String, Value)> = None;
        let mut set: Option<(u64, String, Value)> = None;
        let (path, body) = match op {
            Op::Get => {
                let checks = self.checks.borrow();
                let check = checks.get(&dev);
                let prop = match check.and_then(|c| c.last_set.clone()) {
                    Some((gen, prop, value)) => {
                        expect = Some((gen, prop.clone(), value));
                        prop
                    }
                    None => model.properties[rng.usize(..model.properties.len())]
                        .id
                        .clone(),
                };
                (
                    format!("{base}/properties/get"),
                    json!({ "properties": [prop] }),
                )
            }
            Op::Set => {
                let candidates: Vec<_> = model
                    .properties
                    .iter()
                    .filter(|p| p.writable && p.spec.is_scalar())
                    .collect();
                if candidates.is_empty() {
                    return;
                }
                let prop = candidates[rng.usize(..candidates.len())];
                let value = prop.spec.generate(&mut rng);
                let mut checks = self.checks.borrow_mut();
                let check = checks.entry(dev).or_default();
                check.sets_started += 1;
                set = Some((check.sets_started, prop.id.clone(), value.clone()));
                let mut props = Map::new();
                props.insert(prop.id.clone(), value);
                (
                    format!("{base}/properties/set"),
                    json!({ "properties": props }),
                )
            }
            Op::Call => {
                if model.services.is_empty() {
                    return;
                }
                let s = &model.services[rng.usize(..model.services.len())];
                let input: Map<String, Value> = s
                    .inputs
                    .iter()
                    .map(|(id, spec)| (id.clone(), spec.generate(&mut rng)))
                    .collect();
                (
                    format!("{base}/services/{}", s.id),
                    json!({ "inputData": input }),
                )
            }
        };
        self.stats.borrow_mut().counters.downlinks_sent += 1;
        let body = body.to_string();
        let result = self.post(&path, body.as_bytes()).await;
        let now = Instant::now();
        let mut stats = self.stats.borrow_mut();
        let Ok(res) = result else {
            stats.error("downlink_io");
            return;
        };
        let doc: Value = serde_json::from_slice(&res.body).unwrap_or(Value::Null);
        let code = doc.get("code").and_then(Value::as_u64);
        if res.status != 200 || code != Some(0) {
            stats.error(&format!(
                "downlink_http_{}_code_{}",
                res.status,
                code.map_or_else(|| "none".to_owned(), |c| c.to_string())
            ));
            return;
        }
        stats.record(Hist::Downlink, micros(now - intended));
        stats.counters.downlinks_ok += 1;
        let mut checks = self.checks.borrow_mut();
        let check = checks.entry(dev).or_default();
        if let Some(set) = set {
            if set.0 == check.sets_started {
                check.last_set = Some(set);
            }
        }
        if let Some((gen, prop, want)) = expect {
            // Only if no other set started since the one whose value we expect.
            if gen == check.sets_started {
                let got = doc.pointer(&format!("/properties/{prop}"));
                if !got.is_some_and(|g| same(g, &want)) {
                    stats.error("downlink_mismatch");
                }
            }
        }
    }

    /// POSTs to a random API on a pooled keep-alive connection, with the profile's request
    /// timeout.
    async fn post(&self, path: &str, body: &[u8]) -> anyhow::Result<crate::http::Response> {
        let i = fastrand::usize(..self.apis.len());
        let pooled = self.pools[i].borrow_mut().pop();
        let timeout = Duration::from_millis(self.profile.request_timeout_ms);
        let res = tokio::time::timeout(timeout, async {
            let mut conn = match pooled {
                Some(c) => c,
                None => HttpConn::connect(self.apis[i])
                    .await?
                    .with_token(self.profile.api_token.as_deref()),
            };
            let res = conn.request("POST", path, Some(body)).await?;
            anyhow::Ok((conn, res))
        })
        .await??;
        let (conn, res) = res;
        if res.keep_alive {
            self.pools[i].borrow_mut().push(conn);
        }
        Ok(res)
    }
}

/// Equal as the API may render it: numbers by value, bools as 0/1.
fn same(a: &Value, b: &Value) -> bool {
    let num = |v: &Value| match v {
        Value::Bool(x) => Some(f64::from(u8::from(*x))),
        other => other.as_f64(),
    };
    match (num(a), num(b)) {
        (Some(x), Some(y)) => (x - y).abs() < 1e-9,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_values_compare_by_value() {
        assert!(same(&json!(21.5), &json!(21.5)));
        assert!(same(&json!(21), &json!(21.0)));
        assert!(same(&json!(true), &json!(1)));
        assert!(same(&json!("ab"), &json!("ab")));
        assert!(!same(&json!("ab"), &json!("ac")));
        assert!(!same(&json!(2), &json!(1)));
    }
}
