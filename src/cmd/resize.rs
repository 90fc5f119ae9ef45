//! `obd resize`: grow a served ublk device online.

use anyhow::{bail, Result};
use ublk_target::state::DeviceRecord;

use super::ublk::check_dev_id;
use crate::snapshot_socket::{self, Answer, Ask};

/// Grow a served ublk device and its image to SIZE bytes, online.
///
/// The daemon serving /dev/ublkbN first checks that the kernel's ublk
/// driver can change a live device's size (UBLK_F_UPDATE_SIZE, Linux 6.16
/// and later); then the writable layer's virtual size grows (written to its
/// files, so the image keeps the new size when served again), and the
/// kernel is told the new capacity (UBLK_U_CMD_UPDATE_SIZE). The new space
/// reads as zeros; grow the filesystem on it yourself (resize2fs).
///
/// On an older kernel nothing is changed and the command fails saying so.
/// Only growing is possible, and only for an image with a writable layer.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  obd resize -n 0 20G\n  obd resize -n 0 21474836480\n  resize2fs /dev/ublkb0"
)]
pub struct Args {
    /// Device number N of /dev/ublkbN.
    #[arg(short = 'n', long = "number", allow_negative_numbers = true)]
    number: i64,
    /// The new size: bytes, or a number with K, M, G or T (powers of 1024),
    /// a multiple of 512 bytes and not smaller than the current size.
    #[arg(value_name = "SIZE", value_parser = parse_size)]
    size: u64,
}

/// `20G` → 20 GiB in bytes; a plain number is bytes.
fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown unit '{c}' (use K, M, G or T)")),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size (bytes, or a number with K, M, G or T)"))?;
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text} is too large"))?;
    if bytes == 0 || !bytes.is_multiple_of(512) {
        return Err(format!("{bytes} bytes is not a positive multiple of 512"));
    }
    Ok(bytes)
}

pub fn run(args: Args) -> Result<()> {
    let id = check_dev_id(args.number)?;
    let Some(record) = DeviceRecord::load(id) else {
        bail!("/dev/ublkb{id} is not a device obd serves (no record of it: see `obd list`)");
    };
    if !record.writable {
        bail!(
            "/dev/ublkb{id} is read-only (its image {} has no writable layer): it cannot grow",
            record.config.display()
        );
    }
    if args.size < record.size {
        bail!(
            "/dev/ublkb{id} is {} bytes and cannot shrink to {}; nothing was changed",
            record.size,
            args.size
        );
    }
    let device = format!("/dev/ublkb{id}");
    let ask = Ask::Resize { size: args.size };
    match snapshot_socket::request(&snapshot_socket::socket_path(id), &device, "obd add", &ask)? {
        Answer::Resized { old, new } if old == new => {
            println!("{device}: already {new} bytes");
            Ok(())
        }
        Answer::Resized { old, new } => {
            println!("{device}: grown from {old} to {new} bytes");
            Ok(())
        }
        Answer::Failed(reason) => bail!("{device}: resize failed: {reason}"),
        Answer::Done { .. } => bail!("{device}: the daemon answered another request"),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("100").is_err(), "not a multiple of 512");
        assert!(parse_size("0").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
