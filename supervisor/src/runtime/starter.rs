//! Starting workers off the event loop. A worker that hangs before its handshake, or while it
//! confines itself, must not freeze routing, the control socket or other restarts: each slot
//! has a starter thread that runs the whole spawn (clone, handshake, plan, report,
//! verification, `Start`, `Ready`) and hands the result back through a channel and an eventfd
//! the event loop waits on.
//!
//! One thread per slot for airlockd's lifetime, not one per attempt: a worker's parent-death
//! signal follows the thread that cloned it, so that thread must live as long as the worker.
//! While a start is in progress, its child's pid is published, so that a shutdown can kill a
//! worker that hangs while starting.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use crate::config::Config;
use crate::spawn::{self, HostAbilities, SpawnError, Started};
use crate::sys;

/// A start's result, for slot `slot`'s attempt `attempt`.
#[derive(Debug)]
pub(super) struct Outcome {
    pub slot: usize,
    pub attempt: u64,
    pub result: Result<Started, SpawnError>,
}

/// The starter threads and what they hand back.
#[derive(Debug)]
pub(super) struct Starter {
    jobs: Vec<Sender<u64>>,
    children: Vec<Arc<AtomicI32>>,
    results: Receiver<Outcome>,
    done: Arc<OwnedFd>,
}

impl Starter {
    /// Starts one idle starter thread per configured worker.
    pub fn new(cfg: Arc<Config>, host: Arc<HostAbilities>) -> std::io::Result<Starter> {
        let done = Arc::new(sys::eventfd()?);
        let (out_tx, results) = mpsc::channel();
        let mut jobs = Vec::new();
        let mut children = Vec::new();
        for slot in 0..cfg.workers.len() {
            let (tx, rx) = mpsc::channel::<u64>();
            let child = Arc::new(AtomicI32::new(0));
            let (cfg, host, out, done, watched) =
                (cfg.clone(), host.clone(), out_tx.clone(), done.clone(), child.clone());
            let name = format!("start-{}", cfg.workers[slot].name.get_ref());
            std::thread::Builder::new().name(name).spawn(move || {
                // Signals belong to the event loop's signalfd, never to this thread.
                let _ = sys::block_signals_in_this_thread();
                // Ends when the supervisor drops its end (after every worker has stopped).
                while let Ok(attempt) = rx.recv() {
                    let result = spawn::spawn_watched(&cfg, slot, &host, &watched);
                    if out.send(Outcome { slot, attempt, result }).is_err() {
                        return;
                    }
                    let _ = sys::eventfd_add(done.as_fd(), 1);
                }
            })?;
            jobs.push(tx);
            children.push(child);
        }
        Ok(Starter { jobs, children, results, done })
    }

    /// Asks slot `slot`'s thread to start attempt `attempt`.
    pub fn start(&self, slot: usize, attempt: u64) -> bool {
        self.jobs[slot].send(attempt).is_ok()
    }

    /// What the event loop waits on: readable when a start finished.
    pub fn events(&self) -> BorrowedFd<'_> {
        self.done.as_fd()
    }

    /// Every start that finished since the last call.
    pub fn finished(&self) -> Vec<Outcome> {
        let _ = sys::eventfd_take(self.done.as_fd());
        self.results.try_iter().collect()
    }

    /// Kills the child slot `slot` is starting, if any (its start then fails at once).
    pub fn kill_starting(&self, slot: usize) {
        let pid = self.children[slot].load(Ordering::SeqCst);
        if pid > 0 {
            // Our own unreaped child (the starter thread reaps it): its pid cannot be reused.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Waits until every start in progress has finished (after [`Starter::kill_starting`],
    /// promptly), returning their results.
    pub fn drain(&self, in_progress: usize, within: std::time::Duration) -> Vec<Outcome> {
        let deadline = std::time::Instant::now() + within;
        let mut got = Vec::new();
        while got.len() < in_progress {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.results.recv_timeout(left) {
                Ok(o) => got.push(o),
                Err(_) => break,
            }
        }
        got
    }
}
