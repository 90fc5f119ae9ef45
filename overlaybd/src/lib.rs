//! The overlaybd image engine.
//!
//! An overlaybd image is a stack of layer files (LSMT, optionally ZFile
//! compressed, optionally tar-wrapped) merged into one virtual block device.
//! Parsing is pure code over byte slices; the [`stack`] answers "which layer
//! holds this range, at which file offset" as a plan, and executing the plan
//! is a separate step so each front end can do the I/O its own way.

pub mod audit;
pub mod config;
pub mod crc;
pub mod credentials;
pub mod detect;
pub mod error;
pub mod image;
pub mod index;
pub mod io;
pub mod live;
pub mod lsmt;
pub mod remote;
pub mod stack;
pub mod storage;
pub mod tar;
pub mod trace;
pub mod zfile;

pub use error::{Error, Result};
