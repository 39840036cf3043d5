//! The PNG chart: p99 latency (log scale) against offered rate (log scale), one line per
//! system, every step of its search, with the 10 ms objective.
//!
//! plotters draws text with ab_glyph (pure Rust): no fontconfig or freetype. It needs a
//! font file, taken from the usual system paths (DejaVu, Liberation, Noto); without one
//! the chart is drawn without any text, and the Markdown report names the colours.

use crate::report::Report;
use plotters::prelude::*;
use std::path::Path;

/// Colours of the series, in system order; also named in the Markdown.
pub const PALETTE: [(u8, u8, u8, &str); 10] = [
    (0, 0, 0, "black"),
    (230, 159, 0, "orange"),
    (86, 180, 233, "sky blue"),
    (0, 158, 115, "green"),
    (213, 94, 0, "vermilion"),
    (0, 114, 178, "blue"),
    (204, 121, 167, "pink"),
    (120, 120, 120, "grey"),
    (240, 228, 66, "yellow"),
    (128, 0, 128, "purple"),
];

const FONT_PATHS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers the first font found as "sans-serif" (once per process); whether text can
/// be drawn. plotters is built with `ab_glyph` for this chart, and cargo unifies features,
/// so criterion's own plots need it too: the benches call it and turn their plots off
/// when it says no.
pub fn register_font() -> bool {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REGISTERED.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Draws the chart to `path`; returns whether it has text (a font was found).
pub fn draw(report: &Report, path: &Path) -> anyhow::Result<bool> {
    let text = register_font();
    let series: Vec<(String, Vec<(f64, f64)>)> =
        report
            .systems
            .iter()
            .filter(|s| !s.steps.is_empty())
            .map(|s| {
                // The search steps, and the half-rate step unless a search step ran at that rate.
                // A re-run comes after its first run: the later one is kept (reverse,
                // stable sort, dedup keeps the first of equal rates).
                let mut pts: Vec<(f64, f64)> =
                    s.steps
                        .iter()
                        .rev()
                        .chain(s.half.iter().filter(|h| {
                            s.steps.iter().all(|st| st.offered_per_s != h.offered_per_s)
                        }))
                        .map(|st| (st.offered_per_s as f64, st.p99_ms.clamp(0.01, 100_000.0)))
                        .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                pts.dedup_by(|a, b| a.0 == b.0);
                (s.name.clone(), pts)
            })
            .collect();
    let x_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .fold(1000.0f64, f64::max)
        * 1.5;
    let x_min = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.0))
        .fold(x_max, f64::min)
        .max(1.0)
        / 1.5;
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold(100.0f64, f64::max)
        * 2.0;
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption(
                "flashsale: p99 latency (from intended send time) vs offered rate",
                ("sans-serif", 24),
            )
            .x_label_area_size(50)
            .y_label_area_size(70);
    }
    let mut chart = builder
        .build_cartesian_2d((x_min..x_max).log_scale(), (0.05f64..y_max).log_scale())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("offered rate, requests/s (log)")
            .y_desc("p99 latency, ms (log)")
            .x_labels(12)
            .y_labels(12)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| {
                if *v >= 1.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            })
            .label_style(("sans-serif", 14));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| anyhow::anyhow!("{e}"))?;
    // The objective.
    chart
        .draw_series(LineSeries::new(
            [(x_min, 10.0), (x_max, 10.0)],
            RED.stroke_width(1),
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let (r, g, b, _) = PALETTE[i % PALETTE.len()];
        let color = RGBColor(r, g, b);
        let line = chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if text {
            line.label(name.as_str()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(text)
}
