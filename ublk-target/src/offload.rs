//! Reads that may wait on the network, or decode a lot, run off the queue
//! thread.
//!
//! A queue thread serves all of its tags from one io_uring; a read that
//! blocks it (a registry fetch of a chunk not yet cached, or a small read
//! that decodes a large ZFile block) would stall every other request on
//! that queue for as long as it takes. Such reads go to a small pool of
//! threads shared by the device's queues. The pool
//! thread reads into its own buffer, stores the result and writes an
//! eventfd; the queue task waits for that eventfd with a read SQE on its
//! own ring, so it wakes exactly when the data is there, and copies it in.
//! The request buffer never crosses threads.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{mpsc, Arc, Mutex};

use io_uring::{opcode, types};
use libublk::io::UblkQueue;

/// Threads per device: how many registry fetches can be in flight at once.
pub const POOL_THREADS: usize = 8;

type Job = Box<dyn FnOnce() + Send>;

/// Where a pool thread leaves a read's bytes (or errno) for its waiter.
type ReadSlot = Arc<Mutex<Option<Result<Vec<u8>, i32>>>>;

/// A fixed set of threads running jobs in arrival order. Dropping the
/// pool closes its queue: the threads finish the jobs queued and leave.
pub struct Pool {
    jobs: mpsc::Sender<Job>,
}

impl Pool {
    /// Start `threads` threads named `name`; they leave when the pool is
    /// dropped and the jobs already queued are done.
    pub fn new(threads: usize, name: &str) -> std::io::Result<Pool> {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..threads.max(1) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || loop {
                    let next = receiver.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match next {
                        // A panicking job must not take the thread with it;
                        // its waiter learns of it through `Signal`'s drop.
                        Ok(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        Err(_) => return,
                    }
                })?;
        }
        Ok(Pool { jobs: sender })
    }

    /// Run `job` on a pool thread; false when no thread is left to run it.
    fn submit(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }

    /// Run `read` on a pool thread and wait for its result without blocking
    /// the queue: the other tags of `q` keep being served meanwhile.
    /// `Err(errno)` when the read failed, panicked or could not be started.
    pub async fn run<F>(&self, q: &UblkQueue<'_>, read: F) -> Result<Vec<u8>, i32>
    where
        F: FnOnce() -> Result<Vec<u8>, i32> + Send + 'static,
    {
        let done = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
            .map_err(|e| -e.raw_os_error())?;
        let signal = Signal(File::from(done.try_clone().map_err(|_| -libc::EMFILE)?));
        let slot = ReadSlot::default();
        let filled = slot.clone();
        let started = self.submit(Box::new(move || {
            let result = read();
            *filled.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
            drop(signal);
        }));
        if !started {
            return Err(-libc::EIO);
        }
        // The eventfd's counter, read by the SQE; boxed so it stays put
        // while the kernel may write it.
        let mut counter = Box::new([0u8; 8]);
        loop {
            let sqe =
                opcode::Read::new(types::Fd(done.as_raw_fd()), counter.as_mut_ptr(), 8).build();
            match q.ublk_submit_sqe(sqe).await {
                8 => break,
                r if r == -libc::EINTR || r == -libc::EAGAIN => continue,
                r if r < 0 => return Err(r),
                _ => return Err(-libc::EIO),
            }
        }
        let result = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        result.unwrap_or(Err(-libc::EIO))
    }
}

/// Wakes the waiting queue task when dropped: after the job stored its
/// result, or while unwinding from a panic (then the slot is empty).
struct Signal(File);

impl Drop for Signal {
    fn drop(&mut self) {
        let _ = self.0.write_all(&1u64.to_ne_bytes());
    }
}
