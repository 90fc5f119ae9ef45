//! Serve an overlaybd image as `/dev/ublkbN` through ublk (libublk + io_uring).
//!
//! One process serves one device: [`device::serve`] creates (or recovers) the
//! device and runs one thread per hardware queue. Each queue thread keeps
//! `depth` async tasks, one per ublk tag, on libublk's per-queue io_uring, so
//! the I/O of every request is an SQE on that same ring and a queue thread
//! never waits on one request while others are ready (see [`exec`] for what
//! still runs synchronously, and why, and [`offload`] for registry reads).
//!
//! The kernel side is only reachable where `ublk_drv` is loaded; [`probe`]
//! says so in plain words when it is not. [`state`] keeps the small
//! per-device records `obd list`, `obd del` and `obd recover` work from.

pub mod device;
pub mod exec;
pub mod offload;
pub mod probe;
pub mod state;

pub use device::{serve, Options, Start};
