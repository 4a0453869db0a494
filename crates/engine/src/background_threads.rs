//! Threads for data movement's disk and copy work, at a lower CPU priority than foreground I/O.
//!
//! Rebuild, resync, drain and extension read pages of objects, frame them and write imported
//! ones (`import_batch::fill`, `Vos::import_refs`): CPU-heavy work (copies, checksums) that,
//! on a machine with few cores, took the CPU from foreground requests (4 foreground writers
//! fell to 0.2x of their rate before a rebuild). Running it on threads with a nice value of
//! `NICE` makes the scheduler run foreground work first whenever both are ready (Linux
//! weights nice 10 at ~1/10 of nice 0), while an idle machine gives movement every cycle, so
//! rebuild is fast when nothing else runs and yields when something does, without a fixed
//! rate cap. Network I/O stays on the runtime's threads.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// Threads of the pool: an import waits for its commit's fsync on its thread, so a few more
/// than the cores of the small machines this runs on keep the disk and the CPU busy.
const THREADS: usize = 4;
/// Added to the nice value of the process for the pool's threads (capped at 19).
const NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct BackgroundThreads {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
}

impl BackgroundThreads {
    pub(crate) fn start() -> BackgroundThreads {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("movement-{i}")).spawn(move || {
                // SAFETY: getpriority/setpriority on this thread's own id (a new thread starts
                // at the nice value of the one that spawned it); failure only costs priority.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
                let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
                if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, (own + NICE).min(19)) } != 0 {
                    tracing::warn!(error = %std::io::Error::last_os_error(), "could not lower the priority of a data-movement thread");
                }
                loop {
                    let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    job();
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "could not start a data-movement thread");
            }
        }
        BackgroundThreads { tx: Mutex::new(Some(tx)) }
    }

    /// Run `f` on a movement thread; `None` if the pool is gone or `f` panicked.
    pub(crate) async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (reply, wait) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(f());
        });
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).as_ref()?.send(job).ok()?;
        wait.await.ok()
    }
}

impl Drop for BackgroundThreads {
    fn drop(&mut self) {
        // Closing the channel ends the threads once they finish their jobs.
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_threads_at_the_lower_priority() {
        let pool = BackgroundThreads::start();
        let nice = pool
            .run(|| {
                // SAFETY: getpriority of this thread; -1 with errno set is an error, which the
                // test then reports as a wrong value.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
                unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }
            })
            .await;
        let own = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        assert_eq!(nice, Some((own + NICE).min(19)), "movement work runs niced");
        assert_eq!(pool.run(|| 6 * 7).await, Some(42));
    }
}
