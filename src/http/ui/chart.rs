//! The page's curves: predicted hit ratio against memory in bytes (log axis), drawn by plotters' SVG backend into a
//! string that the page inlines.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::analysis::SizeHit;

/// One line of a chart.
pub(super) struct Line<'a> {
    /// The legend's name.
    pub(super) name: &'a str,
    /// The byte curve (sizes increasing).
    pub(super) points: &'a [SizeHit],
    /// Drawn thicker and black (the shared cache), else in the line colour.
    pub(super) emphasis: bool,
}

/// A point of the chart with its own label: a measured hit ratio, a recommended size.
pub(super) struct Mark {
    /// Bytes.
    pub(super) bytes: u64,
    /// Hit ratio (0–1).
    pub(super) hit_ratio: f64,
    /// Text beside it (the label says what it is: colour is not the only signal).
    pub(super) label: String,
    /// A filled circle (measured) or a hollow one (predicted, recommended).
    pub(super) filled: bool,
}

/// Chart size in pixels; the page scales it to its column.
const WIDTH: u32 = 560;
const HEIGHT: u32 = 260;

/// The chart as an SVG element with an accessible name (`title`), or `None` when there is nothing to draw or
/// plotters fails (the page then says "no curve yet").
pub(super) fn curve_svg(title: &str, lines: &[Line<'_>], marks: &[Mark]) -> Option<String> {
    let max_x = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.size))
        .chain(marks.iter().map(|m| m.bytes))
        .max()?
        .max(10) as f64;
    if lines.iter().all(|l| l.points.is_empty()) {
        return None;
    }
    // From a little below the smallest size drawn: a curve starts at a few hundred bytes, not at 1.
    let min_x = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.size))
        .chain(marks.iter().map(|m| m.bytes))
        .filter(|&s| s > 0)
        .min()
        .map_or(1.0, |s| (s as f64 / 1.5).max(1.0))
        .min(max_x / 10.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).ok()?;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(44)
            .build_cartesian_2d((min_x..max_x * 1.2).log_scale(), 0f64..1f64)
            .ok()?;
        chart
            .configure_mesh()
            .x_desc("memory (keys, values, overhead)")
            .y_desc("hit ratio")
            .x_labels(6)
            .y_labels(6)
            .x_label_formatter(&|x| bytes_label(*x))
            .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
            .light_line_style(WHITE)
            .draw()
            .ok()?;
        for (i, line) in lines.iter().enumerate() {
            let color = if line.emphasis {
                BLACK.to_rgba()
            } else {
                PALETTE[i % PALETTE.len()].to_rgba()
            };
            let style = color.stroke_width(if line.emphasis { 3 } else { 2 });
            chart
                .draw_series(LineSeries::new(
                    line.points
                        .iter()
                        .map(|p| (p.size.max(1) as f64, p.hit_ratio)),
                    style,
                ))
                .ok()?
                .label(line.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
            // About a 95% interval at each point: a bar of ± its half-width.
            chart
                .draw_series(line.points.iter().filter(|p| p.uncertainty > 0.0).map(|p| {
                    let x = p.size.max(1) as f64;
                    PathElement::new(
                        vec![
                            (x, (p.hit_ratio - p.uncertainty).max(0.0)),
                            (x, (p.hit_ratio + p.uncertainty).min(1.0)),
                        ],
                        color.stroke_width(1),
                    )
                }))
                .ok()?;
        }
        let (lo, hi) = (min_x.ln(), (max_x * 1.2).ln());
        for m in marks {
            let at = (m.bytes.max(1) as f64, m.hit_ratio.clamp(0.0, 1.0));
            // The label on the side with room: left of a point in the right third of the axis.
            let right_third = (at.0.ln() - lo) / (hi - lo).max(f64::EPSILON) > 0.66;
            let (anchor, label) = if right_third {
                (HPos::Right, format!("{}  ", m.label.trim()))
            } else {
                (HPos::Left, format!("  {}", m.label.trim()))
            };
            let style = if m.filled {
                RED.filled()
            } else {
                BLACK.stroke_width(2)
            };
            chart
                .draw_series(std::iter::once(Circle::new(at, 5, style)))
                .ok()?;
            chart
                .draw_series(std::iter::once(Text::new(
                    label,
                    at,
                    ("sans-serif", 13)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(anchor, VPos::Center)),
                )))
                .ok()?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .ok()?;
        root.present().ok()?;
    }
    // An accessible name for the image, and a size the page's CSS can scale.
    let escaped = maud::html! { (title) }.into_string();
    Some(svg.replacen(
        "<svg ",
        &format!("<svg role=\"img\" aria-label=\"{escaped}\" class=\"curve\" "),
        1,
    ))
}

/// Line colours: Okabe and Ito's palette for colour-blind readers (yellow left out, too pale on white); the legend
/// names every line.
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x00, 0x72, 0xB2),
    RGBColor(0xE6, 0x9F, 0x00),
    RGBColor(0x00, 0x9E, 0x73),
    RGBColor(0xD5, 0x5E, 0x00),
    RGBColor(0x56, 0xB4, 0xE9),
    RGBColor(0xCC, 0x79, 0xA7),
];

/// Axis labels in binary units, as the report's figures are: `1048576` → `1.0 MiB`.
fn bytes_label(x: f64) -> String {
    crate::analysis::human_bytes(x.max(0.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(n: u64) -> Vec<SizeHit> {
        (0..n)
            .map(|i| SizeHit {
                size: 1000 << i,
                hit_ratio: i as f64 / n as f64,
                uncertainty: 0.01,
            })
            .collect()
    }

    #[test]
    fn a_chart_is_one_svg_element_with_a_line_per_curve_and_its_labels() {
        let (a, b) = (points(8), points(5));
        let svg = curve_svg(
            "user & <co>",
            &[
                Line {
                    name: "user",
                    points: &a,
                    emphasis: false,
                },
                Line {
                    name: "shared cache",
                    points: &b,
                    emphasis: true,
                },
            ],
            &[Mark {
                bytes: 40_000,
                hit_ratio: 0.5,
                label: "measured 50.0%".into(),
                filled: true,
            }],
        )
        .expect("a chart");
        let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert_eq!(root.attribute("aria-label"), Some("user & <co>"));
        let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
        for want in ["user", "shared cache", "measured 50.0%", "hit ratio"] {
            assert!(
                texts.iter().any(|t| t.contains(want)),
                "{want} in {texts:?}"
            );
        }
        let polylines = doc
            .descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .count();
        assert!(polylines >= 2, "{polylines} polylines");
        assert!(doc.descendants().any(|n| n.has_tag_name("circle")));
    }

    #[test]
    fn nothing_to_draw_is_no_chart() {
        assert!(curve_svg("x", &[], &[]).is_none());
        assert!(curve_svg(
            "x",
            &[Line {
                name: "a",
                points: &[],
                emphasis: false
            }],
            &[]
        )
        .is_none());
    }
}
