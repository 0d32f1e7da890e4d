//! Tests over real loopback sockets and real files.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{Completion, Recv, Ring, RingConfig};

fn config(buffers: u16, buffer_size: u32) -> RingConfig {
    RingConfig {
        entries: 256,
        buffers,
        buffer_size,
        accept_backoff: Duration::from_millis(50),
        accept_one_at_a_time: false,
    }
}

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

/// A connected pair: (client, server side), the server side accepted without the ring.
fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (server, _) = l.accept().unwrap();
    (client, server)
}

/// Feeds completions to `f` until it returns true; panics after `secs` seconds.
fn drive(ring: &mut Ring, secs: u64, mut f: impl FnMut(&mut Ring, Completion) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        while let Some(c) = ring.poll() {
            if f(ring, c) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "timed out");
        ring.wait(Some(deadline)).unwrap();
    }
}

/// Runs the ring for `ms` milliseconds, handing every completion to `f`.
fn run_for(ring: &mut Ring, ms: u64, mut f: impl FnMut(&mut Ring, Completion)) {
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline {
        ring.wait(Some(deadline)).unwrap();
        while let Some(c) = ring.poll() {
            f(ring, c);
        }
    }
}

/// Copies the bytes of a `Data` out and gives the buffer back.
fn take(ring: &mut Ring, buf: super::Buf) -> Vec<u8> {
    let bytes = ring.bytes_mut(&buf).to_vec();
    ring.give_back(buf);
    bytes
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ seed.wrapping_mul(31))
        .collect()
}

#[test]
fn setup_mode_is_reported() {
    let ring = Ring::new(config(8, 64)).unwrap();
    assert!(!ring.setup_mode().is_empty());
    eprintln!("io_uring setup mode: {}", ring.setup_mode());
}

#[test]
fn echo_50_connections_100_messages_each() {
    let mut ring = Ring::new(config(64, 4096)).unwrap();
    let (l, addr) = listener();
    ring.listen(l);
    let clients: Vec<_> = (0..50u8)
        .map(|c| {
            thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                for i in 0..100usize {
                    let msg = pattern(1 + (i * 37 + usize::from(c)) % 300, c ^ i as u8);
                    s.write_all(&msg).unwrap();
                    let mut back = vec![0; msg.len()];
                    s.read_exact(&mut back).unwrap();
                    assert_eq!(back, msg, "client {c} message {i}");
                }
                s.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty());
            })
        })
        .collect();
    let (mut next, mut released) = (0, 0);
    drive(&mut ring, 30, |ring, c| {
        match c {
            Completion::Accepted { stream, .. } => {
                ring.start(next, stream);
                next += 1;
            }
            Completion::Data { slot, buf } => {
                let bytes = take(ring, buf);
                ring.send(slot, bytes);
            }
            Completion::Sent { result, .. } => result.unwrap(),
            Completion::Closed { slot } => ring.release(slot),
            Completion::Released { .. } => released += 1,
            other => panic!("unexpected {other:?}"),
        }
        released == 50
    });
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(ring.free_buffers(), 64);
    assert_eq!(ring.stats().stale, 0);
}

#[test]
fn idle_connections_hold_no_buffer() {
    let mut ring = Ring::new(config(1024, 4096)).unwrap();
    let (l, _) = listener();
    let mut clients = Vec::new();
    for slot in 0..200 {
        let (client, server) = pair(&l);
        ring.start(slot, server);
        clients.push(client);
    }
    run_for(&mut ring, 200, |_, c| panic!("unexpected {c:?}"));
    assert_eq!(ring.free_buffers(), 1024);
    assert_eq!(ring.kernel_free_buffers().unwrap(), 1024);
    // every recv is armed: the connections are not idle for lack of a recv
    assert!(ring.slots.iter().all(|s| s.recv == Recv::Armed));

    // the counters do see a buffer that is held
    clients[7].write_all(b"x").unwrap();
    let mut held = None;
    drive(&mut ring, 5, |_, c| match c {
        Completion::Data { slot: 7, buf } => {
            held = Some(buf);
            true
        }
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(ring.free_buffers(), 1023);
    assert_eq!(ring.kernel_free_buffers().unwrap(), 1023);
    ring.give_back(held.unwrap());
    assert_eq!(ring.free_buffers(), 1024);
    assert_eq!(ring.kernel_free_buffers().unwrap(), 1024);
}

#[test]
fn enobufs_recovers_and_keeps_order() {
    let mut ring = Ring::new(config(4, 64)).unwrap();
    let (l, _) = listener();
    let mut writers = Vec::new();
    let mut expected = Vec::new();
    for slot in 0..3 {
        let (mut client, server) = pair(&l);
        ring.start(slot, server);
        let data = pattern(3000 + slot * 100, slot as u8);
        expected.push(data.clone());
        writers.push(thread::spawn(move || {
            client.write_all(&data).unwrap();
            client // keep it open
        }));
    }
    let mut got = vec![Vec::new(); 3];
    // hold every buffer until a recv ran out of them
    let mut held = Vec::new();
    drive(&mut ring, 10, |ring, c| {
        match c {
            Completion::Data { slot, buf } => {
                got[slot].extend_from_slice(ring.bytes_mut(&buf));
                held.push(buf);
            }
            other => panic!("unexpected {other:?}"),
        }
        held.len() == 4
    });
    run_for(&mut ring, 100, |_, c| panic!("unexpected {c:?}"));
    assert!(ring.stats().enobufs > 0, "no recv ran out of buffers");
    assert_eq!(ring.free_buffers(), 0);
    for buf in held {
        ring.give_back(buf);
    }
    let total: usize = expected.iter().map(Vec::len).sum();
    let mut have: usize = got.iter().map(Vec::len).sum();
    drive(&mut ring, 10, |ring, c| {
        match c {
            Completion::Data { slot, buf } => {
                let bytes = take(ring, buf);
                have += bytes.len();
                got[slot].extend_from_slice(&bytes);
            }
            other => panic!("unexpected {other:?}"),
        }
        have == total
    });
    assert_eq!(got, expected);
    assert!(ring.stats().recv_rearms > 0);
    for w in writers {
        drop(w.join().unwrap());
    }
}

#[test]
fn pause_stops_data_and_resume_restarts_it() {
    let mut ring = Ring::new(config(16, 4096)).unwrap();
    let (l, _) = listener();
    let (mut client, server) = pair(&l);
    ring.start(0, server);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let writer = thread::spawn(move || {
        let mut sent = Vec::new();
        let mut i = 0u32;
        while !stop2.load(Ordering::Relaxed) {
            let chunk = i.to_le_bytes();
            client.write_all(&chunk).unwrap();
            sent.extend_from_slice(&chunk);
            i += 1;
            thread::sleep(Duration::from_millis(2));
        }
        (client, sent)
    });
    let mut got = Vec::new();
    drive(&mut ring, 5, |ring, c| match c {
        Completion::Data { buf, .. } => {
            got.extend(take(ring, buf));
            got.len() >= 40
        }
        other => panic!("unexpected {other:?}"),
    });
    ring.pause_recv(0);
    // Data already on its way may still come until the cancel is through
    run_for(&mut ring, 50, |ring, c| match c {
        Completion::Data { buf, .. } => got.extend(take(ring, buf)),
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(ring.slots[0].recv, Recv::Off);
    let before = got.len();
    run_for(&mut ring, 300, |_, c| panic!("data while paused: {c:?}"));
    assert_eq!(got.len(), before);
    ring.resume_recv(0);
    stop.store(true, Ordering::Relaxed);
    let (client, sent) = writer.join().unwrap();
    drive(&mut ring, 5, |ring, c| match c {
        Completion::Data { buf, .. } => {
            got.extend(take(ring, buf));
            got.len() >= sent.len()
        }
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(got, sent);
    drop(client);
}

#[test]
fn large_send_to_slow_reader_arrives_intact() {
    let mut ring = Ring::new(config(16, 4096)).unwrap();
    let (l, _) = listener();
    let (mut client, server) = pair(&l);
    socket2::SockRef::from(&server)
        .set_send_buffer_size(64 * 1024)
        .unwrap();
    ring.start(0, server);
    let data = pattern(4 << 20, 9);
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let reader = thread::spawn(move || {
        let mut got = Vec::new();
        let mut chunk = vec![0; 256 * 1024];
        while got.len() < (4 << 20) + 4 {
            let n = client.read(&mut chunk).unwrap();
            assert!(n > 0, "EOF after {} bytes", got.len());
            got.extend_from_slice(&chunk[..n]);
            thread::sleep(Duration::from_millis(1));
        }
        got
    });
    ring.send(0, data.clone());
    ring.send(0, b"tail".to_vec());
    assert!(ring.sending(0));
    let mut sent = Vec::new();
    drive(&mut ring, 20, |_, c| match c {
        Completion::Sent {
            slot: 0,
            buf,
            result,
        } => {
            result.unwrap();
            sent.push(buf.len());
            sent.len() == 2
        }
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(sent, [4 << 20, 4]);
    assert!(!ring.sending(0));
    assert!(ring.stats().partial_sends > 0, "no partial send happened");
    let got = reader.join().unwrap();
    let mut want = data;
    want.extend_from_slice(b"tail");
    assert_eq!(got.len(), want.len());
    assert!(got == want, "bytes differ");
}

#[test]
fn shutdown_ends_recv_and_fails_a_stuck_send() {
    let mut ring = Ring::new(config(16, 4096)).unwrap();
    let (l, _) = listener();
    let (client, server) = pair(&l);
    socket2::SockRef::from(&server)
        .set_send_buffer_size(64 * 1024)
        .unwrap();
    ring.start(0, server);
    ring.send(0, vec![7; 8 << 20]); // the client never reads: this send gets stuck
    run_for(&mut ring, 100, |_, c| panic!("unexpected {c:?}"));
    assert!(ring.sending(0));
    ring.shutdown(0);
    let (mut closed, mut failed) = (false, false);
    drive(&mut ring, 5, |_, c| {
        match c {
            Completion::Closed { slot: 0 } => closed = true,
            Completion::Sent {
                slot: 0, result, ..
            } => {
                assert!(result.is_err());
                failed = true;
            }
            other => panic!("unexpected {other:?}"),
        }
        closed && failed
    });
    ring.release(0);
    drive(&mut ring, 5, |_, c| match c {
        Completion::Released { slot: 0 } => true,
        other => panic!("unexpected {other:?}"),
    });
    drop(client);
}

#[test]
fn release_cancels_recv_and_stuck_send() {
    let mut ring = Ring::new(config(16, 4096)).unwrap();
    let (l, _) = listener();
    let (mut client, server) = pair(&l);
    socket2::SockRef::from(&server)
        .set_send_buffer_size(64 * 1024)
        .unwrap();
    ring.start(0, server);
    ring.send(0, vec![7; 8 << 20]);
    run_for(&mut ring, 100, |_, c| panic!("unexpected {c:?}"));
    ring.release(0);
    drive(&mut ring, 5, |_, c| match c {
        Completion::Released { slot: 0 } => true,
        other => panic!("unexpected {other:?}"),
    });
    assert!(ring.slots[0].stream.is_none());
    // the fd is closed: the client reads up to EOF (or a reset)
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut sink = Vec::new();
    let _ = client.read_to_end(&mut sink);
    assert!(sink.len() < 8 << 20);
}

#[test]
fn client_close_then_slot_reuse_sees_no_stale_completion() {
    let mut ring = Ring::new(config(16, 4096)).unwrap();
    let (l, _) = listener();
    let (mut client, server) = pair(&l);
    ring.start(3, server);
    client.write_all(b"bye").unwrap();
    drop(client);
    let mut got = Vec::new();
    drive(&mut ring, 5, |ring, c| match c {
        Completion::Data { slot: 3, buf } => {
            got.extend(take(ring, buf));
            false
        }
        Completion::Closed { slot: 3 } => true,
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(got, b"bye");
    ring.release(3);
    drive(&mut ring, 5, |_, c| match c {
        Completion::Released { slot: 3 } => true,
        other => panic!("unexpected {other:?}"),
    });
    let gen = ring.slots[3].gen;

    // a second connection on the same slot, released while its recv is armed
    let (mut client, server) = pair(&l);
    ring.start(3, server);
    client.write_all(b"second").unwrap();
    drive(&mut ring, 5, |ring, c| match c {
        Completion::Data { slot: 3, buf } => take(ring, buf) == b"second",
        other => panic!("unexpected {other:?}"),
    });
    ring.release(3);
    drive(&mut ring, 5, |_, c| match c {
        Completion::Released { slot: 3 } => true,
        other => panic!("unexpected {other:?}"),
    });

    // a third: only its own bytes, nothing stale from the others
    let (mut client, server) = pair(&l);
    ring.start(3, server);
    client.write_all(b"third").unwrap();
    drive(&mut ring, 5, |ring, c| match c {
        Completion::Data { slot: 3, buf } => take(ring, buf) == b"third",
        other => panic!("unexpected {other:?}"),
    });
    run_for(&mut ring, 50, |_, c| panic!("unexpected {c:?}"));
    assert_eq!(ring.slots[3].gen, gen + 1);
    assert_eq!(ring.stats().stale, 0);
    assert_eq!(ring.free_buffers(), 16);
}

#[test]
fn waker_wakes_a_wait_without_deadline() {
    let mut ring = Ring::new(config(8, 64)).unwrap();
    // a watchdog: should the wake be lost, a connection ends the wait (and the test fails)
    let (l, addr) = listener();
    ring.listen(l);
    let done = Arc::new(AtomicBool::new(false));
    let (waker, done2) = (ring.waker(), Arc::clone(&done));
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(100));
        waker.wake();
        let until = Instant::now() + Duration::from_secs(5);
        while !done2.load(Ordering::Acquire) && Instant::now() < until {
            thread::sleep(Duration::from_millis(10));
        }
        if !done2.load(Ordering::Acquire) {
            let _ = TcpStream::connect(addr);
        }
    });
    let start = Instant::now();
    ring.wait(None).unwrap();
    let c = ring.poll();
    done.store(true, Ordering::Release);
    assert!(matches!(c, Some(Completion::Woken)), "got {c:?}");
    assert!(start.elapsed() >= Duration::from_millis(90));
    t.join().unwrap();
}

#[test]
fn ten_thousand_wakes_leave_no_message_behind() {
    let mut ring = Ring::new(config(8, 64)).unwrap();
    let inbox = Arc::new(Mutex::new(Vec::new()));
    let senders: Vec<_> = (0..4u32)
        .map(|t| {
            let (waker, inbox) = (ring.waker(), Arc::clone(&inbox));
            thread::spawn(move || {
                for i in 0..2500 {
                    inbox.lock().unwrap().push(t * 2500 + i);
                    waker.wake();
                    if i % 100 == 0 {
                        thread::yield_now();
                    }
                }
            })
        })
        .collect();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 10_000 {
        assert!(
            Instant::now() < deadline,
            "{} messages never seen",
            10_000 - seen.len()
        );
        ring.wait(Some(deadline)).unwrap();
        while let Some(c) = ring.poll() {
            assert!(matches!(c, Completion::Woken), "unexpected {c:?}");
            // drain only after Woken: a lost wake-up leaves messages here
            seen.extend(inbox.lock().unwrap().drain(..));
        }
    }
    for s in senders {
        s.join().unwrap();
    }
    assert_eq!(seen.len(), 10_000);
    assert!(ring.stats().wakes <= 10_000);
}

#[test]
fn wait_returns_at_the_deadline() {
    let mut ring = Ring::new(config(8, 64)).unwrap();
    for ms in [0u64, 30, 120] {
        let start = Instant::now();
        ring.wait(Some(start + Duration::from_millis(ms))).unwrap();
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(ms),
            "{ms} ms: woke after {took:?}"
        );
        assert!(
            took < Duration::from_millis(ms + 50),
            "{ms} ms: took {took:?}"
        );
        assert!(ring.poll().is_none());
    }
    // a deadline in the past does not wait
    let start = Instant::now();
    ring.wait(Some(start - Duration::from_millis(10))).unwrap();
    assert!(start.elapsed() < Duration::from_millis(20));
    assert!(ring.stats().enters >= 4);
}

#[test]
fn write_at_offsets_with_and_without_datasync() {
    let path = std::env::temp_dir().join(format!("ringlink-ring-write-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut ring = Ring::new(config(8, 64)).unwrap();
    let first = vec![b"hello ".to_vec(), b"world".to_vec()];
    let second = vec![pattern(100_000, 3), b"end".to_vec()];
    // more iovecs than one writev takes: continued in a second writev
    let third: Vec<Vec<u8>> = (0..1500u32).map(|i| i.to_le_bytes().to_vec()).collect();
    let n = 11u64;
    let m = n + 100_003;
    let fd = file.as_raw_fd();
    ring.write_at(fd, 0, first.clone(), true, 1);
    ring.write_at(fd, n, second.clone(), false, 2);
    ring.write_at(fd, m, third.clone(), false, 3);
    let mut done = Vec::new();
    drive(&mut ring, 10, |_, c| match c {
        Completion::Written {
            token,
            bufs,
            result,
        } => {
            result.unwrap();
            let want = match token {
                1 => &first,
                2 => &second,
                3 => &third,
                _ => panic!("token {token}"),
            };
            assert_eq!(&bufs, want);
            done.push(token);
            done.len() == 3
        }
        other => panic!("unexpected {other:?}"),
    });
    done.sort_unstable();
    assert_eq!(done, [1, 2, 3]);
    let content = std::fs::read(&path).unwrap();
    let mut want = first.concat();
    want.extend(second.concat());
    want.extend(third.concat());
    assert_eq!(content.len(), want.len());
    assert!(content == want, "file content differs");
    drop(file);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn write_at_reports_errors() {
    let mut ring = Ring::new(config(8, 64)).unwrap();
    // a read-only descriptor cannot be written
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    ring.write_at(file.as_raw_fd(), 0, vec![b"nope".to_vec()], true, 9);
    drive(&mut ring, 5, |_, c| match c {
        Completion::Written {
            token: 9,
            result,
            bufs,
        } => {
            assert!(result.is_err());
            assert_eq!(bufs, [b"nope".to_vec()]);
            true
        }
        other => panic!("unexpected {other:?}"),
    });
}

#[test]
fn accept_300_connections_with_peer_addresses() {
    let mut ring = Ring::new(config(8, 64)).unwrap();
    let (l, addr) = listener();
    ring.listen(l);
    let client = thread::spawn(move || {
        (0..300)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect::<Vec<_>>()
    });
    let mut peers = HashSet::new();
    let mut streams = Vec::new();
    drive(&mut ring, 20, |_, c| match c {
        Completion::Accepted { stream, peer } => {
            assert!(stream.nodelay().unwrap());
            assert_eq!(stream.peer_addr().unwrap(), peer);
            peers.insert(peer);
            streams.push(stream);
            peers.len() == 300
        }
        other => panic!("unexpected {other:?}"),
    });
    let clients = client.join().unwrap();
    let want: HashSet<_> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    assert_eq!(peers, want);
}

#[test]
fn pause_accept_holds_connections_until_the_pause_ends() {
    let mut ring = Ring::new(config(8, 64)).unwrap();
    let (l, addr) = listener();
    ring.listen(l);
    run_for(&mut ring, 20, |_, c| panic!("unexpected {c:?}"));
    let until = Instant::now() + Duration::from_millis(200);
    ring.pause_accept(until);
    run_for(&mut ring, 20, |_, c| panic!("unexpected {c:?}"));
    let client = TcpStream::connect(addr).unwrap();
    let mut accepted = None;
    drive(&mut ring, 5, |_, c| match c {
        Completion::Accepted { peer, .. } => {
            accepted = Some((Instant::now(), peer));
            true
        }
        other => panic!("unexpected {other:?}"),
    });
    let (at, peer) = accepted.unwrap();
    assert!(at >= until, "accepted {:?} early", until - at);
    assert_eq!(peer, client.local_addr().unwrap());
}

/// Accept pacing: with one accept at a time, a pause after each accepted connection leaves the
/// others in the kernel's backlog (a multishot accept would have taken them all at once).
#[test]
fn one_accept_at_a_time_leaves_the_rest_in_the_backlog_while_paused() {
    let mut ring = Ring::new(RingConfig {
        accept_one_at_a_time: true,
        ..config(8, 64)
    })
    .unwrap();
    let (l, addr) = listener();
    ring.listen(l);
    let _clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let pause = Duration::from_millis(150);
    let mut accepted = Vec::new();
    drive(&mut ring, 5, |ring, c| match c {
        Completion::Accepted { .. } => {
            accepted.push(Instant::now());
            // As the driver does when the core says the accept rate is reached.
            ring.pause_accept(Instant::now() + pause);
            accepted.len() == 3
        }
        other => panic!("unexpected {other:?}"),
    });
    for pair in accepted.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= pause, "accepted {gap:?} after the previous one");
    }
}

#[test]
fn teardown_cancels_and_reaps_everything_in_flight() {
    let mut ring = Ring::new(config(16, 4096)).unwrap();
    let (l, _) = listener();
    let (client, server) = pair(&l);
    socket2::SockRef::from(&server)
        .set_send_buffer_size(64 * 1024)
        .unwrap();
    ring.start(0, server);
    ring.send(0, vec![1; 8 << 20]); // stuck: the client never reads
    let (_client2, server2) = pair(&l);
    ring.start(1, server2);
    ring.pause_recv(1);
    ring.listen(l);
    run_for(&mut ring, 50, |_, c| panic!("unexpected {c:?}"));
    assert!(ring.inflight >= 4, "recv, send, accept, eventfd read");
    assert!(ring.cancel_all_and_drain(Duration::from_secs(2)));
    assert_eq!(ring.inflight, 0);
    drop(ring); // nothing in flight: frees everything
    drop(client);
}

#[test]
fn waker_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone>() {}
    check::<super::Waker>();
}
