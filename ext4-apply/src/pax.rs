//! POSIX.1-2001 (pax) extended header records: `LEN KEY=VALUE\n`, where
//! LEN counts the whole record in decimal. Parsed by length, so values may
//! hold any bytes (binary xattr values often hold newlines, which the tar
//! crate's own reader splits on).

/// One record: key and value, borrowed from the header's data.
pub type Record<'a> = (&'a [u8], &'a [u8]);

/// The records of a pax header's data, in order; `Err` names the first
/// malformed one.
pub fn records(data: &[u8]) -> Result<Vec<Record<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or_else(|| format!("pax record {} has no length", out.len() + 1))?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| format!("pax record {} has a bad length", out.len() + 1))?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(format!(
                "pax record {} claims {len} bytes, which do not end a record",
                out.len() + 1
            ));
        }
        let body = &rest[space + 1..len - 1];
        let equals = body
            .iter()
            .position(|&b| b == b'=')
            .filter(|&i| i > 0)
            .ok_or_else(|| format!("pax record {} has no KEY=", out.len() + 1))?;
        out.push((&body[..equals], &body[equals + 1..]));
        rest = &rest[len..];
    }
    Ok(out)
}

/// One record as a pax header holds it (the length counts its own digits).
pub fn encode(key: &[u8], value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut out = format!("{len} ").into_bytes();
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::{encode, records};

    #[test]
    fn binary_values_and_errors() {
        let value = b"a\nb=c\n";
        // "NN SCHILY.xattr.user.x=" + value + "\n"
        let body_len = " SCHILY.xattr.user.x=".len() + value.len() + 1;
        let total = body_len + 2; // two digits
        let mut data = format!("{total} SCHILY.xattr.user.x=").into_bytes();
        data.extend_from_slice(value);
        data.push(b'\n');
        data.extend_from_slice(b"11 path=ab\n");
        let parsed = records(&data).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0, b"SCHILY.xattr.user.x");
        assert_eq!(parsed[0].1, value);
        assert_eq!(parsed[1], (&b"path"[..], &b"ab"[..]));
        assert!(records(b"").unwrap().is_empty());
        assert!(records(b"99 path=ab\n").is_err());
        assert!(records(b"12 path=ab\n").is_err());
        assert!(records(b"x path=ab\n").is_err());
        assert!(records(b"8 =abcd\n").is_err());
        assert!(records(b"1 \n").is_err());
        for n in [0, 1, 5, 6, 7, 90, 94, 95, 996, 1000] {
            let value = vec![b'v'; n];
            let one = encode(b"k", &value);
            assert_eq!(records(&one).unwrap(), vec![(&b"k"[..], value.as_slice())]);
        }
    }
}
