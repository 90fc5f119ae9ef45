//! Serve an overlaybd image to a virtual machine as a vhost-user-blk device.
//!
//! Why: ublk and TCMU need a kernel module on the host; a VMM (qemu,
//! cloud-hypervisor, any vhost-user front end) only needs a Unix socket.
//! The VMM shares the guest's memory with this process and hands it the
//! virtqueues; requests are read from and written into guest memory here,
//! against the same [`overlaybd::stack::Stack`] (and blob cache) the other
//! front ends use. The vhost-user protocol, the virtqueues and guest memory
//! are the rust-vmm crates' (`vhost-user-backend`, `vhost`, `virtio-queue`,
//! `vm-memory`); this crate is the virtio-blk device on top of them.
//!
//! - [`config`]: the virtio-blk feature bits and config space.
//! - [`request`]: one request (a descriptor chain): framing, checks, and
//!   carrying it out against the stack.
//! - [`backend`]: the `VhostUserBackend` (one worker thread per queue) and
//!   [`serve`], which serves one VMM connection after another.
//!
//! Reads of a registry layer that is not cached yet wait on the network on
//! the queue's own thread, so they hold up that queue's other requests (not
//! the other queues'). That is accepted for this first version; ublk hands
//! such reads to a pool instead.

pub mod backend;
pub mod config;
pub mod request;

pub use backend::{enter, serve, Options, Report, Served};
pub use config::device_id;
