//! `--plot FILE.svg`: the predicted hit ratio against cache size, in objects and in bytes (log axes), one line per
//! key pattern plus the shared cache, each byte point with a bar of its uncertainty (about a 95% interval), and the
//! measured hit ratio as a point where the cache's size is known.
//! Drawn with plotters' SVG backend (no system fonts needed).

use std::path::Path;

use cache_rollout::analysis::{CurveSamples, SizeHit};
use cache_rollout::{Error, Result};
use plotters::prelude::*;

/// The legend name of the curve of every pattern in one cache.
pub(crate) const SHARED: &str = "(shared cache)";

/// A curve to draw: its legend name and its points.
pub(crate) type Series<'a> = (&'a str, &'a CurveSamples);

/// Which of a curve's two series a panel draws.
type PointsOf = fn(&CurveSamples) -> &[SizeHit];

/// The measured point a panel shows: size and hit ratio.
type MeasuredAt = Option<(u64, f64)>;

/// A measured hit ratio at a known cache size.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Measured {
    /// A cache of this many objects (`--impl memory`).
    Objects(u64, f64),
    /// A cache of this many bytes (`--impl redis` with `maxmemory`).
    Bytes(u64, f64),
}

/// Draws `series` into the SVG file at `path`.
///
/// # Errors
/// [`Error::Io`] naming the path when the file cannot be written or the drawing fails.
pub(crate) fn draw(
    path: &Path,
    title: &str,
    series: &[Series<'_>],
    measured: Option<Measured>,
) -> Result<()> {
    let fail = |e: String| Error::Io {
        context: format!("drawing {}", path.display()),
        source: std::io::Error::other(e),
    };
    if series.is_empty() {
        return Err(fail(
            "no curve to draw: no key pattern had an estimator".into(),
        ));
    }
    // Fail on an unwritable path with the OS's reason, before plotters (whose error says less).
    std::fs::write(path, b"").map_err(|source| Error::Io {
        context: format!("writing {}", path.display()),
        source,
    })?;
    let drawn = draw_svg(path, title, series, measured, &fail);
    if drawn.is_err() {
        // No half-drawn file left behind.
        let _ = std::fs::remove_file(path);
    }
    drawn
}

fn draw_svg(
    path: &Path,
    title: &str,
    series: &[Series<'_>],
    measured: Option<Measured>,
    fail: &dyn Fn(String) -> Error,
) -> Result<()> {
    let root = SVGBackend::new(path, (1280, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| fail(e.to_string()))?;
    let (left, right) = root.split_horizontally(640);
    let panels: [(_, &str, PointsOf, MeasuredAt); 2] = [
        (
            &left,
            "cache size (objects)",
            |c| &c.objects,
            match measured {
                Some(Measured::Objects(n, h)) => Some((n, h)),
                _ => None,
            },
        ),
        (
            &right,
            "cache size (bytes: keys, values, per-key overhead)",
            |c| &c.bytes,
            match measured {
                Some(Measured::Bytes(n, h)) => Some((n, h)),
                _ => None,
            },
        ),
    ];
    for (area, x_desc, points_of, point) in panels {
        let max_x = series
            .iter()
            .flat_map(|(_, c)| points_of(c).iter().map(|p| p.size))
            .chain(point.map(|(n, _)| n))
            .max()
            .unwrap_or(10)
            .max(10) as f64;
        let bytes_axis = x_desc.contains("bytes");
        let mut chart = ChartBuilder::on(area)
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d((1f64..max_x * 1.1).log_scale(), 0f64..1f64)
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("predicted hit ratio")
            .x_label_formatter(&|x| human(*x, bytes_axis))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        for (i, (name, curve)) in series.iter().enumerate() {
            let shared = *name == SHARED;
            let color = if shared {
                BLACK.to_rgba()
            } else {
                PALETTE[i % PALETTE.len()].to_rgba()
            };
            let style = color.stroke_width(if shared { 3 } else { 2 });
            chart
                .draw_series(LineSeries::new(
                    points_of(curve)
                        .iter()
                        .map(|p| (p.size.max(1) as f64, p.hit_ratio)),
                    style,
                ))
                .map_err(|e| fail(e.to_string()))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            // The uncertainty of each point (byte curves): a bar of ± its half-width.
            chart
                .draw_series(
                    points_of(curve)
                        .iter()
                        .filter(|p| p.uncertainty > 0.0)
                        .map(|p| {
                            let x = p.size.max(1) as f64;
                            PathElement::new(
                                vec![
                                    (x, (p.hit_ratio - p.uncertainty).max(0.0)),
                                    (x, (p.hit_ratio + p.uncertainty).min(1.0)),
                                ],
                                color.stroke_width(1),
                            )
                        }),
                )
                .map_err(|e| fail(e.to_string()))?;
        }
        if let Some((size, hit_ratio)) = point {
            chart
                .draw_series(std::iter::once(Circle::new(
                    (size.max(1) as f64, hit_ratio),
                    6,
                    RED.filled(),
                )))
                .map_err(|e| fail(e.to_string()))?
                .label(format!("measured: {hit_ratio:.3}"))
                .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
    }
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// Line colours: Okabe and Ito's palette for colour-blind readers (yellow left out, too pale on white); the
/// shared cache is black and thicker, and the legend names every line.
const PALETTE: [RGBColor; 6] = [
    RGBColor(0xE6, 0x9F, 0x00),
    RGBColor(0x56, 0xB4, 0xE9),
    RGBColor(0x00, 0x9E, 0x73),
    RGBColor(0x00, 0x72, 0xB2),
    RGBColor(0xD5, 0x5E, 0x00),
    RGBColor(0xCC, 0x79, 0xA7),
];

/// Axis labels in decimal units, as the log axis has its ticks at powers of ten: `1000` → `1k`, `1000000` bytes →
/// `1 MB`.
fn human(x: f64, bytes: bool) -> String {
    let units: &[&str] = if bytes {
        &["B", "kB", "MB", "GB", "TB"]
    } else {
        &["", "k", "M", "G", "T"]
    };
    let mut v = x;
    let mut u = 0;
    while v >= 999.5 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    let sep = if bytes { " " } else { "" };
    if v >= 10.0 || v.fract() < 0.05 {
        format!("{v:.0}{sep}{}", units[u])
    } else {
        format!("{v:.1}{sep}{}", units[u])
    }
}
