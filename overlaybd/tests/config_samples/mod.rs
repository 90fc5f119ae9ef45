//! Sample configs shared by the config tests and the fuzz seed corpus
//! (`fuzz/examples/seed.rs` includes this file).

/// The shape the containerd snapshotter writes for a writable container.
pub const SNAPSHOTTER_CONFIG: &str = r#"{
  "repoBlobUrl": "https://registry.example.com/v2/library/redis/blobs",
  "lowers": [
    {
      "digest": "sha256:1111111111111111111111111111111111111111111111111111111111111111",
      "size": 4737695,
      "dir": "/var/lib/overlaybd/snapshots/11/block"
    },
    { "file": "/opt/overlaybd/baselayers/ext4_64" }
  ],
  "upper": {
    "index": "/var/lib/overlaybd/snapshots/12/block/writable_index",
    "data": "/var/lib/overlaybd/snapshots/12/block/writable_data"
  },
  "resultFile": "/var/lib/overlaybd/snapshots/12/block/init-debug.log",
  "recordTracePath": "/var/lib/trace/redis.trace",
  "accelerationLayer": true
}"#;
