//! loadgen keeps reading while it writes. A server that stops reading a connection until the
//! client has taken what the server sent (ringlink does that under backpressure) must not
//! deadlock it.
//!
//! A fake server on a blocking socket with 4 KiB buffers answers the `onlineDevice` and then,
//! reading nothing more, writes 4 MiB of Ping frames. loadgen meanwhile sends reports as fast as
//! its profile says, so its own writes stall on the unread socket almost at once. A client that
//! reads only between writes never takes the pings and the server's write times out; one that
//! reads while a write waits lets it finish.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringlink::ws::{self, Event};
use socket2::{Domain, Socket, Type};

const PINGS: usize = 32_768;
const PING: [u8; 127] = {
    let mut f = [b'p'; 127];
    f[0] = 0x89; // FIN + Ping, unmasked (server to client)
    f[1] = 125;
    f
};

/// A listener whose accepted sockets have 4 KiB send and receive buffers.
fn small_buffer_listener() -> TcpListener {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    s.set_send_buffer_size(4096).expect("SO_SNDBUF");
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    s.bind(&addr.into()).expect("bind");
    s.listen(1).expect("listen");
    s.into()
}

/// Reads until the client's `onlineDevice` and answers it; false if the client went away.
fn answer_online(sock: &mut TcpStream) -> bool {
    let mut conn = ws::Conn::server(ws::Limits::default());
    let (mut buf, mut len, mut tx) = (vec![0u8; 65_536], 0, Vec::new());
    loop {
        match sock.read(&mut buf[len..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => len += n,
        }
        let mut pos = 0;
        loop {
            match conn.read(&mut buf[pos..len], &mut tx) {
                Ok(Event::Message { consumed, data, .. }) => {
                    let text = String::from_utf8_lossy(data);
                    let v: serde_json::Value =
                        serde_json::from_str(text.trim_end_matches('\0')).expect("json");
                    assert_eq!(v["method"], "onlineDevice", "{v}");
                    let reply = format!(
                        r#"{{"code":0,"message":"success","messageId":{},"payload":{{}}}}"#,
                        v["messageId"]
                    );
                    conn.send_text(&mut tx, reply.as_bytes());
                    sock.write_all(&tx).expect("reply");
                    let _ = consumed;
                    return true;
                }
                Ok(Event::Consumed(n) | Event::Pong { consumed: n }) => pos += n,
                Ok(Event::NeedMore) => break,
                other => panic!("unexpected {other:?}"),
            }
            sock.write_all(&tx).expect("handshake answer");
            tx.clear();
        }
        buf.copy_within(pos..len, 0);
        len -= pos;
    }
}

#[test]
fn a_server_that_stops_reading_does_not_deadlock_loadgen() {
    let listener = small_buffer_listener();
    let port = listener.local_addr().expect("addr").port();
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().expect("accept");
        if !answer_online(&mut sock) {
            let _ = done.send(Err("the client left before onlining".to_owned()));
            return;
        }
        // From here on nothing is read. The write needs the client to read ~4 MiB meanwhile.
        sock.set_write_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let start = Instant::now();
        let mut pings = Vec::with_capacity(PINGS * PING.len());
        for _ in 0..PINGS {
            pings.extend_from_slice(&PING);
        }
        let outcome = match sock.write_all(&pings) {
            Ok(()) => Ok(()),
            Err(e) => Err(format!(
                "the client stopped reading while it wrote ({e} after {:?})",
                start.elapsed()
            )),
        };
        let _ = done.send(outcome);
        // Keep the socket until loadgen is done with it.
        std::thread::sleep(Duration::from_secs(5));
    });

    let dir = std::env::temp_dir().join(format!("loadgen-bp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let profile = dir.join("flood.toml");
    std::fs::write(
        &profile,
        "connections = 1\ndevices_per_connection = 1\nramp_per_second = 0\n\
         report_rate_per_device = 20000\nevent_ratio = 0.0\nduration_s = 3\nthreads = 1\n\
         request_timeout_ms = 1000\n",
    )
    .expect("profile");
    // loadgen's own verdict is beside the point (nothing is answered after the online).
    let mut loadgen = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg(&profile)
        .args(["--target", &format!("ws://127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run loadgen");
    let outcome = result
        .recv_timeout(Duration::from_secs(20))
        .expect("the fake server finished");
    let _ = loadgen.kill();
    let _ = loadgen.wait();
    let _ = std::fs::remove_dir_all(&dir);
    // A write that made no progress for 5 s is the deadlock; any finished write is not.
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
