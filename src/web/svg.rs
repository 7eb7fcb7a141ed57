//! Inline SVG charts: one renderer for every chart of the results page.
//!
//! A chart is series of points over categorical x positions (windows or dates), each point
//! with an optional interval. The SVG carries `data-chart` and `data-series` (the number
//! of series) and one `<g class="series" data-name="...">` per series, so that a browser
//! test can count what was drawn. No script, no external resource: it renders offline.

use std::fmt::Write;

use super::escape;

/// Colours per series, in order (colour-blind-safe Okabe-Ito palette).
const PALETTE: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
];

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 44.0;

/// One point: x position (index into the chart's labels), value, optional interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: usize,
    pub y: f64,
    pub interval: Option<(f64, f64)>,
}

/// A named series of points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
}

/// How points are joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Points with interval bars, slightly offset per series so that they do not overlap.
    Intervals,
    /// A line through the points (intervals drawn as a band).
    Line,
}

/// Everything one chart shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    /// Identifies the chart (`data-chart`), e.g. `metric-active_hours`.
    pub id: String,
    pub title: String,
    pub y_label: String,
    pub x_labels: Vec<String>,
    pub series: Vec<Series>,
    pub style: Style,
    /// Draw a reference line at zero (uplift charts).
    pub zero_line: bool,
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Renders the chart as an `<svg>` element.
pub fn render(c: &Chart) -> String {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for p in c.series.iter().flat_map(|s| &s.points) {
        for v in [Some(p.y), p.interval.map(|i| i.0), p.interval.map(|i| i.1)]
            .into_iter()
            .flatten()
            .filter(|v| v.is_finite())
        {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if c.zero_line {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        (lo, hi) = (lo - 1.0, hi + 1.0);
    }
    let pad = (hi - lo) * 0.06;
    let (lo, hi) = (lo - pad, hi + pad);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let n = c.x_labels.len().max(1);
    let step = plot_w / n as f64;
    let xpos = |x: usize, s: usize| {
        let base = LEFT + step * (x as f64 + 0.5);
        match c.style {
            Style::Intervals => {
                let k = c.series.len().max(1) as f64;
                base + (s as f64 - (k - 1.0) / 2.0) * (step * 0.5 / k).min(14.0)
            }
            Style::Line => base,
        }
    };
    let ypos = |v: f64| TOP + plot_h * (1.0 - (v - lo) / (hi - lo));
    let mut o = String::new();
    let _ = write!(
        o,
        r#"<svg class="chart" data-chart="{}" data-series="{}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11">"#,
        escape(&c.id),
        c.series.len(),
        escape(&c.title)
    );
    let _ = write!(
        o,
        r##"<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{}</text>"##,
        escape(&c.title)
    );
    // Axes and horizontal grid with five ticks.
    for i in 0..=4 {
        let v = lo + (hi - lo) * f64::from(i) / 4.0;
        let y = ypos(v);
        let _ = write!(
            o,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            fmt_num(v)
        );
    }
    if c.zero_line {
        let y = ypos(0.0);
        let _ = write!(
            o,
            r##"<line class="zero" x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#444" stroke-dasharray="4 3"/>"##,
            WIDTH - RIGHT
        );
    }
    // Label at most 8 x positions so that dates stay readable.
    let every = n.div_ceil(8);
    for (i, l) in c.x_labels.iter().enumerate() {
        if i % every == 0 {
            let _ = write!(
                o,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                xpos(i, 0).max(LEFT),
                HEIGHT - BOTTOM + 16.0,
                escape(l)
            );
        }
    }
    let _ = write!(
        o,
        r#"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(&c.y_label)
    );
    for (s, series) in c.series.iter().enumerate() {
        let color = PALETTE[s % PALETTE.len()];
        let _ = write!(
            o,
            r#"<g class="series" data-name="{}" fill="{color}" stroke="{color}">"#,
            escape(&series.name)
        );
        let pts: Vec<&Point> = series.points.iter().filter(|p| p.y.is_finite()).collect();
        if c.style == Style::Line {
            let band: Vec<(f64, f64, f64)> = pts
                .iter()
                .filter_map(|p| p.interval.map(|(l, h)| (xpos(p.x, s), ypos(l), ypos(h))))
                .collect();
            if band.len() > 1 {
                let mut d = String::new();
                for (i, (x, _, h)) in band.iter().enumerate() {
                    let _ = write!(d, "{}{x:.1},{h:.1} ", if i == 0 { "M" } else { "L" });
                }
                for (x, l, _) in band.iter().rev() {
                    let _ = write!(d, "L{x:.1},{l:.1} ");
                }
                let _ = write!(o, r#"<path d="{d}Z" fill-opacity="0.15" stroke="none"/>"#);
            }
            let line: Vec<String> = pts
                .iter()
                .map(|p| format!("{:.1},{:.1}", xpos(p.x, s), ypos(p.y)))
                .collect();
            let _ = write!(
                o,
                r#"<polyline points="{}" fill="none" stroke-width="2"/>"#,
                line.join(" ")
            );
        }
        for p in &pts {
            let x = xpos(p.x, s);
            if let (Style::Intervals, Some((l, h))) = (c.style, p.interval) {
                if l.is_finite() && h.is_finite() {
                    let _ = write!(
                        o,
                        r#"<line x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}" stroke-width="2"/>"#,
                        ypos(l),
                        ypos(h)
                    );
                }
            }
            let tip = match p.interval {
                Some((l, h)) => format!(
                    "{} {}: {} [{}, {}]",
                    series.name,
                    c.x_labels.get(p.x).map_or("", String::as_str),
                    fmt_num(p.y),
                    fmt_num(l),
                    fmt_num(h)
                ),
                None => format!(
                    "{} {}: {}",
                    series.name,
                    c.x_labels.get(p.x).map_or("", String::as_str),
                    fmt_num(p.y)
                ),
            };
            let _ = write!(
                o,
                r#"<circle cx="{x:.1}" cy="{:.1}" r="3.5"><title>{}</title></circle>"#,
                ypos(p.y),
                escape(&tip)
            );
        }
        o.push_str("</g>");
    }
    // Legend, top right.
    let mut lx = WIDTH - RIGHT;
    for (s, series) in c.series.iter().enumerate().rev() {
        let w = 18.0 + 6.5 * series.name.chars().count() as f64;
        lx -= w;
        let _ = write!(
            o,
            r#"<rect x="{lx:.1}" y="{}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{}">{}</text>"#,
            HEIGHT - 14.0,
            PALETTE[s % PALETTE.len()],
            lx + 13.0,
            HEIGHT - 5.0,
            escape(&series.name)
        );
    }
    o.push_str("</svg>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_group_per_series_and_escaped_text() {
        let c = Chart {
            id: "x".into(),
            title: "a <b> & c".into(),
            y_label: "y".into(),
            x_labels: vec!["1".into(), "2".into()],
            series: vec![
                Series {
                    name: "control".into(),
                    points: vec![Point {
                        x: 0,
                        y: 1.0,
                        interval: Some((0.5, 1.5)),
                    }],
                },
                Series {
                    name: "treat\"ment".into(),
                    points: vec![Point {
                        x: 1,
                        y: f64::NAN,
                        interval: None,
                    }],
                },
            ],
            style: Style::Intervals,
            zero_line: true,
        };
        let svg = render(&c);
        assert!(svg.contains(r#"data-series="2""#));
        assert_eq!(svg.matches(r#"<g class="series""#).count(), 2);
        assert!(svg.contains("a &lt;b&gt; &amp; c"));
        assert!(svg.contains("treat&quot;ment"));
        assert!(!svg.contains("NaN"));
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(svg.contains(r#"class="zero""#));
    }
}
