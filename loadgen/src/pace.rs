//! Waiting for an intended send time, with the precision a latency figure needs.
//!
//! Latency is measured from the intended send time (see [`crate::schedule`]), so a sender that
//! wakes late adds its lateness to every figure. tokio's timers have millisecond granularity
//! and round up: a sleep ends 0 to 2 ms after its deadline, which alone puts about 2 ms into a
//! p99 on an idle loopback. [`Pacing::Spin`] wakes senders within microseconds instead: one
//! pacer task per thread keeps every waiting sender in a heap by due time, sleeps on a tokio
//! timer until shortly before the earliest one, then spins (yielding to the runtime, so
//! sockets are still served) until it is due and wakes it. The thread's core stays busy: use it
//! when loadgen has cores of its own (`benches/compare.sh` pins it to one).

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Notify;

/// How senders wait for their next intended send time (profile key `pacing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pacing {
    /// tokio timers: no CPU while waiting, 0-2 ms late (default).
    #[default]
    Timer,
    /// A pacer that spins for the last stretch: microseconds late, one busy core per thread.
    Spin,
}

/// Spinning starts this long before a due time: more than tokio's timer lateness.
const SPIN_WINDOW: Duration = Duration::from_millis(3);

/// One thread's pacer; waiters register once and then [`Waiter::wait_until`] as often as they
/// like.
#[derive(Default)]
pub struct Pacer {
    /// `(due, waiter id)`, earliest first; an entry whose waiter has moved on is a harmless
    /// spurious wake-up.
    heap: RefCell<BinaryHeap<Reverse<(Instant, usize)>>>,
    wakers: RefCell<slab::Slab<Rc<Notify>>>,
    /// Wakes the pacer when an entry earlier than the one it sleeps for may have arrived.
    kick: Notify,
    sleeping_until: Cell<Option<Instant>>,
}

impl Pacer {
    pub fn new() -> Rc<Self> {
        Rc::new(Self::default())
    }

    /// A new waiter; it unregisters itself when dropped.
    pub fn waiter(self: &Rc<Self>) -> Waiter {
        let notify = Rc::new(Notify::new());
        let id = self.wakers.borrow_mut().insert(Rc::clone(&notify));
        Waiter {
            pacer: Rc::clone(self),
            id,
            notify,
            armed: Cell::new(None),
        }
    }

    /// The pacer's task: run it on the thread's runtime for as long as there are waiters.
    pub async fn run(self: Rc<Self>) {
        loop {
            let next = self.heap.borrow().peek().map(|Reverse((at, _))| *at);
            let Some(next) = next else {
                self.sleeping_until.set(None);
                self.kick.notified().await;
                continue;
            };
            let now = Instant::now();
            if next <= now {
                self.wake_due(now);
            } else if next - now > SPIN_WINDOW {
                let until = next - SPIN_WINDOW;
                self.sleeping_until.set(Some(until));
                tokio::select! {
                    () = tokio::time::sleep_until(until.into()) => {}
                    () = self.kick.notified() => {}
                }
                self.sleeping_until.set(None);
            } else {
                // Give the runtime a turn (it polls the sockets), then look at the clock again.
                tokio::task::yield_now().await;
            }
        }
    }

    fn wake_due(&self, now: Instant) {
        let mut heap = self.heap.borrow_mut();
        let wakers = self.wakers.borrow();
        while let Some(&Reverse((at, id))) = heap.peek() {
            if at > now {
                break;
            }
            heap.pop();
            if let Some(n) = wakers.get(id) {
                n.notify_one();
            }
        }
    }

    fn push(&self, at: Instant, id: usize) {
        self.heap.borrow_mut().push(Reverse((at, id)));
        // A sleeping pacer must wake earlier for it; a spinning one sees it on its next turn.
        if self
            .sleeping_until
            .get()
            .is_none_or(|until| at < until + SPIN_WINDOW)
        {
            self.kick.notify_one();
        }
    }
}

/// Waits for `at` with the pacer's waiter when there is one (`pacing = "spin"`), else with a
/// tokio timer.
pub async fn wait_until(waiter: Option<&Waiter>, at: Instant) {
    match waiter {
        Some(w) => w.wait_until(at).await,
        None => tokio::time::sleep_until(at.into()).await,
    }
}

/// A sender's handle on its thread's [`Pacer`].
pub struct Waiter {
    pacer: Rc<Pacer>,
    id: usize,
    notify: Rc<Notify>,
    /// The due time already in the heap, so a sender polled again for the same time does not
    /// add it twice.
    armed: Cell<Option<Instant>>,
}

impl Waiter {
    /// Completes at `at`, give or take a few microseconds. Cancel-safe: dropping the future
    /// (a `select!` that took another branch) leaves at most a spurious wake-up behind.
    pub async fn wait_until(&self, at: Instant) {
        loop {
            if Instant::now() >= at {
                return;
            }
            if self.armed.get() != Some(at) {
                self.armed.set(Some(at));
                self.pacer.push(at, self.id);
            }
            self.notify.notified().await;
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.pacer.wakers.borrow_mut().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on a current-thread runtime with a pacer task, like a loadgen thread.
    fn on_runtime<F: std::future::Future<Output = ()>>(f: impl FnOnce(Rc<Pacer>) -> F) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let pacer = Pacer::new();
            let task = tokio::task::spawn_local(Rc::clone(&pacer).run());
            f(pacer).await;
            task.abort();
        });
    }

    #[test]
    fn waiters_wake_in_due_order_and_never_early() {
        on_runtime(|pacer| async move {
            let start = Instant::now();
            let woke = Rc::new(RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            // Registered out of order; due 1..=8 ms after start.
            for k in [5u64, 1, 8, 3, 2, 7, 4, 6] {
                let w = pacer.waiter();
                let woke = Rc::clone(&woke);
                tasks.push(tokio::task::spawn_local(async move {
                    let at = start + Duration::from_millis(k);
                    w.wait_until(at).await;
                    assert!(Instant::now() >= at, "woke before its time");
                    woke.borrow_mut().push(k);
                }));
            }
            for t in tasks {
                t.await.expect("waiter task");
            }
            assert_eq!(*woke.borrow(), vec![1, 2, 3, 4, 5, 6, 7, 8]);
        });
    }

    #[test]
    fn a_waiter_dropped_mid_wait_leaves_the_others_working() {
        on_runtime(|pacer| async move {
            let start = Instant::now();
            let gone = pacer.waiter();
            let stays = pacer.waiter();
            tokio::select! {
                () = gone.wait_until(start + Duration::from_millis(5)) => panic!("too early"),
                () = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
            drop(gone);
            stays.wait_until(start + Duration::from_millis(6)).await;
            assert!(Instant::now() >= start + Duration::from_millis(6));
        });
    }
}
