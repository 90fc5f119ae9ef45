//! One error type for the engine: every error names the file (or other
//! context) and the problem, so a person can act on it.

use std::fmt;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while touching `context` (usually a path).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The bytes of `context` do not follow the format.
    #[error("{context}: {problem}")]
    Corrupt { context: String, problem: String },
    /// A request that cannot be carried out as asked (bad argument, misaligned I/O...).
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn corrupt(context: impl Into<String>, problem: impl Into<String>) -> Self {
        Error::Corrupt {
            context: context.into(),
            problem: problem.into(),
        }
    }

    /// The errno a block front end should complete a failed request with.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => errno_of(source),
            Error::Corrupt { .. } => libc::EIO,
            Error::Invalid(_) => libc::EINVAL,
        }
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Io { context, source } => {
                io::Error::new(source.kind(), format!("{context}: {source}"))
            }
            Error::Corrupt { .. } => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
            Error::Invalid(_) => io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
        }
    }
}

/// Attach a context (usually a path) to an `io::Result`.
pub trait IoContext<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::io(context(), source))
    }
}

/// A failed remote read: the errno a block device should report, and what
/// happened, for a person.
#[derive(Debug)]
pub struct RemoteError {
    pub errno: i32,
    pub message: String,
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RemoteError {}

/// An `io::Error` carrying `errno` (see [`errno_of`]) and `message`.
pub fn remote_error(errno: i32, message: impl Into<String>) -> io::Error {
    let kind = match errno {
        libc::EPERM | libc::EACCES => io::ErrorKind::PermissionDenied,
        libc::ENOENT => io::ErrorKind::NotFound,
        libc::EBUSY => io::ErrorKind::ResourceBusy,
        libc::ETIMEDOUT => io::ErrorKind::TimedOut,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(
        kind,
        RemoteError {
            errno,
            message: message.into(),
        },
    )
}

/// The errno for an I/O error: the OS error itself, the one a
/// [`RemoteError`] carries, or `EIO`.
pub fn errno_of(e: &io::Error) -> i32 {
    if let Some(errno) = e.raw_os_error() {
        return errno;
    }
    if let Some(remote) = e.get_ref().and_then(|r| r.downcast_ref::<RemoteError>()) {
        return remote.errno;
    }
    match e.kind() {
        io::ErrorKind::PermissionDenied => libc::EPERM,
        io::ErrorKind::NotFound => libc::ENOENT,
        io::ErrorKind::ResourceBusy => libc::EBUSY,
        io::ErrorKind::TimedOut => libc::ETIMEDOUT,
        _ => libc::EIO,
    }
}
