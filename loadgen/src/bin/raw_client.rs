//! The client side of the ceiling in `benches/compare.sh`: sends the bytes of a real masked
//! reportProperty frame to a TCP echo on an open-loop schedule and counts a message done when
//! as many bytes came back. No WebSocket or JSON work on either side, so against
//! `examples/raw_echo.rs` it measures what the kernel and loopback allow for the same bytes.
//!
//! `raw_client --target IP:PORT --connections N --rate MSGS_PER_S_PER_CONNECTION --duration S`
//! prints one JSON line: `{"msgs_per_s":..,"p50_ms":..,"p99_ms":..,"sent":..,"done":..}`.
//! With `--closed` each connection instead keeps one message in flight (loadgen's
//! `closed_loop`): the next is sent when the previous one is back, `--rate` is not used, and
//! latency is the round trip.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use hdrhistogram::Histogram;
use loadgen::pace::{self, Pacer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Messages per second per connection (open loop).
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Wake senders precisely (loadgen's `pacing = "spin"`) instead of with tokio timers.
    #[arg(long)]
    spin: bool,
    /// Closed loop: one message in flight per connection, no schedule.
    #[arg(long, conflicts_with = "spin")]
    closed: bool,
}

/// One masked report frame, as loadgen sends them.
fn frame() -> Vec<u8> {
    let report = "{\"version\":\"1.0\",\"messageId\":4711,\"method\":\"reportProperty\",\"payload\":{\"productKey\":\"a1ThermoPK0\",\"deviceName\":\"thermo-00042\",\"properties\":[{\"identifier\":\"power\",\"type\":\"bool\",\"value\":1},{\"identifier\":\"setpoint\",\"type\":\"float\",\"value\":21.5}]}}\0";
    let mut out = Vec::new();
    ringlink::ws::Conn::client(ringlink::ws::Limits::default())
        .send_text(&mut out, report.as_bytes());
    out
}

struct Shared {
    /// Intended send times of the messages not echoed yet, per connection.
    hist: RefCell<Histogram<u64>>,
    done: RefCell<u64>,
    sent: RefCell<u64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let shared = Rc::new(Shared {
        hist: RefCell::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
        done: RefCell::new(0),
        sent: RefCell::new(0),
    });
    let frame = Rc::new(frame());
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.duration);
    local.block_on(&rt, async {
        let pacer = args.spin.then(Pacer::new);
        let pacer_task = pacer.clone().map(|p| tokio::task::spawn_local(p.run()));
        let mut tasks = Vec::new();
        for _ in 0..args.connections {
            let stream = TcpStream::connect(args.target)
                .await
                .context("connect to the echo")?;
            stream.set_nodelay(true)?;
            if args.closed {
                tasks.push(tokio::task::spawn_local(closed_loop(
                    stream,
                    Rc::clone(&frame),
                    Rc::clone(&shared),
                    deadline,
                )));
                continue;
            }
            let (mut rd, mut wr) = stream.into_split();
            let queue = Rc::new(RefCell::new(VecDeque::<Instant>::new()));
            let interval = Duration::from_secs_f64(1.0 / args.rate);
            let (f, q, s) = (Rc::clone(&frame), Rc::clone(&queue), Rc::clone(&shared));
            let waiter = pacer.as_ref().map(Pacer::waiter);
            tasks.push(tokio::task::spawn_local(async move {
                let mut next = Instant::now();
                while next < deadline {
                    pace::wait_until(waiter.as_ref(), next).await;
                    // Open loop: send everything that is due, each at its intended time.
                    let now = Instant::now();
                    let mut burst = Vec::new();
                    while next <= now && next < deadline {
                        burst.extend_from_slice(&f);
                        q.borrow_mut().push_back(next);
                        next += interval;
                    }
                    *s.sent.borrow_mut() += (burst.len() / f.len()) as u64;
                    if wr.write_all(&burst).await.is_err() {
                        return;
                    }
                }
            }));
            let (len, q, s) = (frame.len(), queue, Rc::clone(&shared));
            tasks.push(tokio::task::spawn_local(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut pending = 0usize;
                loop {
                    let n = match tokio::time::timeout_at(
                        (deadline + Duration::from_secs(2)).into(),
                        rd.read(&mut buf),
                    )
                    .await
                    {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return,
                    };
                    pending += n;
                    let now = Instant::now();
                    while pending >= len {
                        pending -= len;
                        if let Some(intended) = q.borrow_mut().pop_front() {
                            // Only what came back within the run counts, for throughput too.
                            if now <= deadline {
                                let us = now.saturating_duration_since(intended).as_micros() as u64;
                                let _ = s.hist.borrow_mut().record(us.max(1));
                                *s.done.borrow_mut() += 1;
                            }
                        }
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        if let Some(t) = pacer_task {
            t.abort();
        }
        anyhow::Ok(())
    })?;
    let elapsed = args.duration as f64;
    let hist = shared.hist.borrow();
    let done = *shared.done.borrow();
    println!(
        "{{\"msgs_per_s\":{:.0},\"p50_ms\":{:.3},\"p99_ms\":{:.3},\"sent\":{},\"done\":{}}}",
        done as f64 / elapsed,
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        *shared.sent.borrow(),
        done
    );
    Ok(())
}

/// One connection of `--closed`: send, wait for all of it to come back, record, repeat.
async fn closed_loop(mut stream: TcpStream, frame: Rc<Vec<u8>>, s: Rc<Shared>, deadline: Instant) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let sent = Instant::now();
        if sent >= deadline || stream.write_all(&frame).await.is_err() {
            return;
        }
        *s.sent.borrow_mut() += 1;
        let mut got = 0;
        while got < frame.len() {
            match tokio::time::timeout_at(
                (deadline + Duration::from_secs(2)).into(),
                stream.read(&mut buf),
            )
            .await
            {
                Ok(Ok(n)) if n > 0 => got += n,
                _ => return,
            }
        }
        let now = Instant::now();
        if now <= deadline {
            let us = now.saturating_duration_since(sent).as_micros() as u64;
            let _ = s.hist.borrow_mut().record(us.max(1));
            *s.done.borrow_mut() += 1;
        }
    }
}
