//! JSON configs and credentials: parse, and for the typed configs check
//! that serializing what was parsed parses back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlaybd::config::{DownloadConfig, GlobalConfig, ImageConfig};
use overlaybd::credentials::{base64_decode, candidate_keys, Credentials};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = ImageConfig::from_json(&text, "fuzz.json") {
        let json = serde_json::to_string(&c).expect("serialize image config");
        let again = ImageConfig::from_json(&json, "again").expect("re-parse image config");
        assert_eq!(again, c, "{json}");
        let _ = c.blob_url("sha256:0000");
        let _ = c.effective_download(&DownloadConfig::default());
        for lower in &c.lowers {
            let _ = lower.local_candidates();
        }
    }
    if let Ok(c) = GlobalConfig::from_json(&text, "fuzz.json") {
        let json = serde_json::to_string(&c).expect("serialize global config");
        let again = GlobalConfig::from_json(&json, "again").expect("re-parse global config");
        assert_eq!(again, c, "{json}");
    }
    if let Ok(c) = Credentials::from_json(&text, "fuzz.json") {
        for key in c.keys() {
            let _ = c.lookup(&format!("https://{key}/v2/a/b/blobs/sha256:0"));
        }
        let _ = c.lookup(&text);
    }
    let _ = Credentials::from_http_response(&text, "fuzz.json");
    let _ = candidate_keys(&text);
    if let Some(bytes) = base64_decode(&text) {
        assert!(bytes.len() <= text.len());
    }
});
