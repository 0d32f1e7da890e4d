//! A blocking echo server over `ringlink::ws::Conn`, for the Autobahn fuzzing client.
//!
//! `cargo run --release --example ws_echo -- [ADDR]` (default `127.0.0.1:9001`). One thread per
//! connection, a plain read/write loop; every message is echoed with its own opcode. It prints
//! `listening on <addr>` once bound (ADDR may use port 0). Not part of the product.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use ringlink::ws::encode::write_frame;
use ringlink::ws::frame::Opcode;
use ringlink::ws::{Conn, Event, Limits};

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
    let limits = Limits {
        max_message_bytes: 20 << 20,
        ..Limits::default()
    };
    let mut conn = Conn::server(limits);
    let mut buf = vec![0; 4096];
    let mut filled = 0;
    let mut tx = Vec::new();
    loop {
        if buf.len() < conn.wanted_bytes() {
            buf.resize(conn.wanted_bytes(), 0);
        }
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[filled..])?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let mut start = 0;
        let failed = loop {
            let event = match conn.read(&mut buf[start..filled], &mut tx) {
                Ok(event) => event,
                Err(e) => break Some(e),
            };
            let consumed = match event {
                Event::NeedMore => break None,
                Event::Consumed(n)
                | Event::Pong { consumed: n }
                | Event::Closed { consumed: n, .. } => n,
                Event::Message {
                    consumed,
                    binary,
                    data,
                } => {
                    // A server frame needs no mask, so the free encoder can be used while `data`
                    // still borrows the Conn.
                    let opcode = if binary { Opcode::Binary } else { Opcode::Text };
                    write_frame(&mut tx, opcode, true, None, data);
                    consumed
                }
            };
            start += consumed;
        };
        buf.copy_within(start..filled, 0);
        filled -= start;
        if !tx.is_empty() {
            stream.write_all(&tx)?;
            tx.clear();
        }
        if let Some(e) = failed {
            eprintln!("closing: {e}");
            return Ok(());
        }
        if conn.is_closed() {
            return Ok(());
        }
    }
}
