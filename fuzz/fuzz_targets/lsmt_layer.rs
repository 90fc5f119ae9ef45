//! A committed or sealed LSMT layer file: open it, stack it, read from it.
//! Then a two-layer stack: the same file twice, the top copy's extents
//! shifted by a knob-chosen number of sectors, so the merged index has
//! overlaps to resolve. Every plan is checked against the layers' indexes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlaybd::lsmt::ReadOnlyLayer;
use overlaybd_fuzz::{exercise_layer, exercise_layers, source, Knobs};

fuzz_target!(|data: &[u8]| {
    let open = || ReadOnlyLayer::open(source(data, "fuzz.lsmt"));
    let Ok(layer) = open() else {
        return;
    };
    let span = layer.entries.last().map_or(0, |e| e.end());
    let mut knobs = Knobs::new(data);
    exercise_layer(layer, &mut knobs);

    let (Ok(bottom), Ok(mut top)) = (open(), open()) else {
        unreachable!("the same bytes opened once");
    };
    let shift = knobs.below(span + 1);
    for e in &mut top.entries {
        e.offset += shift;
    }
    exercise_layers(vec![bottom, top], &mut knobs);
});
