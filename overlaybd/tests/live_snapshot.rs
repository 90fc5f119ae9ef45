//! A live snapshot (what `obd snapshot` does to a served device): the
//! writable layer is frozen into the top lower and writes go on to a fresh
//! one, while writers keep going. Every write acknowledged before, during
//! and after it is read back from the live stack and from the image config
//! the snapshot leaves, on both kinds of writable layer.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::ReferenceVectors;
use overlaybd::config::{ImageConfig, Lower, UpperConfig};
use overlaybd::image::{open_config, open_read_only};
use overlaybd::live::{snapshot_stack, LiveStack, NewUpper};
use overlaybd::lsmt::{CreateOptions, WritableLayer};
use overlaybd::stack::Stack;

const BLOCK: usize = 4096;

/// Block `n`'s contents in write `generation`.
fn stamp(n: u64, generation: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK];
    for (i, word) in block.chunks_mut(16).enumerate() {
        word[..8].copy_from_slice(&n.to_le_bytes());
        word[8..].copy_from_slice(&(generation * 1000 + i as u64).to_le_bytes());
    }
    block
}

fn upper_paths(dir: &std::path::Path, name: &str, sparse: bool) -> (PathBuf, Option<PathBuf>) {
    let data = dir.join(format!("{name}.data"));
    let index = (!sparse).then(|| dir.join(format!("{name}.index")));
    (data, index)
}

#[test]
fn writes_survive_a_snapshot_taken_while_writers_run() {
    let v = ReferenceVectors::unpack();
    let lower_path = v.path("layer0.lsmt");
    for sparse in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let lower = open_read_only(&lower_path).unwrap();
        let size = lower.virtual_size();
        let blocks = (size / BLOCK as u64).min(2048);
        let (data, index) = upper_paths(dir.path(), "upper", sparse);
        let top = WritableLayer::create(
            &data,
            index.as_deref(),
            &CreateOptions {
                virtual_size: size,
                parent_uuid: None,
                sparse,
            },
        )
        .unwrap();
        let live = LiveStack::new(Arc::new(
            Stack::new(vec![lower], Some(Arc::new(top))).unwrap(),
        ));
        // What each block should read: the last acknowledged write.
        let expected: Mutex<Vec<Option<u64>>> = Mutex::new(vec![None; blocks as usize]);
        let generation = AtomicU64::new(1);
        let stop = AtomicBool::new(false);
        let (new_data, new_index) = upper_paths(dir.path(), "upper.1", sparse);
        std::thread::scope(|scope| {
            for writer in 0..3u64 {
                let (live, expected, generation, stop) = (&live, &expected, &generation, &stop);
                scope.spawn(move || {
                    let mut n = writer;
                    while !stop.load(Ordering::Relaxed) {
                        let Some(entry) = live.try_enter() else {
                            std::thread::sleep(Duration::from_micros(100));
                            continue;
                        };
                        let block = (n * 7919) % blocks;
                        let g = generation.fetch_add(1, Ordering::Relaxed);
                        // Blocks are owned by one writer each (block % 3),
                        // so the expectation is the last write of its owner.
                        if block % 3 == writer {
                            entry
                                .stack()
                                .write(&stamp(block, g), block * BLOCK as u64)
                                .unwrap();
                            expected.lock().unwrap()[block as usize] = Some(g);
                        }
                        drop(entry);
                        n += 3;
                    }
                });
            }
            std::thread::sleep(Duration::from_millis(100));
            live.replace(Duration::from_secs(10), |stack| {
                let upper = NewUpper {
                    data: &new_data,
                    index: new_index.as_deref(),
                };
                Ok((snapshot_stack(stack, &upper)?, ()))
            })
            .unwrap();
            std::thread::sleep(Duration::from_millis(100));
            stop.store(true, Ordering::Relaxed);
        });
        let expected = expected.into_inner().unwrap();
        assert!(expected.iter().filter(|e| e.is_some()).count() > 100);
        let stack = live.current();
        assert_eq!(stack.lowers().len(), 2, "the old upper is the top lower");
        stack.flush().unwrap();
        // The config a snapshot leaves: the frozen upper as a lower, the
        // new files as the upper.
        let config = ImageConfig {
            lowers: vec![
                Lower::File {
                    file: lower_path.clone(),
                },
                Lower::Frozen {
                    data: data.clone(),
                    index: index.clone(),
                },
            ],
            upper: Some(UpperConfig {
                index: new_index.clone(),
                data: new_data.clone(),
                target: None,
                vsize: None,
            }),
            ..serde_json::from_str::<ImageConfig>(r#"{"lowers":[{"file":"x"}]}"#).unwrap()
        };
        let text = serde_json::to_string(&config).unwrap();
        let reloaded = ImageConfig::from_json(&text, "snapshot config").unwrap();
        assert_eq!(reloaded, config);
        let reopened = open_config(&reloaded, false).unwrap();
        let before = open_read_only(&lower_path).unwrap();
        let lower_only = Stack::new(vec![before], None).unwrap();
        let mut got = vec![0u8; BLOCK];
        let mut again = vec![0u8; BLOCK];
        for (block, want) in expected.iter().enumerate() {
            let at = block as u64 * BLOCK as u64;
            stack.read(&mut got, at).unwrap();
            reopened.read(&mut again, at).unwrap();
            let want = match want {
                Some(g) => stamp(block as u64, *g),
                None => {
                    let mut base = vec![0u8; BLOCK];
                    lower_only.read(&mut base, at).unwrap();
                    base
                }
            };
            assert!(got == want, "sparse={sparse}: block {block} (live stack)");
            assert!(again == want, "sparse={sparse}: block {block} (reopened)");
        }
    }
}

#[test]
fn a_stack_without_a_writable_layer_has_nothing_to_snapshot() {
    let v = ReferenceVectors::unpack();
    let lower = open_read_only(&v.path("layer0.lsmt")).unwrap();
    let live = LiveStack::new(Arc::new(Stack::new(vec![lower], None).unwrap()));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("new.data");
    let err = live
        .replace(Duration::from_secs(1), |stack| {
            let upper = NewUpper {
                data: &data,
                index: None,
            };
            Ok((snapshot_stack(stack, &upper)?, ()))
        })
        .unwrap_err();
    assert!(err.to_string().contains("no writable layer"), "{err}");
    assert!(!data.exists(), "nothing is created");
    assert!(live.try_enter().is_some(), "requests go on");
}
