//! The "raw" CRC32C overlaybd uses everywhere (ZFile digests and block CRCs,
//! trace checksums): Castagnoli, reflected, with no initial or final
//! inversion. In terms of the standard (inverted) CRC32C:
//! `raw(seed, data) = !crc32c_append(!seed, data)`.

/// Seed of the per-block CRC in ZFile files.
pub const ZFILE_BLOCK_SEED: u32 = 100007;

/// Raw CRC32C of `data`, continuing from `seed`.
pub fn raw_crc32c(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_input_keeps_the_seed() {
        assert_eq!(raw_crc32c(0, b""), 0);
        assert_eq!(raw_crc32c(ZFILE_BLOCK_SEED, b""), ZFILE_BLOCK_SEED);
    }

    #[test]
    fn chaining_equals_one_pass() {
        let data = b"overlaybd raw crc32c chaining";
        let one = raw_crc32c(7, data);
        let two = raw_crc32c(raw_crc32c(7, &data[..10]), &data[10..]);
        assert_eq!(one, two);
    }

    #[test]
    fn differs_from_standard_crc32c() {
        // The standard CRC32C of "123456789" is 0xE3069283; the raw form is not.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_ne!(raw_crc32c(0, b"123456789"), 0xE306_9283);
    }
}
