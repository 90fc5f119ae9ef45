//! `obd info`: what a layer file holds.

use std::sync::Arc;

use anyhow::Result;
use overlaybd::detect::detect_layer_blob;
use overlaybd::image::{open_layer, LayerSpec, OpenedLayer};
use overlaybd::index::{IntervalMap, SECTOR};
use overlaybd::io::LocalFile;
use overlaybd::lsmt::Header;
use serde_json::{json, Value};

/// Show a layer's wrapping (tar, ZFile), LSMT header and trailer, and index
/// statistics.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  obd info layer.zfile\n  obd info upper.data:upper.index --json"
)]
pub struct Args {
    /// A layer file, or DATA:INDEX for a writable layer.
    layer: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let spec = LayerSpec::parse(&args.layer);
    let mut info = serde_json::Map::new();
    info.insert("path".into(), json!(args.layer));
    if let LayerSpec::File(path) = &spec {
        let (_, kind) = detect_layer_blob(Arc::new(LocalFile::open(path)?))?;
        info.insert("wrapping".into(), json!(kind.to_string()));
    }
    match open_layer(&spec, false)? {
        OpenedLayer::ReadOnly(layer) => {
            info.insert("kind".into(), json!("read-only"));
            info.insert("header".into(), header_json(&layer.header));
            info.insert("trailer".into(), header_json(&layer.trailer));
            let map = overlaybd::lsmt::entries_to_map(&layer.entries, 0);
            info.insert("index".into(), index_json(&map, layer.entries.len()));
        }
        OpenedLayer::Writable(layer) => {
            let kind = if layer.is_sparse() {
                "writable (sparse)"
            } else {
                "writable"
            };
            info.insert("kind".into(), json!(kind));
            info.insert("header".into(), header_json(&layer.header));
            let map = layer.snapshot();
            info.insert("index".into(), index_json(&map, map.len()));
        }
    }
    let info = Value::Object(info);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print_text(&info, 0);
    }
    Ok(())
}

fn header_json(h: &Header) -> Value {
    json!({
        "flags": format!("{:#x}", h.flags),
        "uuid": h.uuid,
        "parent_uuid": h.parent_uuid,
        "virtual_size": h.virtual_size,
        "index_offset": h.index_offset,
        "index_size": h.index_size,
        "version": format!("{}.{}", h.version, h.sub_version),
        "message": h.user_tag,
    })
}

fn index_json(map: &IntervalMap, entries: usize) -> Value {
    let (mut mapped, mut zeroed, mut zeroed_extents) = (0u64, 0u64, 0usize);
    for (_, e) in map.iter() {
        if e.zeroed {
            zeroed += e.length * SECTOR;
            zeroed_extents += 1;
        } else {
            mapped += e.length * SECTOR;
        }
    }
    json!({
        "entries": entries,
        "extents": map.len(),
        "zeroed_extents": zeroed_extents,
        "mapped_bytes": mapped,
        "zeroed_bytes": zeroed,
    })
}

/// Keys in the order a person reads them; the rest follow alphabetically.
const TEXT_ORDER: [&str; 14] = [
    "path",
    "wrapping",
    "kind",
    "header",
    "trailer",
    "index",
    "uuid",
    "parent_uuid",
    "message",
    "virtual_size",
    "flags",
    "version",
    "index_offset",
    "index_size",
];

fn print_text(value: &Value, depth: usize) {
    let Value::Object(map) = value else { return };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by_key(|k| {
        (
            TEXT_ORDER.iter().position(|o| o == k).unwrap_or(usize::MAX),
            *k,
        )
    });
    for key in keys {
        let v = &map[key];
        let pad = "  ".repeat(depth);
        match v {
            Value::Object(_) => {
                println!("{pad}{key}:");
                print_text(v, depth + 1);
            }
            Value::String(s) => println!("{pad}{key}: {s}"),
            other => println!("{pad}{key}: {other}"),
        }
    }
}
