//! The kernel front ends other than ublk.
//!
//! Hosts running the containerd overlaybd snapshotter create their devices
//! through configfs (target_core_user + tcm_loop) and expect a daemon that
//! serves the TCMU ring. This crate is that daemon's machinery, built on the
//! same engine (`overlaybd::stack::Stack`) as every other front end:
//!
//! - [`scsi`]: CDB parsing and response/sense building, pure functions over
//!   byte slices;
//! - [`exec`]: one SCSI command run against a [`exec::Backend`] (a stack);
//! - [`ring`]: the target_core_user mailbox and command ring, over any
//!   [`ring::SharedMem`] (the uio mapping, or a buffer in tests);
//! - [`uio`]: finding TCMU devices under /sys/class/uio and mapping them;
//! - [`netlink`]: target_core_user's generic netlink (device events and
//!   the answers the kernel waits for);
//! - [`service`]: one thread per device, found by netlink events and by
//!   rescans, answering the kernel's events;
//! - [`metrics`]: per-disk counters for the Prometheus exporter;
//! - [`probe`]: which kernel front ends this host offers.

pub mod exec;
pub mod metrics;
pub mod netlink;
pub mod probe;
pub mod ring;
pub mod scsi;
pub mod service;
pub mod uio;
