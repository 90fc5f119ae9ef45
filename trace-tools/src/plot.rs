//! `obd trace plot`: where on the device (or in which layer) reads went,
//! over time — sequential runs show as lines, random reads as scatter.
//!
//! Drawn with plotters' bitmap (PNG) or SVG backend, picked by the output's
//! extension. Text uses a TrueType font read at run time (DejaVu Sans from
//! fonts-dejavu-core, or `$OBD_PLOT_FONT`) through ab_glyph, so no system
//! font library is linked; without a font the plot is drawn without labels.

use std::path::Path;

use overlaybd::trace::TraceRecord;
use overlaybd::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::events::EventFile;
use crate::Warn;

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Register a font for plotters once; false when none is usable.
fn load_font() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        let env = std::env::var("OBD_PLOT_FONT").ok();
        let paths = env
            .iter()
            .map(String::as_str)
            .chain(FONT_CANDIDATES.iter().copied());
        for path in paths {
            if let Ok(bytes) = std::fs::read(path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// One series: a name, a colour and (x, y, height) marks.
struct Series {
    name: String,
    color: RGBColor,
    marks: Vec<(f64, f64, f64)>,
}

struct Figure {
    title: String,
    x_label: String,
    y_label: String,
    series: Vec<Series>,
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

const MIB: f64 = 1024.0 * 1024.0;

fn events_figure(events: &EventFile) -> Result<Figure> {
    let mut reads = Vec::new();
    let mut writes = Vec::new();
    for b in events.blocks() {
        let mark = (
            b.t as f64 / 1e9,
            b.offset as f64 / MIB,
            b.length as f64 / MIB,
        );
        if b.is_read() {
            reads.push(mark);
        } else if b.rwbs.contains('W') {
            writes.push(mark);
        }
    }
    if reads.is_empty() && writes.is_empty() {
        return Err(Error::Invalid(
            "the event file has no block reads or writes to plot".into(),
        ));
    }
    Ok(Figure {
        title: format!("block I/O on {}", events.header.device),
        x_label: "time (s)".into(),
        y_label: "device offset (MiB)".into(),
        series: vec![
            Series {
                name: "read".into(),
                color: PALETTE[0],
                marks: reads,
            },
            Series {
                name: "write".into(),
                color: PALETTE[1],
                marks: writes,
            },
        ],
    })
}

fn records_figure(records: &[TraceRecord]) -> Result<Figure> {
    if records.is_empty() {
        return Err(Error::Invalid("the trace has no records to plot".into()));
    }
    let mut layers: std::collections::BTreeMap<u32, Vec<(f64, f64, f64)>> = Default::default();
    for (i, r) in records.iter().enumerate() {
        layers.entry(r.layer_index).or_default().push((
            i as f64,
            r.offset as f64 / MIB,
            r.count as f64 / MIB,
        ));
    }
    Ok(Figure {
        title: "layer trace (prefetch order)".into(),
        x_label: "record (access order)".into(),
        y_label: "offset in layer file (MiB)".into(),
        series: layers
            .into_iter()
            .enumerate()
            .map(|(i, (layer, marks))| Series {
                name: format!("layer {layer}"),
                color: PALETTE[i % PALETTE.len()],
                marks,
            })
            .collect(),
    })
}

/// Draw the event file or layer trace in `bytes` to `out` (`.png` or
/// `.svg`), `width` × `height` pixels.
pub fn plot(
    bytes: &[u8],
    name: &str,
    out: &Path,
    (width, height): (u32, u32),
    warn: &Warn,
) -> Result<()> {
    let figure = if EventFile::sniff(bytes) {
        events_figure(&EventFile::parse(bytes, name)?)?
    } else {
        match overlaybd::trace::TraceFile::detect(bytes, name)? {
            overlaybd::trace::TraceFile::Binary(records) => records_figure(&records)?,
            _ => {
                return Err(Error::Invalid(format!(
                    "{name}: only event files and binary layer traces can be plotted"
                )))
            }
        }
    };
    let labels = load_font();
    if !labels {
        warn("no TrueType font found (install fonts-dejavu-core or set OBD_PLOT_FONT); plotting without labels");
    }
    let ext = out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let drawn = match ext.as_deref() {
        Some("svg") => {
            let root = SVGBackend::new(out, (width, height)).into_drawing_area();
            draw(&root, &figure, labels)
        }
        Some("png") => {
            let root = BitMapBackend::new(out, (width, height)).into_drawing_area();
            draw(&root, &figure, labels)
        }
        _ => {
            return Err(Error::Invalid(format!(
                "{}: the output must end in .png or .svg",
                out.display()
            )))
        }
    };
    drawn.map_err(|e| Error::io(out.display().to_string(), std::io::Error::other(e)))
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    figure: &Figure,
    labels: bool,
) -> std::result::Result<(), String>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let marks = figure.series.iter().flat_map(|s| s.marks.iter());
    let x_min = marks.clone().map(|m| m.0).fold(f64::INFINITY, f64::min);
    let x_max = marks.clone().map(|m| m.0).fold(0.0, f64::max);
    let y_max = marks.map(|m| m.1 + m.2).fold(0.0, f64::max).max(1e-3);
    // Start where the activity starts; pad a little on both sides.
    let pad = ((x_max - x_min) * 0.02).max(1e-3);
    let x_range = (x_min - pad).max(0.0)..x_max + pad;
    let mut builder = ChartBuilder::on(root);
    builder.margin(12);
    if labels {
        builder
            .caption(&figure.title, ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(70);
    }
    let mut chart = builder
        .build_cartesian_2d(x_range, 0.0..y_max * 1.02)
        .map_err(err)?;
    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(235, 235, 235));
    if labels {
        mesh.x_desc(&figure.x_label)
            .y_desc(&figure.y_label)
            .label_style(("sans-serif", 14));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(err)?;
    for series in &figure.series {
        if series.marks.is_empty() {
            continue;
        }
        let color = series.color;
        // Each access is a vertical bar covering its bytes (at least a dot).
        let drawn = chart
            .draw_series(series.marks.iter().map(move |&(x, y, h)| {
                PathElement::new(vec![(x, y), (x, y + h)], color.stroke_width(2))
            }))
            .map_err(err)?;
        if labels {
            drawn.label(&series.name).legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
            });
        }
        chart
            .draw_series(
                series
                    .marks
                    .iter()
                    .map(move |&(x, y, _)| Circle::new((x, y), 1, color.filled())),
            )
            .map_err(err)?;
    }
    if labels {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
