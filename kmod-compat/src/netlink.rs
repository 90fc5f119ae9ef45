//! TCMU's generic netlink: the "TCM-USER" family and its "config"
//! multicast group.
//!
//! target_core_user announces every device it adds, removes or
//! reconfigures on this group. Once some daemon has sent
//! `TCMU_CMD_SET_FEATURES` with kernel command reply support on (libtcmu,
//! and so tcmu-runner and the reference overlaybd-tcmu, does at start),
//! the kernel waits, with no timeout, for the matching `*_DONE` command
//! before the configfs write that caused the event returns; the status in
//! that answer becomes the write's result. A daemon that serves TCMU
//! devices on such a kernel must answer, or device creation hangs.
//!
//! This module is the wire format (netlink and generic netlink headers,
//! attributes: pure functions over byte slices, unit tested) and a small
//! blocking socket; what to answer is the service's business.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{netlink, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// The generic netlink family target_core_user registers.
pub const FAMILY_NAME: &str = "TCM-USER";
/// Its multicast group for device events.
pub const GROUP_NAME: &str = "config";
/// The version this side speaks (libtcmu's): from 2 on, events carry a
/// device id and are answered.
pub const VERSION: u8 = 2;

/// TCMU generic netlink commands (`enum tcmu_genl_cmd`).
pub mod cmd {
    pub const ADDED_DEVICE: u8 = 1;
    pub const REMOVED_DEVICE: u8 = 2;
    pub const RECONFIG_DEVICE: u8 = 3;
    pub const ADDED_DEVICE_DONE: u8 = 4;
    pub const REMOVED_DEVICE_DONE: u8 = 5;
    pub const RECONFIG_DEVICE_DONE: u8 = 6;
    pub const SET_FEATURES: u8 = 7;

    /// A command's name, for the log.
    pub fn name(cmd: u8) -> &'static str {
        match cmd {
            ADDED_DEVICE => "ADDED_DEVICE",
            REMOVED_DEVICE => "REMOVED_DEVICE",
            RECONFIG_DEVICE => "RECONFIG_DEVICE",
            ADDED_DEVICE_DONE => "ADDED_DEVICE_DONE",
            REMOVED_DEVICE_DONE => "REMOVED_DEVICE_DONE",
            RECONFIG_DEVICE_DONE => "RECONFIG_DEVICE_DONE",
            SET_FEATURES => "SET_FEATURES",
            _ => "unknown command",
        }
    }

    /// The answer the kernel waits for after `event`, if any.
    pub fn done_for(event: u8) -> Option<u8> {
        match event {
            ADDED_DEVICE => Some(ADDED_DEVICE_DONE),
            REMOVED_DEVICE => Some(REMOVED_DEVICE_DONE),
            RECONFIG_DEVICE => Some(RECONFIG_DEVICE_DONE),
            _ => None,
        }
    }
}

/// TCMU generic netlink attributes (`enum tcmu_genl_attr`).
pub mod attr {
    /// The uio device's name, `tcm-user/<hba>/<device>/<dev_config>`.
    pub const DEVICE: u16 = 1;
    /// The uio minor: the device is /dev/uio<minor>.
    pub const MINOR: u16 = 2;
    pub const PAD: u16 = 3;
    pub const DEV_CFG: u16 = 4;
    pub const DEV_SIZE: u16 = 5;
    pub const WRITECACHE: u16 = 6;
    pub const CMD_STATUS: u16 = 7;
    /// The LIO device index the answer names.
    pub const DEVICE_ID: u16 = 8;
    pub const SUPP_KERN_CMD_REPLY: u16 = 9;
}

// Netlink (linux/netlink.h) and generic netlink controller
// (linux/genetlink.h) numbers.
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;
/// Attribute type bits besides the type (nested, byte order flags).
const NLA_TYPE_MASK: u16 = 0x3fff;
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_ATTR_MCAST_GROUPS: u16 = 7;
const CTRL_ATTR_MCAST_GRP_NAME: u16 = 1;
const CTRL_ATTR_MCAST_GRP_ID: u16 = 2;
const SOL_NETLINK: i32 = 270;
const NETLINK_ADD_MEMBERSHIP: i32 = 1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A generic netlink message being built: netlink header, generic netlink
/// header, then attributes.
pub struct MessageBuilder {
    buf: Vec<u8>,
}

impl MessageBuilder {
    /// `kind` is the family id (the netlink message type); `flags` are
    /// netlink header flags.
    pub fn new(kind: u16, flags: u16, seq: u32, command: u8, version: u8) -> MessageBuilder {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        buf.extend_from_slice(&[command, version, 0, 0]);
        MessageBuilder { buf }
    }

    /// Append one attribute, padded to 4 bytes.
    pub fn attr(mut self, kind: u16, payload: &[u8]) -> MessageBuilder {
        let len = NLA_HDRLEN + payload.len();
        let len16 = u16::try_from(len).expect("a netlink attribute of under 64 KiB");
        self.buf.extend_from_slice(&len16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(self.buf.len() + align4(len) - len, 0);
        self
    }

    /// A string attribute, NUL-terminated as the kernel's NLA_STRING.
    pub fn attr_str(self, kind: u16, value: &str) -> MessageBuilder {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.attr(kind, &bytes)
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// The answer to an event: `done` (an `*_DONE` command) with the status
/// (0 or a negative errno) and the device id the event carried. An ACK is
/// asked for so that a refused answer shows in the log.
pub fn answer_message(family: u16, seq: u32, done: u8, device_id: u32, status: i32) -> Vec<u8> {
    MessageBuilder::new(family, NLM_F_REQUEST | NLM_F_ACK, seq, done, VERSION)
        .attr(attr::CMD_STATUS, &status.to_ne_bytes())
        .attr(attr::DEVICE_ID, &device_id.to_ne_bytes())
        .finish()
}

/// TCMU_CMD_SET_FEATURES: whether a daemon answers the kernel's events.
pub fn set_features_message(family: u16, seq: u32, reply: bool) -> Vec<u8> {
    MessageBuilder::new(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        cmd::SET_FEATURES,
        VERSION,
    )
    .attr(attr::SUPP_KERN_CMD_REPLY, &[u8::from(reply)])
    .finish()
}

/// The controller's CTRL_CMD_GETFAMILY for `name`.
pub fn get_family_message(seq: u32, name: &str) -> Vec<u8> {
    MessageBuilder::new(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
    )
    .attr_str(CTRL_ATTR_FAMILY_NAME, name)
    .finish()
}

/// A netlink message header, as received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub port: u32,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The netlink messages in one datagram: each header and its payload.
pub fn messages(mut buf: &[u8]) -> Result<Vec<(Header, &[u8])>, String> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        if buf.len() < NLMSG_HDRLEN {
            return Err(format!("{} stray bytes after the last message", buf.len()));
        }
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(format!("a message of length {len} in {} bytes", buf.len()));
        }
        let header = Header {
            kind: u16_at(buf, 4),
            flags: u16_at(buf, 6),
            seq: u32_at(buf, 8),
            port: u32_at(buf, 12),
        };
        out.push((header, &buf[NLMSG_HDRLEN..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// The error code of an NLMSG_ERROR payload: 0 for an ACK, else a
/// negative errno.
pub fn error_code(payload: &[u8]) -> Result<i32, String> {
    if payload.len() < 4 {
        return Err("a netlink error message without its code".into());
    }
    Ok(u32_at(payload, 0) as i32)
}

/// A generic netlink payload's command, version and attribute bytes.
pub fn genl_header(payload: &[u8]) -> Result<(u8, u8, &[u8]), String> {
    if payload.len() < GENL_HDRLEN {
        return Err("a generic netlink message without its header".into());
    }
    Ok((payload[0], payload[1], &payload[GENL_HDRLEN..]))
}

/// The attributes in `buf`: type (flag bits cleared) and payload.
pub fn attributes(mut buf: &[u8]) -> Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    while buf.len() >= NLA_HDRLEN {
        let len = u16_at(buf, 0) as usize;
        if len < NLA_HDRLEN || len > buf.len() {
            return Err(format!(
                "an attribute of length {len} in {} bytes",
                buf.len()
            ));
        }
        out.push((u16_at(buf, 2) & NLA_TYPE_MASK, &buf[NLA_HDRLEN..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

fn attr_u32(kind: u16, payload: &[u8]) -> Result<u32, String> {
    payload
        .get(..4)
        .map(|b| u32_at(b, 0))
        .ok_or_else(|| format!("attribute {kind}: {} bytes, not a u32", payload.len()))
}

fn attr_u64(kind: u16, payload: &[u8]) -> Result<u64, String> {
    payload
        .get(..8)
        .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| format!("attribute {kind}: {} bytes, not a u64", payload.len()))
}

fn attr_string(payload: &[u8]) -> String {
    let end = payload
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(payload.len());
    String::from_utf8_lossy(&payload[..end]).into_owned()
}

/// The family id and multicast groups (name, id) of a CTRL_CMD_GETFAMILY
/// answer's generic netlink payload.
pub fn parse_family(payload: &[u8]) -> Result<(u16, Vec<(String, u32)>), String> {
    let (_, _, attrs) = genl_header(payload)?;
    let mut id = None;
    let mut groups = Vec::new();
    for (kind, value) in attributes(attrs)? {
        match kind {
            CTRL_ATTR_FAMILY_ID if value.len() >= 2 => id = Some(u16_at(value, 0)),
            CTRL_ATTR_MCAST_GROUPS => {
                for (_, group) in attributes(value)? {
                    let (mut name, mut group_id) = (None, None);
                    for (kind, value) in attributes(group)? {
                        match kind {
                            CTRL_ATTR_MCAST_GRP_NAME => name = Some(attr_string(value)),
                            CTRL_ATTR_MCAST_GRP_ID => group_id = Some(attr_u32(kind, value)?),
                            _ => {}
                        }
                    }
                    if let (Some(name), Some(group_id)) = (name, group_id) {
                        groups.push((name, group_id));
                    }
                }
            }
            _ => {}
        }
    }
    let id = id.ok_or("the family answer has no family id")?;
    Ok((id, groups))
}

/// One event of target_core_user, as it came.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub command: u8,
    pub version: u8,
    /// The uio name, `tcm-user/<hba>/<device>/<dev_config>`.
    pub device: Option<String>,
    pub minor: Option<u32>,
    pub device_id: Option<u32>,
    /// RECONFIG_DEVICE: the new dev_config.
    pub dev_config: Option<String>,
    /// RECONFIG_DEVICE: the new size in bytes.
    pub dev_size: Option<u64>,
    /// RECONFIG_DEVICE: the new emulate_write_cache.
    pub write_cache: Option<u8>,
}

impl Event {
    /// Parse a TCM-USER message's generic netlink payload.
    pub fn parse(payload: &[u8]) -> Result<Event, String> {
        let (command, version, attrs) = genl_header(payload)?;
        let mut event = Event {
            command,
            version,
            ..Event::default()
        };
        for (kind, value) in attributes(attrs)? {
            match kind {
                attr::DEVICE => event.device = Some(attr_string(value)),
                attr::MINOR => event.minor = Some(attr_u32(kind, value)?),
                attr::DEVICE_ID => event.device_id = Some(attr_u32(kind, value)?),
                attr::DEV_CFG => event.dev_config = Some(attr_string(value)),
                attr::DEV_SIZE => event.dev_size = Some(attr_u64(kind, value)?),
                attr::WRITECACHE => {
                    event.write_cache =
                        Some(*value.first().ok_or("an empty write cache attribute")?)
                }
                _ => {}
            }
        }
        Ok(event)
    }

    /// The uio node, `uio<minor>`.
    pub fn node(&self) -> Option<String> {
        self.minor.map(|m| format!("uio{m}"))
    }
}

/// A generic netlink socket, bound to an address the kernel picks.
pub struct Socket {
    fd: OwnedFd,
}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::RAW,
            SocketFlags::CLOEXEC,
            Some(netlink::GENERIC),
        )?;
        rustix::net::bind(&fd, &netlink::SocketAddrNetlink::new(0, 0))?;
        Ok(Socket { fd })
    }

    /// Receive `group`'s multicasts from now on.
    pub fn join(&self, group: u32) -> io::Result<()> {
        // SAFETY: setsockopt on our own open fd with a pointer to a live
        // u32 and its size, as NETLINK_ADD_MEMBERSHIP takes.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                SOL_NETLINK,
                NETLINK_ADD_MEMBERSHIP,
                (&group as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A bigger receive buffer, so a burst of events is not dropped.
    pub fn set_recv_buffer(&self, bytes: usize) -> io::Result<()> {
        Ok(rustix::net::sockopt::set_socket_recv_buffer_size(
            &self.fd, bytes,
        )?)
    }

    /// Send one message to the kernel.
    pub fn send(&self, message: &[u8]) -> io::Result<()> {
        let sent = rustix::net::send(&self.fd, message, SendFlags::empty())?;
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short netlink send",
            ));
        }
        Ok(())
    }

    /// Wait up to `timeout` for a datagram; `Ok(None)` when none came.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let ts = Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        match poll(&mut fds, Some(&ts)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        match rustix::net::recv(&self.fd, &mut *buf, RecvFlags::DONTWAIT) {
            Ok((n, _)) => Ok(Some(n)),
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Send `message` (which asks for an ACK with sequence number `seq`)
    /// and wait for its ACK: the payload of the last answer before it, if
    /// any; an error with the kernel's errno when it refused. Messages for
    /// other requests (and multicasts) are skipped.
    pub fn request(&self, message: &[u8], seq: u32) -> io::Result<Option<Vec<u8>>> {
        self.send(message)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65536];
        let mut answer = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no netlink answer within 5 s",
                ));
            }
            let Some(n) = self.recv(&mut buf, left)? else {
                continue;
            };
            let parsed =
                messages(&buf[..n]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            for (header, payload) in parsed {
                if header.seq != seq {
                    continue;
                }
                if header.kind == NLMSG_ERROR {
                    let code = error_code(payload)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    if code < 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    return Ok(answer);
                }
                if header.kind != NLMSG_DONE && header.kind != NLMSG_NOOP {
                    answer = Some(payload.to_vec());
                }
            }
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Sequence numbers for requests this process sends.
static NEXT_SEQ: AtomicU32 = AtomicU32::new(1);

fn next_seq() -> u32 {
    NEXT_SEQ.fetch_add(1, Ordering::Relaxed)
}

/// The TCM-USER family id and its "config" group id, asked of the kernel
/// over `socket`. NotFound when target_core_user is not loaded.
pub fn resolve(socket: &Socket) -> io::Result<(u16, u32)> {
    let seq = next_seq();
    let payload = match socket.request(&get_family_message(seq, FAMILY_NAME), seq) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the kernel did not describe the family",
            ))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no generic netlink family {FAMILY_NAME} (target_core_user not loaded?)"),
            ))
        }
        Err(e) => return Err(e),
    };
    let (family, groups) =
        parse_family(&payload).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let group = groups
        .iter()
        .find(|(name, _)| name == GROUP_NAME)
        .map(|&(_, id)| id)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("family {FAMILY_NAME} has no multicast group {GROUP_NAME}"),
            )
        })?;
    Ok((family, group))
}

/// Tell target_core_user whether a daemon answers its events
/// (TCMU_CMD_SET_FEATURES, kernel command reply support). `Ok(false)` when
/// this kernel has no such setting (EOPNOTSUPP / EINVAL from an older
/// kernel): it then never waits for answers.
pub fn set_reply_support(on: bool) -> io::Result<bool> {
    let socket = Socket::open()?;
    let (family, _) = resolve(&socket)?;
    let seq = next_seq();
    match socket.request(&set_features_message(family, seq, on), seq) {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// What came in on the events socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Event(Event),
    /// The kernel refused an answer this side sent (its sequence number,
    /// a negative errno).
    Refused {
        seq: u32,
        errno: i32,
    },
    /// Something that could not be parsed, and why.
    Garbled(String),
}

/// The events socket: joined to the "config" group; answers go out on it.
pub struct Events {
    socket: Socket,
    family: u16,
}

impl Events {
    /// Resolve the family and join its group. The caller turns reply
    /// support on afterwards (so that no event is missed in between).
    pub fn connect() -> io::Result<Events> {
        let socket = Socket::open()?;
        let (family, group) = resolve(&socket)?;
        socket.join(group)?;
        // Best effort: the default buffer holds hundreds of events too.
        let _ = socket.set_recv_buffer(1 << 20);
        Ok(Events { socket, family })
    }

    pub fn family(&self) -> u16 {
        self.family
    }

    /// Answer an event: `done` for the device `device_id`, with `status`
    /// (0 or a negative errno). Returns the answer's sequence number.
    pub fn answer(&self, done: u8, device_id: u32, status: i32) -> io::Result<u32> {
        let seq = next_seq();
        self.socket
            .send(&answer_message(self.family, seq, done, device_id, status))?;
        Ok(seq)
    }

    /// What arrived within `timeout` (nothing on timeout). ACKs of
    /// answers are dropped; refusals are returned.
    pub fn receive(&self, timeout: Duration) -> io::Result<Vec<Incoming>> {
        let mut buf = vec![0u8; 65536];
        let Some(n) = self.socket.recv(&mut buf, timeout)? else {
            return Ok(Vec::new());
        };
        if std::env::var_os("OBD_TCMU_NETLINK_DUMP").is_some_and(|v| v == "1") {
            let hex: String = buf[..n].iter().map(|b| format!("{b:02x}")).collect();
            eprintln!("obd tcmu: netlink datagram of {n} bytes: {hex}");
        }
        Ok(decode(&buf[..n], self.family))
    }
}

/// Decode one datagram of the events socket.
pub fn decode(datagram: &[u8], family: u16) -> Vec<Incoming> {
    let parsed = match messages(datagram) {
        Ok(p) => p,
        Err(e) => return vec![Incoming::Garbled(e)],
    };
    let mut out = Vec::new();
    for (header, payload) in parsed {
        match header.kind {
            NLMSG_ERROR => match error_code(payload) {
                Ok(0) => {}
                Ok(errno) => out.push(Incoming::Refused {
                    seq: header.seq,
                    errno,
                }),
                Err(e) => out.push(Incoming::Garbled(e)),
            },
            kind if kind == family => match Event::parse(payload) {
                Ok(event) => out.push(Incoming::Event(event)),
                Err(e) => out.push(Incoming::Garbled(e)),
            },
            _ => {}
        }
    }
    out
}

/// An errno's text, as strerror gives it, for the log.
pub fn errno_text(status: i32) -> String {
    if status == 0 {
        return "ok".into();
    }
    format!(
        "{status} ({})",
        io::Error::from_raw_os_error(status.saturating_neg())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datagrams captured in the TCMU VM test (Debian's 6.12 kernel,
    /// x86_64; `OBD_TCMU_NETLINK_DUMP=1`), family id 0x23: ADDED_DEVICE
    /// for user_1/nl, RECONFIG_DEVICE with a new dev_size (2 GiB), the ACK
    /// of an answer, and the kernel refusing one with ENODEV (the refused
    /// request follows the error code).
    const ADDED: &str = "58000000230000000000000000000000010200003100010074636d2d757365722f31\
        2f6e6c2f6f7665726c617962642f2f746d702f74636d752f6c736d74312e6a736f6e00000000080002000800\
        0000080008000f000000";
    const RECONFIG_SIZE: &str = "64000000230000000000000000000000030200003100010074636d2d7573\
        65722f312f6e6c2f6f7665726c617962642f2f746d702f74636d752f6c736d74312e6a736f6e000000000800\
        020008000000080008000f0000000c0005000000008000000000";
    const ACK: &str = "2400000002000001050000001b0500000000000024000000230005000500000000000000";
    const REFUSED: &str = "38000000020000000b0000001b050000edffffff24000000230005000b00000000\
        000000050200000800070000000000080008000d000000";
    const FAMILY: u16 = 0x23;

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn captured_kernel_events_parse() {
        if cfg!(target_endian = "big") {
            return;
        }
        let added = hex(ADDED);
        let want = Event {
            command: cmd::ADDED_DEVICE,
            version: 2,
            device: Some("tcm-user/1/nl/overlaybd//tmp/tcmu/lsmt1.json".into()),
            minor: Some(8),
            device_id: Some(15),
            ..Event::default()
        };
        assert_eq!(decode(&added, FAMILY), vec![Incoming::Event(want.clone())]);
        assert_eq!(want.node().as_deref(), Some("uio8"));
        // Another family's message is not ours.
        assert!(decode(&added, FAMILY + 1).is_empty());
        let reconfig = decode(&hex(RECONFIG_SIZE), FAMILY);
        let want = Event {
            command: cmd::RECONFIG_DEVICE,
            dev_size: Some(2 << 30),
            ..want
        };
        assert_eq!(reconfig, vec![Incoming::Event(want)]);
        assert!(decode(&hex(ACK), FAMILY).is_empty());
        assert_eq!(
            decode(&hex(REFUSED), FAMILY),
            vec![Incoming::Refused {
                seq: 11,
                errno: -19
            }]
        );
    }

    #[test]
    fn answers_have_status_and_device_id() {
        let m = answer_message(0x1a, 9, cmd::ADDED_DEVICE_DONE, 5, -22);
        assert_eq!(m.len(), 16 + 4 + 8 + 8);
        let parsed = messages(&m).unwrap();
        assert_eq!(parsed.len(), 1);
        let (header, payload) = parsed[0];
        assert_eq!(
            header,
            Header {
                kind: 0x1a,
                flags: NLM_F_REQUEST | NLM_F_ACK,
                seq: 9,
                port: 0
            }
        );
        let (command, version, attrs) = genl_header(payload).unwrap();
        assert_eq!((command, version), (cmd::ADDED_DEVICE_DONE, VERSION));
        let attrs = attributes(attrs).unwrap();
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0], (attr::CMD_STATUS, &(-22i32).to_ne_bytes()[..]));
        assert_eq!(attrs[1], (attr::DEVICE_ID, &5u32.to_ne_bytes()[..]));
    }

    #[test]
    fn set_features_carries_one_byte_padded() {
        let m = set_features_message(0x1a, 1, true);
        // header 16 + genl 4 + attribute 4 + 1 byte padded to 8.
        assert_eq!(m.len(), 28);
        let (_, payload) = messages(&m).unwrap()[0];
        let (command, _, attrs) = genl_header(payload).unwrap();
        assert_eq!(command, cmd::SET_FEATURES);
        assert_eq!(
            attributes(attrs).unwrap(),
            vec![(attr::SUPP_KERN_CMD_REPLY, &[1u8][..])]
        );
        let off = set_features_message(0x1a, 2, false);
        assert_eq!(off[24], 0);
    }

    #[test]
    fn reconfig_events_round_trip_with_padding_and_flags() {
        // DEV_SIZE as nla_put_u64_64bit may write it: a PAD attribute
        // first; and an attribute type with the nested flag set.
        let m = MessageBuilder::new(0x1a, 0, 0, cmd::RECONFIG_DEVICE, 2)
            .attr_str(attr::DEVICE, "tcm-user/1/v/overlaybd//c.json")
            .attr(attr::MINOR, &0u32.to_ne_bytes())
            .attr(attr::DEVICE_ID, &1u32.to_ne_bytes())
            .attr(attr::PAD, &[])
            .attr(attr::DEV_SIZE, &(64u64 << 30).to_ne_bytes())
            .attr(attr::WRITECACHE | 0x8000, &[1])
            .attr(attr::DEV_CFG, b"overlaybd//d.json\0")
            .finish();
        let got = decode(&m, 0x1a);
        let Incoming::Event(event) = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!(event.command, cmd::RECONFIG_DEVICE);
        assert_eq!(event.dev_size, Some(64 << 30));
        assert_eq!(event.write_cache, Some(1));
        assert_eq!(event.dev_config.as_deref(), Some("overlaybd//d.json"));
        assert_eq!(event.node().as_deref(), Some("uio0"));
    }

    #[test]
    fn acks_are_dropped_and_refusals_kept() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&7u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]); // the request's header
        assert!(decode(&ack, 0x1a).is_empty());
        let mut refused = ack.clone();
        refused[16..20].copy_from_slice(&(-19i32).to_ne_bytes());
        // Two messages in one datagram.
        let mut both = ack.clone();
        both.extend_from_slice(&refused);
        assert_eq!(
            decode(&both, 0x1a),
            vec![Incoming::Refused { seq: 7, errno: -19 }]
        );
    }

    #[test]
    fn family_answers_give_id_and_groups() {
        // CTRL_ATTR_MCAST_GROUPS: nested, one nest per group.
        let group = MessageBuilder::new(0, 0, 0, 0, 0)
            .attr(CTRL_ATTR_MCAST_GRP_ID, &12u32.to_ne_bytes())
            .attr_str(CTRL_ATTR_MCAST_GRP_NAME, "config")
            .finish();
        let group_attrs = &group[NLMSG_HDRLEN + GENL_HDRLEN..];
        let mut nest = Vec::new();
        nest.extend_from_slice(&((NLA_HDRLEN + group_attrs.len()) as u16).to_ne_bytes());
        nest.extend_from_slice(&(1u16 | 0x8000).to_ne_bytes());
        nest.extend_from_slice(group_attrs);
        let m = MessageBuilder::new(GENL_ID_CTRL, 0, 3, 1, 2)
            .attr_str(CTRL_ATTR_FAMILY_NAME, FAMILY_NAME)
            .attr(CTRL_ATTR_FAMILY_ID, &0x1au16.to_ne_bytes())
            .attr(CTRL_ATTR_MCAST_GROUPS | 0x8000, &nest)
            .finish();
        let (_, payload) = messages(&m).unwrap()[0];
        let (id, groups) = parse_family(payload).unwrap();
        assert_eq!(id, 0x1a);
        assert_eq!(groups, vec![("config".to_string(), 12)]);
        // The request names the family, NUL-terminated.
        let request = get_family_message(4, FAMILY_NAME);
        let (_, payload) = messages(&request).unwrap()[0];
        let (_, _, attrs) = genl_header(payload).unwrap();
        assert_eq!(
            attributes(attrs).unwrap(),
            vec![(CTRL_ATTR_FAMILY_NAME, &b"TCM-USER\0"[..])]
        );
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        assert!(messages(&[1, 2, 3]).is_err());
        let mut short = hex(ADDED);
        short.truncate(40);
        assert!(matches!(decode(&short, FAMILY)[0], Incoming::Garbled(_)));
        // An attribute that claims more than there is.
        let mut long_attr = hex(ADDED);
        long_attr[20] = 0xff;
        assert!(matches!(
            decode(&long_attr, FAMILY)[0],
            Incoming::Garbled(_)
        ));
        // A MINOR of two bytes.
        let m = MessageBuilder::new(0x1a, 0, 0, cmd::ADDED_DEVICE, 2)
            .attr(attr::MINOR, &[1, 2])
            .finish();
        assert!(matches!(decode(&m, 0x1a)[0], Incoming::Garbled(_)));
        assert!(error_code(&[0, 0]).is_err());
        assert!(genl_header(&[1]).is_err());
        assert_eq!(
            errno_text(-22),
            format!("-22 ({})", io::Error::from_raw_os_error(22))
        );
        assert_eq!(errno_text(0), "ok");
    }
}
