//! A named thread running one future on its own current-thread tokio runtime until it is told
//! to stop: the API, and the forwarders of the external sinks.
//!
//! Owns: the thread and the stop signal. Never: what the future does; stopping is cooperative
//! (the future gets a receiver that completes on [`Worker::stop`] and decides how to wind down),
//! and [`Worker::stop`] (or dropping the worker) waits for the thread.

use std::future::Future;
use std::io;
use std::thread::JoinHandle;

use tokio::runtime::Runtime;
use tokio::sync::oneshot;

/// See the module docs.
#[derive(Debug)]
pub struct Worker {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Runs `task(stopped)` to completion on `rt`, on a new thread called `name`. `stopped`
    /// completes when [`Worker::stop`] is called or the worker is dropped.
    pub fn spawn<F, Fut>(name: &str, rt: Runtime, task: F) -> io::Result<Self>
    where
        F: FnOnce(oneshot::Receiver<()>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || rt.block_on(task(stopped)))?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Tells the task to stop and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown();
    }
}
