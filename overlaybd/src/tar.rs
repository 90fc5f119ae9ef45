//! The tar wrapper around registry layer blobs.
//!
//! `overlaybd-commit -t` (and the convertor) store a layer in the registry
//! as a one-file tar so generic OCI tooling accepts it: a pax header
//! `overlaybd.pax` whose `size` record gives the payload length, a regular
//! header `overlaybd.commit`, then the payload at 1536. A plain ustar file
//! puts the payload at 512. Detection follows the reference: `ustar` magic,
//! version `00` and a valid header checksum on the first block; anything
//! else is not a tar and is read as it is.

use crate::error::{Error, IoContext, Result};
use crate::io::{ReadAt, Source, Window};

const BLOCK: usize = 512;
const BLOCK_U64: u64 = BLOCK as u64;
/// Largest pax extended header we read (overlaybd's is about 20 bytes).
const MAX_PAX_LEN: u64 = 64 << 10;
/// Extension headers (pax, GNU long names) allowed before the file header.
const MAX_EXTENSION_HEADERS: usize = 8;

/// Where the payload of a tar-wrapped blob lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarPayload {
    /// Byte offset of the payload in the blob (512, or 1536 after a pax header).
    pub offset: u64,
    /// Payload length.
    pub size: u64,
    /// A pax extended header preceded the file header.
    pub pax: bool,
    /// Name in the file header (`overlaybd.commit` for overlaybd blobs).
    pub name: String,
}

impl TarPayload {
    /// The payload as a source of its own.
    pub fn window(&self, src: Source) -> Result<Window> {
        let name = src.name().to_string();
        Window::new(src, self.offset, self.size).map_err(|e| Error::corrupt(name, e.to_string()))
    }
}

/// One parsed 512-byte tar header (only the fields used here).
struct Header<'a> {
    block: &'a [u8; BLOCK],
}

impl<'a> Header<'a> {
    fn new(block: &'a [u8; BLOCK]) -> Self {
        Header { block }
    }

    /// `ustar` magic (5 bytes, as the reference compares), version `00` and a
    /// valid checksum.
    fn is_ustar(&self) -> bool {
        &self.block[257..262] == b"ustar" && &self.block[263..265] == b"00" && self.checksum_ok()
    }

    /// The stored checksum equals the byte sum with the checksum field read
    /// as spaces, summing bytes as unsigned or (old tars) as signed.
    fn checksum_ok(&self) -> bool {
        let Some(stored) = parse_octal(&self.block[148..156]) else {
            return false;
        };
        let (mut unsigned, mut signed) = (0i64, 0i64);
        for (i, &b) in self.block.iter().enumerate() {
            let b = if (148..156).contains(&i) { b' ' } else { b };
            unsigned += i64::from(b);
            signed += i64::from(b as i8);
        }
        stored == unsigned as u64 || (signed >= 0 && stored == signed as u64)
    }

    fn typeflag(&self) -> u8 {
        self.block[156]
    }

    fn name(&self) -> String {
        let field = &self.block[..100];
        let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
        String::from_utf8_lossy(&field[..end]).into_owned()
    }

    fn size(&self) -> Option<u64> {
        parse_numeric(&self.block[124..136])
    }
}

/// Octal number field: optional leading spaces, digits, then NUL or space.
fn parse_octal(field: &[u8]) -> Option<u64> {
    let start = field.iter().position(|&b| b != b' ')?;
    let mut value = 0u64;
    let mut digits = 0;
    for &b in &field[start..] {
        match b {
            b'0'..=b'7' => {
                value = value.checked_mul(8)?.checked_add(u64::from(b - b'0'))?;
                digits += 1;
            }
            b' ' | 0 => break,
            _ => return None,
        }
    }
    (digits > 0).then_some(value)
}

/// A size field: octal, or GNU base-256 when the top bit of the first byte is set.
fn parse_numeric(field: &[u8]) -> Option<u64> {
    match field.first() {
        Some(&first) if first & 0x80 != 0 => {
            if first & 0x40 != 0 {
                return None; // negative
            }
            let mut value = u64::from(first & 0x3f);
            for &b in &field[1..] {
                value = value.checked_mul(256)?.checked_add(u64::from(b))?;
            }
            Some(value)
        }
        _ => parse_octal(field),
    }
}

/// The `size` record of pax extended-header data (`"<len> size=<n>\n"`
/// records); `Ok(None)` when there is none.
fn pax_size(data: &[u8]) -> std::result::Result<Option<u64>, String> {
    let mut rest = data;
    let mut size = None;
    while !rest.is_empty() && rest[0] != 0 {
        let space = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or("pax record without a length")?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("pax record with a bad length")?;
        if len <= space + 1 || len > rest.len() {
            return Err(format!("pax record length {len} does not fit"));
        }
        let record = &rest[space + 1..len];
        let record = record
            .strip_suffix(b"\n")
            .ok_or("pax record not ended by a newline")?;
        if let Some(value) = record.strip_prefix(b"size=") {
            let value = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or("pax size record is not a number")?;
            size = Some(value);
        }
        rest = &rest[len..];
    }
    Ok(size)
}

fn read_block(src: &dyn ReadAt, offset: u64) -> Result<[u8; BLOCK]> {
    let mut block = [0u8; BLOCK];
    src.read_exact_at(&mut block, offset)
        .context(|| src.name().to_string())?;
    Ok(block)
}

/// Whether `block` (the first 512 bytes of a blob) is a tar header as the
/// reference detects it.
pub fn is_tar_header(block: &[u8; BLOCK]) -> bool {
    Header::new(block).is_ustar()
}

/// Find the payload of a tar-wrapped blob. `Ok(None)`: not a tar (read the
/// blob as it is). `Err(Corrupt)`: it looks like a tar but its headers or
/// sizes do not hold together.
pub fn detect(src: &dyn ReadAt) -> Result<Option<TarPayload>> {
    if src.size() < BLOCK_U64 {
        return Ok(None);
    }
    let mut block = read_block(src, 0)?;
    if !is_tar_header(&block) {
        return Ok(None);
    }
    let corrupt = |problem: String| Error::corrupt(src.name(), problem);
    let mut offset = 0u64;
    let mut pax = false;
    let mut pax_size_value = None;
    for _ in 0..=MAX_EXTENSION_HEADERS {
        let header = Header::new(&block);
        if offset > 0 && !header.checksum_ok() {
            return Err(corrupt(format!(
                "tar header at {offset} has a bad checksum"
            )));
        }
        let size = header
            .size()
            .ok_or_else(|| corrupt(format!("tar header at {offset} has a bad size field")))?;
        let data_offset = offset + BLOCK_U64;
        match header.typeflag() {
            // pax extended / global header, GNU long name / long link
            t @ (b'x' | b'g' | b'L' | b'K') => {
                if size > MAX_PAX_LEN || size > src.size() - data_offset.min(src.size()) {
                    return Err(corrupt(format!(
                        "tar extension header at {offset} claims {size} bytes"
                    )));
                }
                if t == b'x' {
                    let mut data = vec![0u8; size as usize];
                    src.read_exact_at(&mut data, data_offset)
                        .context(|| src.name().to_string())?;
                    if let Some(n) = pax_size(&data).map_err(corrupt)? {
                        pax_size_value = Some(n);
                    }
                    pax = true;
                }
                offset = data_offset + size.div_ceil(BLOCK_U64) * BLOCK_U64;
                if offset
                    .checked_add(BLOCK_U64)
                    .is_none_or(|end| end > src.size())
                {
                    return Err(corrupt(format!(
                        "tar file header at {offset} lies past the end"
                    )));
                }
                block = read_block(src, offset)?;
            }
            _ => {
                let size = match pax_size_value {
                    Some(n) if n > 0 => n,
                    _ => size,
                };
                let fits = data_offset
                    .checked_add(size)
                    .is_some_and(|end| end <= src.size());
                if !fits {
                    return Err(corrupt(format!(
                        "tar payload at {data_offset}+{size} passes the end ({} bytes)",
                        src.size()
                    )));
                }
                return Ok(Some(TarPayload {
                    offset: data_offset,
                    size,
                    pax,
                    name: header.name(),
                }));
            }
        }
    }
    Err(corrupt(format!(
        "more than {MAX_EXTENSION_HEADERS} tar extension headers"
    )))
}

/// Wrap `payload` in a tar exactly as `overlaybd-commit -t` does: a pax
/// header `overlaybd.pax` (type `x`, no mode/owner/time) holding a `size`
/// record, a regular-file header `overlaybd.commit` (regular file 0644, root, size field
/// 0: the pax record carries it), the payload padded to 512 bytes, then two
/// zero blocks.
pub fn wrap(payload: &dyn ReadAt, out: &mut dyn std::io::Write) -> Result<()> {
    let size = payload.size();
    let record = pax_record("size", &size.to_string());
    let out_err = |e| Error::io("tar output", e);
    let mut pax_header = new_header("overlaybd.pax", b'x');
    put_number(&mut pax_header[124..136], record.len() as u64);
    out.write_all(&with_checksum(pax_header)).map_err(out_err)?;
    let mut pax_block = vec![0u8; (record.len()).div_ceil(BLOCK) * BLOCK];
    pax_block[..record.len()].copy_from_slice(record.as_bytes());
    out.write_all(&pax_block).map_err(out_err)?;
    let mut file_header = new_header("overlaybd.commit", b'0');
    put_number(&mut file_header[100..108], 0o100644);
    put_number(&mut file_header[108..116], 0);
    put_number(&mut file_header[116..124], 0);
    put_number(&mut file_header[124..136], 0);
    put_number(&mut file_header[136..148], 0);
    file_header[265..269].copy_from_slice(b"root");
    file_header[297..301].copy_from_slice(b"root");
    out.write_all(&with_checksum(file_header))
        .map_err(out_err)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < size {
        let n = (size - done).min(buf.len() as u64) as usize;
        payload
            .read_exact_at(&mut buf[..n], done)
            .context(|| payload.name().to_string())?;
        out.write_all(&buf[..n]).map_err(out_err)?;
        done += n as u64;
    }
    let padding = (BLOCK_U64 - size % BLOCK_U64) % BLOCK_U64;
    out.write_all(&vec![0u8; padding as usize + 2 * BLOCK])
        .map_err(out_err)?;
    out.flush().map_err(out_err)
}

/// One pax record: `<len> <key>=<value>\n`, where len counts itself.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while len.to_string().len() + body.len() != len {
        len = len.to_string().len() + body.len();
    }
    format!("{len}{body}")
}

fn new_header(name: &str, typeflag: u8) -> [u8; BLOCK] {
    let mut block = [0u8; BLOCK];
    block[..name.len()].copy_from_slice(name.as_bytes());
    block[156] = typeflag;
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    block
}

/// A numeric field as the reference writes it: octal, right-aligned with
/// spaces, then a space (12-byte fields) or a space and a NUL (8-byte ones).
fn put_number(field: &mut [u8], value: u64) {
    let text = if field.len() == 12 {
        format!("{value:>11o} ")
    } else {
        format!("{value:>w$o} \0", w = field.len() - 2)
    };
    field.copy_from_slice(text.as_bytes());
}

/// Fill in the checksum (computed with the field as spaces).
fn with_checksum(mut block: [u8; BLOCK]) -> [u8; BLOCK] {
    block[148..156].fill(b' ');
    let sum: u64 = block.iter().map(|&b| b as u64).sum();
    put_number(&mut block[148..156], sum);
    block
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::Bytes;
    use std::sync::Arc;

    fn header(name: &str, typeflag: u8, size: u64) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[..name.len()].copy_from_slice(name.as_bytes());
        b[100..108].copy_from_slice(b"0000644\0");
        b[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        b[156] = typeflag;
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
        b[148..156].copy_from_slice(b"        ");
        let sum: u32 = b.iter().map(|&x| u32::from(x)).sum();
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        b
    }

    fn pad(v: &mut Vec<u8>) {
        v.resize(v.len().div_ceil(BLOCK) * BLOCK, 0);
    }

    fn overlaybd_blob(payload: &[u8]) -> Vec<u8> {
        let record = format!(
            "{} size={}\n",
            9 + payload.len().to_string().len(),
            payload.len()
        );
        let mut v = header("overlaybd.pax", b'x', record.len() as u64).to_vec();
        v.extend_from_slice(record.as_bytes());
        pad(&mut v);
        v.extend_from_slice(&header("overlaybd.commit", b'0', 0));
        v.extend_from_slice(payload);
        pad(&mut v);
        v.extend_from_slice(&[0u8; 2 * BLOCK]);
        v
    }

    #[test]
    fn pax_wrapped_payload_at_1536() {
        let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let blob = overlaybd_blob(&payload);
        let p = detect(&Bytes::new(blob.clone(), "b")).unwrap().unwrap();
        assert_eq!((p.offset, p.size, p.pax), (1536, 5000, true));
        assert_eq!(p.name, "overlaybd.commit");
        let w = p.window(Arc::new(Bytes::new(blob, "b"))).unwrap();
        let mut got = vec![0u8; 5000];
        w.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, payload);
    }

    #[test]
    fn plain_ustar_payload_at_512() {
        let mut v = header("layer", b'0', 700).to_vec();
        v.extend_from_slice(&[7u8; 700]);
        pad(&mut v);
        let p = detect(&Bytes::new(v, "b")).unwrap().unwrap();
        assert_eq!((p.offset, p.size, p.pax), (512, 700, false));
    }

    #[test]
    fn not_a_tar() {
        assert_eq!(detect(&Bytes::new(vec![0u8; 4096], "z")).unwrap(), None);
        assert_eq!(detect(&Bytes::new(b"short".to_vec(), "s")).unwrap(), None);
        // Right magic, wrong checksum: not a tar, as the reference decides.
        let mut h = header("x", b'0', 0);
        h[0] = b'y';
        assert_eq!(detect(&Bytes::new(h.to_vec(), "c")).unwrap(), None);
        // Wrong version.
        let mut h = header("x", b'0', 0);
        h[263] = b' ';
        assert_eq!(detect(&Bytes::new(h.to_vec(), "v")).unwrap(), None);
    }

    #[test]
    fn payload_past_the_end_is_corrupt() {
        let mut v = header("layer", b'0', 10_000).to_vec();
        v.extend_from_slice(&[1u8; 512]);
        let err = detect(&Bytes::new(v, "t")).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("passes the end"), "{err}");

        let blob = overlaybd_blob(&[5u8; 100]);
        let truncated = blob[..1024].to_vec();
        let err = detect(&Bytes::new(truncated, "t")).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    }

    #[test]
    fn garbage_never_panics() {
        // Valid first header followed by arbitrary bytes, and fields mangled one by one.
        let base = overlaybd_blob(&[9u8; 3000]);
        for i in 0..1600 {
            for val in [0u8, 0xff, b'7', b' ', b'x'] {
                let mut v = base.clone();
                v[i] = val;
                let _ = detect(&Bytes::new(v, "g"));
            }
        }
    }

    #[test]
    fn pax_records() {
        assert_eq!(pax_size(b"15 size=667229\n").unwrap(), Some(667229));
        assert_eq!(pax_size(b"11 path=ab\n").unwrap(), None);
        assert!(pax_size(b"99 size=1\n").is_err());
        assert!(pax_size(b"x size=1\n").is_err());
        assert!(pax_size(b"10 size=a\n").is_err());
    }

    #[test]
    fn numeric_fields() {
        assert_eq!(parse_numeric(b"00000001750\0"), Some(1000));
        assert_eq!(parse_numeric(b"     17 \0\0\0\0"), Some(15));
        assert_eq!(
            parse_numeric(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            Some(256)
        );
        assert_eq!(parse_numeric(b"12a\0"), None);
        assert_eq!(parse_numeric(b"\0\0\0"), None);
    }
}
