//! The ceiling for `benches/compare.sh`: a minimal io_uring TCP echo (tokio-uring, one ring,
//! one thread). It sends back every byte it reads and does nothing else: no WebSocket, no JSON,
//! so what a client measures against it is what the kernel and loopback allow.
//!
//! `cargo run --release --example raw_echo -- [ADDR]` (default `127.0.0.1:0`); prints
//! `listening on <addr>`. Not part of the product.

use std::net::SocketAddr;
use std::rc::Rc;

use tokio_uring::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()
        .map_err(|e| std::io::Error::other(format!("address: {e}")))?;
    tokio_uring::start(async move {
        let listener = TcpListener::bind(addr)?;
        println!("listening on {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio_uring::spawn(echo(Rc::new(stream)));
        }
    })
}

async fn echo(stream: Rc<TcpStream>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let (res, b) = stream.read(buf).await;
        let n = match res {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let (res, slice) = stream
            .write_all(tokio_uring::buf::BoundedBuf::slice(b, ..n))
            .await;
        buf = slice.into_inner();
        if res.is_err() {
            return;
        }
    }
}
