//! Charts drawn on the server as SVG: a tag's average per time bucket as a line, the bucket's
//! minimum and maximum as a band around it, gaps in the data left as gaps. No script, no
//! external service.

use crate::data::Point;
use chrono::{DateTime, Utc};
use std::fmt::Write as _;
use std::time::Duration;

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 180.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 22.0;

/// A time range a chart can show, as offered on the device page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub key: &'static str,
    pub label: &'static str,
    pub span: Duration,
}

/// The ranges offered, shortest first; the first is the default.
pub const RANGES: &[Range] = &[
    Range {
        key: "1h",
        label: "1 hour",
        span: Duration::from_secs(3600),
    },
    Range {
        key: "6h",
        label: "6 hours",
        span: Duration::from_secs(6 * 3600),
    },
    Range {
        key: "24h",
        label: "24 hours",
        span: Duration::from_secs(24 * 3600),
    },
    Range {
        key: "7d",
        label: "7 days",
        span: Duration::from_secs(7 * 86_400),
    },
    Range {
        key: "30d",
        label: "30 days",
        span: Duration::from_secs(30 * 86_400),
    },
];

/// Buckets per chart: enough for the width, few enough to stay fast on a month of data.
pub const BUCKETS: u32 = 240;

impl Range {
    /// The range named `key`, or the default.
    pub fn by_key(key: Option<&str>) -> Range {
        RANGES
            .iter()
            .copied()
            .find(|r| Some(r.key) == key)
            .unwrap_or(RANGES[0])
    }

    /// The width of a bucket: the span over [`BUCKETS`], at least a second.
    pub fn bucket(&self) -> Duration {
        (self.span / BUCKETS).max(Duration::from_secs(1))
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn label(v: f64) -> String {
    if v.abs() >= 1e6 || (v != 0.0 && v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The SVG of one series over `[from, to)`, titled `title`; with no points, says so.
pub fn svg(
    title: &str,
    points: &[Point],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    bucket: Duration,
) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}"><title>{}</title>"#,
        escape(title),
        escape(title)
    );
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let _ = write!(
        out,
        r#"<rect class="plot" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>"#
    );
    let fmt_time = |t: DateTime<Utc>| {
        if to - from > chrono::Duration::days(2) {
            t.format("%Y-%m-%d %H:%M").to_string()
        } else {
            t.format("%H:%M").to_string()
        }
    };
    let _ = write!(
        out,
        r#"<text class="axis" x="{LEFT}" y="{}">{}</text><text class="axis" x="{}" y="{}" text-anchor="end">{} UTC</text>"#,
        HEIGHT - 6.0,
        fmt_time(from),
        WIDTH - RIGHT,
        HEIGHT - 6.0,
        fmt_time(to)
    );
    if points.is_empty() {
        let _ = write!(
            out,
            r#"<text class="empty" x="{}" y="{}" text-anchor="middle">no readings in this range</text></svg>"#,
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
        return out;
    }
    let lo = points.iter().map(|p| p.min).fold(f64::INFINITY, f64::min);
    let hi = points
        .iter()
        .map(|p| p.max)
        .fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if hi - lo < f64::EPSILON * hi.abs().max(1.0) {
        (lo - 1.0, hi + 1.0)
    } else {
        (lo, hi)
    };
    let span_ms = ((to - from).num_milliseconds() as f64).max(1.0);
    let x = |t: DateTime<Utc>| {
        LEFT + plot_w * ((t - from).num_milliseconds() as f64 / span_ms).clamp(0.0, 1.0)
    };
    let y = |v: f64| TOP + plot_h * (1.0 - (v - lo) / (hi - lo));
    let _ = write!(
        out,
        r#"<text class="axis" x="{}" y="{}" text-anchor="end">{}</text><text class="axis" x="{}" y="{}" text-anchor="end">{}</text>"#,
        LEFT - 4.0,
        TOP + 8.0,
        label(hi),
        LEFT - 4.0,
        TOP + plot_h,
        label(lo)
    );
    // Runs of consecutive points; a gap breaks the line. A gap is longer than one and a half
    // buckets and than three times the usual spacing (a device reporting every minute on a
    // 15 s bucket is a line, not dots).
    let mut spacing: Vec<chrono::Duration> =
        points.windows(2).map(|w| w[1].time - w[0].time).collect();
    spacing.sort();
    let usual = spacing.get(spacing.len() / 2).copied().unwrap_or_default();
    let gap = (chrono::Duration::from_std(bucket * 3 / 2).unwrap_or(chrono::Duration::MAX))
        .max(usual * 3);
    let mut runs: Vec<&[Point]> = Vec::new();
    let mut start = 0;
    for i in 1..=points.len() {
        if i == points.len() || points[i].time - points[i - 1].time > gap {
            runs.push(&points[start..i]);
            start = i;
        }
    }
    let half = chrono::Duration::from_std(bucket / 2).unwrap_or_default();
    for run in runs {
        let mut band = String::new();
        for p in run {
            let _ = write!(band, "{:.1},{:.1} ", x(p.time + half), y(p.max));
        }
        for p in run.iter().rev() {
            let _ = write!(band, "{:.1},{:.1} ", x(p.time + half), y(p.min));
        }
        let _ = write!(
            out,
            r#"<polygon class="band" points="{}"/>"#,
            band.trim_end()
        );
        if run.len() == 1 {
            let p = run[0];
            let _ = write!(
                out,
                r#"<circle class="dot" cx="{:.1}" cy="{:.1}" r="2"/>"#,
                x(p.time + half),
                y(p.avg)
            );
        } else {
            let line: Vec<String> = run
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(p.time + half), y(p.avg)))
                .collect();
            let _ = write!(
                out,
                r#"<polyline class="line" points="{}"/>"#,
                line.join(" ")
            );
        }
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    fn point(s: i64, v: f64) -> Point {
        Point {
            time: at(s),
            avg: v,
            min: v - 1.0,
            max: v + 1.0,
        }
    }

    #[test]
    fn ranges_default_and_bucket() {
        assert_eq!(Range::by_key(None).key, "1h");
        assert_eq!(Range::by_key(Some("7d")).key, "7d");
        assert_eq!(Range::by_key(Some("nope")).key, "1h");
        assert_eq!(Range::by_key(Some("1h")).bucket(), Duration::from_secs(15));
    }

    #[test]
    fn draws_lines_breaks_gaps_and_escapes_titles() {
        let bucket = Duration::from_secs(10);
        let points = [
            point(0, 1.0),
            point(10, 2.0),
            point(20, 3.0),
            point(100, 4.0),
        ];
        let svg = svg("<AI.0>", &points, at(0), at(120), bucket);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 1, "first run is a line");
        assert_eq!(
            svg.matches("<circle").count(),
            1,
            "the lone last bucket is a dot"
        );
        assert_eq!(svg.matches("<polygon").count(), 2);
        assert!(svg.contains("&lt;AI.0&gt;") && !svg.contains("<AI.0>"));
        let empty = super::svg("t", &[], at(0), at(60), bucket);
        assert!(empty.contains("no readings in this range"));
        let flat = super::svg("t", &[point(0, 5.0)], at(0), at(60), bucket);
        assert!(!flat.contains("NaN"), "{flat}");
    }
}
