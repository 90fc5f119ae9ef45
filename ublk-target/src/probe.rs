//! Is ublk usable here? Checked before anything is created, so a machine
//! without `ublk_drv` gets one plain sentence and nothing left behind.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// The ublk control device the driver creates when it loads.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// `Ok` when the ublk driver's control device exists; otherwise a sentence
/// for a person saying what is missing and what to do.
/// `$OBD_UBLK_CONTROL` names another path to check (tests use it to act out
/// a machine without ublk on one that has it).
pub fn check() -> Result<(), String> {
    match std::env::var_os("OBD_UBLK_CONTROL").filter(|v| !v.is_empty()) {
        Some(path) => check_at(Path::new(&path)),
        None => check_at(Path::new(CONTROL_PATH)),
    }
}

fn check_at(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_char_device() => Ok(()),
        Ok(_) => Err(format!(
            "{} exists but is not a character device, so ublk cannot be used",
            path.display()
        )),
        Err(_) => Err(format!(
            "this kernel has no ublk driver loaded ({} is missing); load it with `modprobe ublk_drv` (Linux 6.0 or newer) and try again",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_control_device_names_the_module() {
        let err = check_at(Path::new("/nonexistent/ublk-control")).unwrap_err();
        assert!(err.contains("modprobe ublk_drv"), "{err}");
    }

    #[test]
    fn a_regular_file_is_not_the_control_device() {
        let f = std::env::temp_dir();
        let err = check_at(&f).unwrap_err();
        assert!(err.contains("not a character device"), "{err}");
    }
}
