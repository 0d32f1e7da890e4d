//! A blocking echo server over `ringlink::ws::Echo`, for the Autobahn fuzzing client: the `ws`
//! module alone, without the drivers (`ringlink serve --echo` runs the same echo on them).
//!
//! `cargo run --release --example ws_echo -- [ADDR]` (default `127.0.0.1:9001`). One thread per
//! connection, a plain read/write loop. It prints `listening on <addr>` once bound (ADDR may
//! use port 0). Not part of the product.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use ringlink::ws::{Echo, Limits};

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9001".to_string());
    let listener = TcpListener::bind(&addr)?;
    println!("listening on {}", listener.local_addr()?);
    for stream in listener.incoming() {
        let stream = stream?;
        std::thread::spawn(move || {
            if let Err(e) = serve(stream) {
                eprintln!("connection: {e}");
            }
        });
    }
    Ok(())
}

fn serve(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    // Autobahn sends messages up to 16 MiB in its 9.x cases.
    let mut echo = Echo::new(Limits {
        max_message_bytes: 20 << 20,
        ..Limits::default()
    });
    let mut buf = vec![0; 4096];
    let mut filled = 0;
    let mut tx = Vec::new();
    loop {
        let wanted = echo.wanted_bytes().max(filled + 1);
        if buf.len() < wanted {
            buf.resize(wanted, 0);
        }
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[filled..])?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let consumed = echo.handle_input(&mut buf[..filled]);
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
        if echo.poll_transmit(&mut tx) {
            stream.write_all(&tx)?;
            tx.clear();
        }
        if echo.is_closed() {
            return Ok(());
        }
    }
}
