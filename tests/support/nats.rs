//! A real NATS JetStream cluster for the NATS integration tests: n `nats-server` processes on
//! free loopback ports (client, cluster route and monitoring port each), JetStream stores in a
//! temp dir per server, routes between all of them. Ready when every client port accepts and
//! every server's `/jsz` names a meta leader; a server can be killed with SIGKILL and restarted
//! on the same ports and store. No fixed ports, no sleeps to wait for readiness.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::ApiClient;

/// The cluster's name in every server's `cluster {}` block.
pub const CLUSTER_NAME: &str = "ringlink";

/// One server of the cluster: its ports and directory stay the same across restarts.
struct Server {
    name: String,
    client_port: u16,
    route_port: u16,
    http_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// A running (or partly killed) NATS cluster.
pub struct NatsCluster {
    servers: Vec<Server>,
}

/// The nats-server binary: from PATH, else /usr/sbin or /usr/bin.
fn binary() -> PathBuf {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nats-server"))
            .find(|p| p.is_file())
    });
    from_path
        .or_else(|| {
            ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        })
        .expect("nats-server not found: tests/run.sh installs it (apt-get install nats-server)")
}

/// `n` distinct free ports: all bound at once so none repeats, then released for the servers.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind port 0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

impl Server {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }

    fn write_config(&self, routes: &[u16]) -> PathBuf {
        let store = self.dir.join("jetstream");
        let mut conf = format!(
            "server_name: {name}\nlisten: \"127.0.0.1:{client}\"\nhttp: \"127.0.0.1:{http}\"\n\
             log_file: \"{log}\"\njetstream {{\n  store_dir: \"{store}\"\n  max_memory_store: 64MB\n  \
             max_file_store: 1GB\n}}\n",
            name = self.name,
            client = self.client_port,
            http = self.http_port,
            log = self.dir.join("nats.log").display(),
            store = store.display(),
        );
        if !routes.is_empty() {
            let routes: Vec<String> = routes
                .iter()
                .map(|p| format!("    \"nats-route://127.0.0.1:{p}\""))
                .collect();
            conf.push_str(&format!(
                "cluster {{\n  name: {CLUSTER_NAME}\n  listen: \"127.0.0.1:{}\"\n  routes: [\n{}\n  ]\n}}\n",
                self.route_port,
                routes.join("\n")
            ));
        }
        let path = self.dir.join("nats.conf");
        std::fs::write(&path, conf).expect("write nats.conf");
        path
    }

    /// Starts the process and waits until its client port accepts connections, or it exits.
    fn spawn(&mut self, routes: &[u16], within: Duration) -> Result<(), String> {
        let conf = self.write_config(routes);
        let mut child = Command::new(binary())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        let deadline = Instant::now() + within;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Err(format!(
                    "{} exited with {status}: {}",
                    self.name,
                    self.log()
                ));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{}: port {} not open in time: {}",
                    self.name,
                    self.client_port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL nats-server");
            child.wait().expect("wait for nats-server");
        }
    }

    /// `(status, body)` of a GET on the monitoring port.
    fn monitor(&self, path: &str) -> std::io::Result<(u16, String)> {
        ApiClient(SocketAddr::from(([127, 0, 0, 1], self.http_port))).try_request("GET", path, None)
    }

    /// The meta group's leader as this server sees it (from `/jsz`), if any.
    fn meta_leader(&self) -> Option<String> {
        let (status, body) = self.monitor("/jsz").ok()?;
        if status != 200 {
            return None;
        }
        let jsz: Value = serde_json::from_str(&body).ok()?;
        let leader = jsz["meta_cluster"]["leader"].as_str()?;
        (!leader.is_empty()).then(|| leader.to_owned())
    }
}

impl NatsCluster {
    /// Starts `n` servers (`n1`..), each with JetStream, routed to all the others when `n > 1`,
    /// and waits until the cluster has a JetStream meta leader (a lone server: its client port). Retries on new ports if another
    /// process takes one between our probe and the servers' binds.
    pub fn start(n: usize) -> Self {
        assert!(n >= 1, "a cluster needs at least one server");
        let dir = super::temp_dir("nats");
        let mut last = String::new();
        for attempt in 0..5 {
            let ports = free_ports(3 * n);
            let mut cluster = Self {
                servers: (0..n)
                    .map(|i| {
                        let name = format!("n{}", i + 1);
                        let sdir = dir.join(format!("{name}-{attempt}"));
                        std::fs::create_dir_all(&sdir).expect("server dir");
                        Server {
                            name,
                            client_port: ports[3 * i],
                            route_port: ports[3 * i + 1],
                            http_port: ports[3 * i + 2],
                            dir: sdir,
                            child: None,
                        }
                    })
                    .collect(),
            };
            match cluster.spawn_all() {
                Ok(()) => return cluster,
                Err(e) => last = e,
            }
        }
        panic!("nats cluster did not start: {last}");
    }

    fn routes(&self) -> Vec<u16> {
        if self.servers.len() > 1 {
            self.servers.iter().map(|s| s.route_port).collect()
        } else {
            Vec::new()
        }
    }

    fn spawn_all(&mut self) -> Result<(), String> {
        let routes = self.routes();
        for s in &mut self.servers {
            s.spawn(&routes, Duration::from_secs(10))?;
        }
        if self.servers.len() == 1 {
            // A lone server has no meta group: its open client port is readiness.
            return Ok(());
        }
        for i in 0..self.servers.len() {
            self.wait_meta_leader(i, Duration::from_secs(30))?;
        }
        Ok(())
    }

    /// Waits until server `i` (running) sees a meta leader.
    fn wait_meta_leader(&mut self, i: usize, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let s = &mut self.servers[i];
            if let Some(child) = s.child.as_mut() {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    s.child = None;
                    return Err(format!("{} exited with {status}: {}", s.name, s.log()));
                }
            }
            if s.meta_leader().is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("{}: no JetStream meta leader: {}", s.name, s.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// `nats://127.0.0.1:port` of every server, in order.
    pub fn urls(&self) -> Vec<String> {
        (0..self.servers.len()).map(|i| self.url(i)).collect()
    }

    /// `nats://127.0.0.1:port` of server `i` (0-based; its name is `n{i+1}`).
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].client_port)
    }

    pub fn client_port(&self, i: usize) -> u16 {
        self.servers[i].client_port
    }

    /// The index of the server listening on client port `port`.
    pub fn index_of_port(&self, port: u16) -> Option<usize> {
        self.servers.iter().position(|s| s.client_port == port)
    }

    pub fn name(&self, i: usize) -> &str {
        &self.servers[i].name
    }

    pub fn dir(&self, i: usize) -> &Path {
        &self.servers[i].dir
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.servers[i].child.is_some()
    }

    /// Server `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        self.servers[i].log()
    }

    /// A GET on server `i`'s monitoring port, e.g. `/jsz?streams=true`, as JSON.
    pub fn monitor(&self, i: usize, path: &str) -> Value {
        let (status, body) = self.servers[i]
            .monitor(path)
            .unwrap_or_else(|e| panic!("{} {path}: {e}", self.servers[i].name));
        assert_eq!(status, 200, "{} {path}: {body}", self.servers[i].name);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// Waits until server `i`'s `/healthz` answers 200 (JetStream current: its streams and
    /// consumers caught up), at most `within`.
    pub fn wait_healthy(&self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.servers[i].monitor("/healthz") {
                Ok((200, _)) => return,
                Ok((status, body)) => last = format!("{status} {body}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{} not healthy in time: {last}", self.servers[i].name);
    }

    /// SIGKILL server `i`, then reap the process.
    pub fn kill9(&mut self, i: usize) {
        self.servers[i].kill9();
    }

    /// Starts server `i` again on the same ports and store dir (after [`NatsCluster::kill9`];
    /// kills it first if it still runs), retrying for a few seconds while a port is busy, and
    /// waits until it sees a meta leader again.
    pub fn restart(&mut self, i: usize) {
        self.servers[i].kill9();
        let routes = self.routes();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.servers[i].spawn(&routes, Duration::from_secs(5)) {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => panic!("nats-server did not restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        if let Err(e) = self.wait_meta_leader(i, Duration::from_secs(30)) {
            panic!("restarted server has no meta leader: {e}");
        }
    }

    /// Kills every server.
    pub fn stop(&mut self) {
        for s in &mut self.servers {
            if let Some(mut child) = s.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
