//! A real Mosquitto broker for the MQTT client's integration tests: started on a free loopback
//! port with a generated config in a temp dir, ready when a TCP connect succeeds, killable with
//! SIGKILL and restartable on the same port. No fixed ports, no sleeps to wait for readiness.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to run the broker.
#[derive(Debug, Clone, Default)]
pub struct MosquittoConfig {
    /// `persistence true` with a persistence dir in the temp dir (saved on every change).
    pub persistence: bool,
    /// A TLS listener with this `(ca, cert, key)` PEM files instead of plain TCP.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

/// A running (or killed) mosquitto process.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    config: MosquittoConfig,
}

/// The mosquitto binary: from PATH, else /usr/sbin.
fn binary() -> PathBuf {
    let from_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("mosquitto"))
            .find(|p| p.is_file())
    });
    from_path
        .or_else(|| Some(PathBuf::from("/usr/sbin/mosquitto")).filter(|p| p.is_file()))
        .expect("mosquitto not found: tests/run.sh installs it (apt-get install mosquitto)")
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

impl Mosquitto {
    /// A plain broker without persistence.
    pub fn start() -> Self {
        Self::start_with(MosquittoConfig::default())
    }

    /// A broker with the given configuration, on a free port (retried if another process
    /// takes the port between our probe and mosquitto's bind).
    pub fn start_with(config: MosquittoConfig) -> Self {
        let dir = super::temp_dir("mosquitto");
        let mut last = String::new();
        for _ in 0..5 {
            let mut m = Self {
                child: None,
                port: free_port(),
                dir: dir.clone(),
                config: config.clone(),
            };
            match m.spawn(Duration::from_secs(10)) {
                Ok(()) => return m,
                Err(e) => last = e,
            }
        }
        panic!("mosquitto did not start: {last}");
    }

    fn write_config(&self) -> PathBuf {
        let mut conf = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\nuser root\nset_tcp_nodelay true\n\
             max_queued_messages 0\nmax_inflight_messages 100\nlog_dest file {}\n\
             log_type error\nlog_type warning\nlog_type notice\n",
            self.port,
            self.dir.join("mosquitto.log").display()
        );
        if self.config.persistence {
            let db = self.dir.join("db");
            std::fs::create_dir_all(&db).expect("persistence dir");
            conf.push_str(&format!(
                "persistence true\npersistence_location {}/\n\
                 autosave_interval 1\n",
                db.display()
            ));
        } else {
            conf.push_str("persistence false\n");
        }
        if let Some((ca, cert, key)) = &self.config.tls {
            conf.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                ca.display(),
                cert.display(),
                key.display()
            ));
        }
        let path = self.dir.join("mosquitto.conf");
        std::fs::write(&path, conf).expect("write mosquitto.conf");
        path
    }

    /// Starts the process and waits until its port accepts connections, or it exits.
    fn spawn(&mut self, within: Duration) -> Result<(), String> {
        let conf = self.write_config();
        let mut child = Command::new(binary())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        let deadline = Instant::now() + within;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Err(format!("exited with {status}: {}", self.log()));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "port {} not open in time: {}",
                    self.port,
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// `mqtt://127.0.0.1:port` (or `mqtts://localhost:port` with TLS, matching the test
    /// certificate's name).
    pub fn url(&self) -> String {
        match self.config.tls {
            Some(_) => format!("mqtts://localhost:{}", self.port),
            None => format!("mqtt://127.0.0.1:{}", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// With persistence: forces a save of the in-memory database (SIGUSR1) and waits until the
    /// database file has been rewritten.
    pub fn save(&self) {
        assert!(self.config.persistence, "save() needs persistence");
        let db = self.dir.join("db/mosquitto.db");
        let mtime = || std::fs::metadata(&db).and_then(|m| m.modified()).ok();
        let before = mtime();
        let pid = self.child.as_ref().expect("running").id();
        let ok = Command::new("kill")
            .args(["-USR1", &pid.to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -USR1 failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while mtime() == before {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not save {}",
                db.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, then reap the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL mosquitto");
            child.wait().expect("wait for mosquitto");
        }
    }

    /// Starts the broker again on the same port (after [`Mosquitto::kill9`]; kills it first
    /// if it still runs), retrying for a few seconds while the port is busy.
    pub fn restart(&mut self) {
        self.kill9();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn(Duration::from_secs(5)) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("mosquitto did not restart: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
