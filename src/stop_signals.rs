//! SIGINT and SIGTERM for the long-running commands (`obd tcmu`, `obd
//! serve`): blocked in every thread and taken by one thread with sigwait,
//! so no work runs in a signal handler and no worker is interrupted
//! mid-request.

use anyhow::{anyhow, Result};

/// Block SIGINT and SIGTERM in this thread and every thread it starts
/// afterwards (call it before starting any), and call `on_signal` with
/// each one as it comes, on a thread of its own.
pub fn on_stop_signals(mut on_signal: impl FnMut(libc::c_int) + Send + 'static) -> Result<()> {
    // SAFETY: plain libc calls on a local, initialised signal set.
    let set = unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(anyhow!(
                "cannot block SIGINT/SIGTERM: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        set
    };
    std::thread::Builder::new()
        .name("obd-signals".into())
        .spawn(move || {
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` is a valid signal set; `signal` a valid out pointer.
            while unsafe { libc::sigwait(&set, &mut signal) } == 0 {
                on_signal(signal);
            }
        })
        .map_err(|e| anyhow!("cannot start the signal thread: {e}"))?;
    Ok(())
}
