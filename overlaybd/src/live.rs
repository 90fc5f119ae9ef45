//! A served image whose stack can be replaced while the device stays up:
//! the live snapshot (`obd snapshot`), which freezes the writable layer
//! into a lower and goes on writing to a fresh one.
//!
//! Front ends take an [`Entry`] for each request and serve it from the
//! entry's stack. [`LiveStack::replace`] pauses new entries, waits for the
//! requests in flight to end, builds the next stack from the current one
//! and installs it, so no request ever sees half of a change and no write
//! lands in a layer after it was frozen. Entering never blocks: a front
//! end whose thread serves many requests at once (a ublk queue) waits for
//! the pause to end its own way, without stopping the requests in flight
//! that the replacement is waiting for.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::lsmt::{CreateOptions, ReadOnlyLayer, WritableLayer};
use crate::stack::Stack;

/// The stack a device serves now, and the requests using it.
pub struct LiveStack {
    current: Mutex<Arc<Stack>>,
    in_flight: AtomicUsize,
    paused: AtomicBool,
    /// One replacement at a time.
    replacing: Mutex<()>,
}

/// One request's hold on the stack: the stack stays current, and frozen
/// layers stay unfrozen, until it is dropped.
pub struct Entry<'a> {
    live: &'a LiveStack,
    stack: Arc<Stack>,
}

impl Entry<'_> {
    pub fn stack(&self) -> &Arc<Stack> {
        &self.stack
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        self.live.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl LiveStack {
    pub fn new(stack: Arc<Stack>) -> LiveStack {
        LiveStack {
            current: Mutex::new(stack),
            in_flight: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            replacing: Mutex::new(()),
        }
    }

    /// The stack being served now.
    pub fn current(&self) -> Arc<Stack> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Start a request, unless a replacement is under way (`None`: try
    /// again shortly, without blocking the requests in flight).
    pub fn try_enter(&self) -> Option<Entry<'_>> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.paused.load(Ordering::SeqCst) {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Entry {
            live: self,
            stack: self.current(),
        })
    }

    /// Pause new requests, wait (up to `quiet_within`) for those in flight
    /// to end, then install the stack `next` makes from the current one.
    /// Requests go on with the old stack if `next` fails or the device
    /// does not go quiet in time.
    pub fn replace<T>(
        &self,
        quiet_within: Duration,
        next: impl FnOnce(&Stack) -> Result<(Stack, T)>,
    ) -> Result<T> {
        let _one = self.replacing.lock().unwrap_or_else(|e| e.into_inner());
        self.paused.store(true, Ordering::SeqCst);
        let result = self.wait_quiet(quiet_within).and_then(|()| {
            let (stack, value) = next(&self.current())?;
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(stack);
            Ok(value)
        });
        self.paused.store(false, Ordering::SeqCst);
        result
    }

    /// Grow the image online to `new_size` bytes ([`Stack::grow`]), never
    /// while a replacement is under way (whose new upper would keep the
    /// old size).
    pub fn grow(&self, new_size: u64) -> Result<()> {
        let _one = self.replacing.lock().unwrap_or_else(|e| e.into_inner());
        self.current().grow(new_size)
    }

    fn wait_quiet(&self, within: Duration) -> Result<()> {
        let started = Instant::now();
        while self.in_flight.load(Ordering::SeqCst) != 0 {
            if started.elapsed() > within {
                return Err(Error::Invalid(format!(
                    "the device still had requests in flight after {within:?}; nothing was changed"
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }
}

/// Where a snapshot's fresh writable layer goes.
pub struct NewUpper<'a> {
    pub data: &'a Path,
    /// `None`: a sparse layer (one file).
    pub index: Option<&'a Path>,
}

/// The stack after a snapshot of `stack`: its writable layer, flushed and
/// frozen, becomes the top lower, and a new writable layer (a child of it,
/// same virtual size) is created at `upper` and put on top.
pub fn snapshot_stack(stack: &Stack, upper: &NewUpper<'_>) -> Result<Stack> {
    let Some(top) = stack.top() else {
        return Err(Error::Invalid(
            "the image has no writable layer to snapshot".into(),
        ));
    };
    top.flush()?;
    let frozen = ReadOnlyLayer::frozen(top)?;
    let new_top = WritableLayer::create(
        upper.data,
        upper.index,
        &CreateOptions {
            virtual_size: top.virtual_size(),
            parent_uuid: Some(top.header.uuid.clone()),
            sparse: upper.index.is_none(),
        },
    )?;
    new_top.flush()?;
    let mut lowers = stack.lowers().to_vec();
    lowers.push(frozen);
    Stack::new(lowers, Some(Arc::new(new_top)))
}
