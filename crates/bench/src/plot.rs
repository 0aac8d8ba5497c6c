//! The latency curve of the end-to-end phase: p50, p95 and p99 from publish to final
//! status against the offered load, drawn as a PNG beside `docs/BENCHMARKS.md`.
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::measure::percentile;

/// The file the plot is written to, beside the document.
pub const FILE_NAME: &str = "BENCHMARKS-latency.png";

/// Fonts looked for to label the plot (DejaVu Sans or Liberation Sans, as Debian,
/// Ubuntu and Fedora install them); the first that exists is used.
const FONTS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
];

/// Which percentile of a point a line of the plot draws.
type Percentile = fn(&LoadPoint) -> f64;

/// Latency percentiles at one offered load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadPoint {
    /// Orders per second offered.
    pub rate: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

impl LoadPoint {
    /// The point of `latencies` (microseconds, sorted) measured at `rate`.
    pub fn of(rate: f64, latencies: &[u64]) -> LoadPoint {
        let ms = |p: f64| percentile(latencies, p) as f64 / 1000.0;
        LoadPoint {
            rate,
            p50_ms: ms(50.0),
            p95_ms: ms(95.0),
            p99_ms: ms(99.0),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{:.0} orders/s: p50 {:.0} / p95 {:.0} / p99 {:.0} ms",
            self.rate, self.p50_ms, self.p95_ms, self.p99_ms
        )
    }
}

/// Draws `points` (sorted by rate) to `path`.
pub fn write_png(path: &Path, points: &[LoadPoint]) -> anyhow::Result<()> {
    register_font()?;
    let max_rate = points.iter().map(|p| p.rate).fold(1.0, f64::max) * 1.1;
    let max_ms = points.iter().map(|p| p.p99_ms).fold(1.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "orderflow: publish → final status latency against offered load",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_rate, 0.0..max_ms)?;
    chart
        .configure_mesh()
        .x_desc("offered load (orders/s)")
        .y_desc("latency (ms)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    let series: [(&str, RGBColor, Percentile); 3] = [
        ("p50", BLUE, |p| p.p50_ms),
        ("p95", RGBColor(230, 140, 0), |p| p.p95_ms),
        ("p99", RED, |p| p.p99_ms),
    ];
    for (name, color, value) in series {
        let line: Vec<(f64, f64)> = points.iter().map(|p| (p.rate, value(p))).collect();
        chart
            .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            line.into_iter()
                .map(|xy| Circle::new(xy, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Gives the pure-Rust text renderer its font, once per process.
fn register_font() -> anyhow::Result<()> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let (path, bytes) = FONTS
                .iter()
                .find_map(|path| std::fs::read(path).ok().map(|bytes| (path, bytes)))
                .ok_or_else(|| format!("no font to label the plot; looked for {FONTS:?}"))?;
            // The renderer keeps the font for the rest of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a font the plot can use"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_point_takes_the_percentiles_in_milliseconds() {
        let latencies: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        let point = LoadPoint::of(50.0, &latencies);
        assert_eq!(point.rate, 50.0);
        assert!(point.p50_ms <= point.p95_ms && point.p95_ms <= point.p99_ms);
        assert!((49.0..=51.0).contains(&point.p50_ms), "{point:?}");
        assert!(point.describe().starts_with("50 orders/s: p50 "));
    }
}
