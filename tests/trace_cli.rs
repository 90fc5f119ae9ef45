//! `obd trace convert/show/plot` on the reference convertor's two-layer
//! ext4 image, with event files made here (no kernel needed).

#[path = "../overlaybd/tests/common/mod.rs"]
mod common;

mod obd_cli;
use obd_cli::{obd_err, obd_stdout, s};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::fixtures;
use overlaybd::image::{open_stack, LayerSpec};
use overlaybd::stack::{PieceSource, Stack};
use trace_tools::events::{BlockEvent, Event, EventWriter, Header, PageEvent, VERSION};
use trace_tools::ext4::Ext4;
use trace_tools::StackSource;

/// The reference convertor's two-layer ext4 image.
fn image_layers() -> [PathBuf; 2] {
    let dir = fixtures().join("real-dev-image");
    [dir.join("dev-layer0.blob"), dir.join("dev-layer1.blob")]
}

fn stack() -> Arc<Stack> {
    let specs: Vec<LayerSpec> = image_layers().into_iter().map(LayerSpec::File).collect();
    Arc::new(open_stack(&specs, false).unwrap())
}

/// `obd trace convert LAYER0 LAYER1 -i EVENTS -o OUTPUT`: the arguments.
fn convert_args<'a>(layers: &'a [PathBuf; 2], events: &'a Path, output: &'a Path) -> Vec<&'a str> {
    let [l0, l1] = layers;
    vec![
        "trace",
        "convert",
        s(l0),
        s(l1),
        "-i",
        s(events),
        "-o",
        s(output),
    ]
}

/// Events as if a process had read `files` (in order) from the image on a
/// device: the block reads of their data, and their page-cache fills.
fn write_events(stack: &Arc<Stack>, files: &[&str], path: &Path) {
    let fs = Ext4::open(Arc::new(StackSource::new(Arc::clone(stack), "img"))).unwrap();
    let header = Header {
        obd_events: VERSION,
        device: "/dev/ublkb0".into(),
        major: 259,
        minor: 0,
        size: stack.virtual_size(),
        page_size: 4096,
        start_unix_ns: 0,
        disk_offset: 0,
    };
    let mut w = EventWriter::create(path, &header).unwrap();
    let mut t = 1_000_000;
    for file in files {
        let inode = fs.lookup(Path::new(file)).unwrap();
        for (offset, length) in fs.data_ranges(&inode).unwrap() {
            t += 1000;
            w.write(&Event::Block(BlockEvent {
                t,
                pid: 100,
                comm: "app".into(),
                offset,
                length,
                rwbs: "RA".into(),
            }))
            .unwrap();
            // The same range again (a re-read) adds nothing to the trace.
            w.write(&Event::Block(BlockEvent {
                t: t + 1,
                pid: 100,
                comm: "app".into(),
                offset,
                length,
                rwbs: "R".into(),
            }))
            .unwrap();
        }
        for index in 0..inode.size.div_ceil(4096) {
            w.write(&Event::Page(PageEvent {
                t,
                pid: 100,
                comm: "app".into(),
                ino: u64::from(inode.ino),
                index,
                pages: 1,
            }))
            .unwrap();
        }
    }
    w.write(&Event::Block(BlockEvent {
        t: t + 5000,
        pid: 7,
        comm: "jbd2/ublkb0-8".into(),
        offset: 0,
        length: 4096,
        rwbs: "WS".into(),
    }))
    .unwrap();
    w.finish().unwrap();
}

#[test]
fn convert_maps_device_reads_to_layer_records_and_files() {
    let stack = stack();
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("app.events");
    let files = ["/data/blob.bin", "/etc/os-release", "/docs/doc010.txt"];
    write_events(&stack, &files, &events);
    let trace = dir.path().join("app.trace");
    let list = dir.path().join("app.list");
    let layers = image_layers();
    let mut args = convert_args(&layers, &events, &trace);
    args.extend(["--list", s(&list)]);
    let said = obd_stdout(&args);
    assert!(said.contains("3 files"), "{said}");
    assert_eq!(
        std::fs::read_to_string(&list).unwrap(),
        files.join("\n") + "\n"
    );

    // The records are exactly the plan of the file data, in read order.
    let fs = Ext4::open(Arc::new(StackSource::new(Arc::clone(&stack), "img"))).unwrap();
    let mut want = trace_tools::convert::TraceBuilder::new();
    let mut plan = Vec::new();
    for file in files {
        for (offset, length) in fs
            .data_ranges(&fs.lookup(Path::new(file)).unwrap())
            .unwrap()
        {
            plan.clear();
            stack.plan(offset, length, &mut plan).unwrap();
            for piece in &plan {
                if let PieceSource::Layer { layer, position } = piece.source {
                    want.add(layer as u32, position, piece.length);
                }
            }
        }
    }
    let records = overlaybd::trace::decode(&std::fs::read(&trace).unwrap(), "t").unwrap();
    assert_eq!(records, want.finish());
    assert!(
        records.iter().any(|r| r.layer_index == 1),
        "blob.bin is in layer 1"
    );
    assert!(
        records.iter().any(|r| r.layer_index == 0),
        "docs are in layer 0"
    );
    let total: u64 = records.iter().map(|r| r.count).sum();
    assert!(total >= 2 << 20, "{total}");

    // show: every kind.
    let shown = obd_stdout(&["trace", "show", s(&events)]);
    assert!(shown.contains("per process"), "{shown}");
    assert!(shown.contains("app"), "{shown}");
    assert!(shown.contains("1 writes"), "{shown}");
    let shown = obd_stdout(&["trace", "show", s(&trace)]);
    assert!(
        shown.starts_with(&format!("layer trace: {} records", records.len())),
        "{shown}"
    );
    let shown = obd_stdout(&["trace", "show", s(&list)]);
    assert!(shown.starts_with("text list: 3 paths"), "{shown}");

    // The config form gives the same trace.
    let config = dir.path().join("config.v1.json");
    std::fs::write(
        &config,
        serde_json::json!({"lowers": [{"file": layers[0]}, {"file": layers[1]}]}).to_string(),
    )
    .unwrap();
    let again = dir.path().join("again.trace");
    obd_stdout(&[
        "trace",
        "convert",
        "--config",
        s(&config),
        "-i",
        s(&events),
        "-o",
        s(&again),
    ]);
    assert_eq!(
        std::fs::read(&again).unwrap(),
        std::fs::read(&trace).unwrap()
    );
    // Outputs are never overwritten.
    let err = obd_err(&convert_args(&layers, &events, &trace));
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn page_events_alone_are_mapped_through_file_extents() {
    let stack = stack();
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.events");
    write_events(&stack, &["/data/blob.bin"], &full);
    // Keep only the header and the page events.
    let text = std::fs::read_to_string(&full).unwrap();
    let pages: String = text
        .lines()
        .enumerate()
        .filter(|(i, l)| *i == 0 || l.contains("\"page\""))
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let only_pages = dir.path().join("pages.events");
    std::fs::write(&only_pages, pages).unwrap();
    let layers = image_layers();
    let (a, b) = (dir.path().join("a.trace"), dir.path().join("b.trace"));
    obd_stdout(&convert_args(&layers, &full, &a));
    obd_stdout(&convert_args(&layers, &only_pages, &b));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn plot_draws_png_and_svg_of_events_and_traces() {
    let stack = stack();
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("app.events");
    write_events(
        &stack,
        &["/data/blob.bin", "/docs/doc001.txt", "/etc/hello.sh"],
        &events,
    );
    let trace = dir.path().join("app.trace");
    obd_stdout(&convert_args(&image_layers(), &events, &trace));
    for (input, name) in [(&events, "events"), (&trace, "trace")] {
        let png = dir.path().join(format!("{name}.png"));
        let svg = dir.path().join(format!("{name}.svg"));
        obd_stdout(&["trace", "plot", s(input), "-o", s(&png)]);
        obd_stdout(&[
            "trace",
            "plot",
            s(input),
            "-o",
            s(&svg),
            "--width",
            "800",
            "--height",
            "500",
        ]);
        let png_bytes = std::fs::read(&png).unwrap();
        assert!(png_bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(png_bytes.len() > 5000);
        let svg_text = std::fs::read_to_string(&svg).unwrap();
        assert!(
            svg_text.contains("<svg") && svg_text.contains("offset"),
            "{name}"
        );
    }
    let err = obd_err(&[
        "trace",
        "plot",
        s(&events),
        "-o",
        s(&dir.path().join("x.gif")),
    ]);
    assert!(err.contains(".png or .svg"), "{err}");
    assert!(!dir.path().join("x.gif").exists());
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with(".obd-partial")));
}

#[test]
fn damaged_inputs_are_clear_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("cut.trace");
    let good = overlaybd::trace::encode(&[overlaybd::trace::TraceRecord {
        op: overlaybd::trace::Op::Read,
        layer_index: 0,
        count: 4096,
        offset: 0,
    }]);
    std::fs::write(&trace, &good[..40]).unwrap();
    let err = obd_err(&["trace", "show", s(&trace)]);
    assert!(
        err.contains(&format!("{}: bad trace file: truncated", s(&trace))),
        "{err}"
    );
    let events = dir.path().join("bad.events");
    std::fs::write(&events, "{\"obd_events\":1,\"device\":\"d\",\"major\":1,\"minor\":2,\"size\":512,\"page_size\":4096,\"start_unix_ns\":0}\n{\"type\":\"block\",\"t\":\n").unwrap();
    for args in [
        vec!["trace", "show", s(&events)],
        vec!["trace", "plot", s(&events), "-o", "/tmp/obd-never.png"],
    ] {
        let err = obd_err(&args);
        assert!(
            err.contains(&format!("{}: bad event file: line 2", s(&events))),
            "{err}"
        );
    }
    let [l0, _] = image_layers();
    let err = obd_err(&[
        "trace",
        "convert",
        s(&l0),
        "-i",
        s(&events),
        "-o",
        s(&dir.path().join("o.trace")),
    ]);
    assert!(err.contains("bad event file: line 2"), "{err}");
    assert!(!dir.path().join("o.trace").exists());
}
