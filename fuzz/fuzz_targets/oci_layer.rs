//! An OCI layer tar applied to a small ext4 (`obd apply`'s path): the pax
//! record parser alone, then the whole apply, on a memory disk that starts
//! from one freshly made file system for every input.
#![no_main]

use std::sync::{Arc, OnceLock};

use ext4_apply::{fs::MIN_FS_SIZE, pax, Ext4, MemoryDevice};
use libfuzzer_sys::fuzz_target;

/// A freshly made file system, made once.
fn base() -> Arc<Vec<u8>> {
    static BASE: OnceLock<Arc<Vec<u8>>> = OnceLock::new();
    BASE.get_or_init(|| {
        let disk = Arc::new(MemoryDevice::zeros(MIN_FS_SIZE));
        Ext4::mkfs(disk.clone(), MIN_FS_SIZE)
            .expect("mkfs")
            .close()
            .expect("close");
        Arc::new(disk.image())
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    // Parsed records re-encode to exactly the input (lengths written
    // with leading zeros parse too, and re-encode shorter).
    if let Ok(records) = pax::records(data) {
        let again: Vec<u8> = records
            .iter()
            .flat_map(|(key, value)| pax::encode(key, value))
            .collect();
        if !data.starts_with(b"0") && !data.windows(2).any(|w| w == b"\n0") {
            assert_eq!(again, data);
        }
    }
    let mut fs = Ext4::open(Arc::new(MemoryDevice::over(base()))).expect("open the base");
    if ext4_apply::apply(&mut fs, data).is_ok() {
        fs.close().expect("a layer that applied must close cleanly");
    }
});
