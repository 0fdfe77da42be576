//! A user's transactions as an SVG scatter over time: normal transactions blue, the fraud
//! rule's anomalies red, the user's average and the rule's threshold as guide lines. Each
//! point carries its transaction id (`data-transaction-id`) and a hover title with the
//! amount, the user's average when it was scored, and the time.

use std::fmt::Write;

use serde_json::{Map, Value};

/// One transaction on the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The transaction.
    pub transaction_id: i64,
    /// When it happened (Unix ms).
    pub ts_ms: i64,
    /// Its amount.
    pub amount: f64,
    /// The user's average when the rule scored it, if it emitted the transaction (by
    /// default only anomalies).
    pub user_avg: Option<f64>,
    /// Whether the rule flagged it.
    pub flagged: bool,
}

impl Point {
    /// From a row of the chart query (`transaction_id`, `ts_ms`, `amount`, `user_avg`,
    /// `flagged`).
    pub fn from_row(row: &Map<String, Value>) -> Option<Point> {
        Some(Point {
            transaction_id: row.get("transaction_id")?.as_i64()?,
            ts_ms: row.get("ts_ms")?.as_i64()?,
            amount: row.get("amount")?.as_f64()?,
            user_avg: row.get("user_avg").and_then(Value::as_f64),
            flagged: row.get("flagged").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 380.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 46.0;

/// Escapes text for SVG/HTML.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `1234.5` as `1,234.50`.
pub fn money(v: f64) -> String {
    let neg = v < 0.0;
    let cents = (v.abs() * 100.0).round() as u128;
    let (whole, frac) = (cents / 100, cents % 100);
    let digits = whole.to_string();
    let mut grouped = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    format!("{}{grouped}.{frac:02}", if neg { "-" } else { "" })
}

/// A time as the hover shows it (`span_ms` = None) or as an axis tick over a span.
fn time_label(ms: i64, span_ms: Option<i64>) -> String {
    let Some(t) = chrono::DateTime::from_timestamp_millis(ms) else {
        return ms.to_string();
    };
    let format = match span_ms {
        None => "%Y-%m-%d %H:%M:%S UTC",
        Some(s) if s < 2 * 60 * 1000 => "%H:%M:%S%.3f",
        Some(s) if s < 3 * 3600 * 1000 => "%H:%M:%S",
        Some(s) if s < 3 * 86_400 * 1000 => "%b %d %H:%M",
        Some(_) => "%Y-%m-%d",
    };
    t.format(format).to_string()
}

/// A round step giving about `n` ticks over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// The chart of `points` (in time order).
pub fn render(title: &str, points: &[Point]) -> String {
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}">"##,
        escape(&format!("Transactions of {title}"))
    );
    if points.is_empty() {
        let _ = write!(
            svg,
            r##"<text class="empty" x="{}" y="{}" text-anchor="middle">{} has no transactions yet.</text></svg>"##,
            WIDTH / 2.0,
            HEIGHT / 2.0,
            escape(title)
        );
        return svg;
    }
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let t0 = points.iter().map(|p| p.ts_ms).min().unwrap_or(0);
    let t1 = points.iter().map(|p| p.ts_ms).max().unwrap_or(0);
    let (t0, t1) = if t1 > t0 {
        let pad = (t1 - t0) / 40;
        (t0 - pad, t1 + pad)
    } else {
        (t0 - 60_000, t1 + 60_000)
    };
    let average = points.iter().map(|p| p.amount).sum::<f64>() / points.len() as f64;
    let max_amount = points.iter().map(|p| p.amount).fold(0.0, f64::max);
    let y_step = nice_step(max_amount.max(3.0 * average).max(1.0), 5.0);
    let y_max = ((max_amount.max(3.0 * average) * 1.05) / y_step).ceil() * y_step;
    let x = |t: i64| LEFT + (t - t0) as f64 / (t1 - t0) as f64 * plot_w;
    let y = |v: f64| TOP + plot_h - (v.max(0.0) / y_max) * plot_h;

    // Grid and axes.
    svg.push_str(r#"<g class="grid">"#);
    let mut v = 0.0;
    while v <= y_max + y_step / 2.0 {
        let _ = write!(
            svg,
            r#"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}"/><text class="tick" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            WIDTH - RIGHT,
            LEFT - 8.0,
            y(v) + 4.0,
            money(v).trim_end_matches(".00"),
            y = y(v)
        );
        v += y_step;
    }
    for i in 0..=5 {
        let t = t0 + (t1 - t0) * i / 5;
        let anchor = match i {
            0 => "start",
            5 => "end",
            _ => "middle",
        };
        let _ = write!(
            svg,
            r#"<text class="tick" x="{:.1}" y="{}" text-anchor="{anchor}">{}</text>"#,
            x(t),
            HEIGHT - BOTTOM + 20.0,
            escape(&time_label(t, Some(t1 - t0)))
        );
    }
    svg.push_str("</g>");
    let _ = write!(
        svg,
        r#"<text class="axis-label" x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">amount</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );

    // Guides: the user's average and the rule's threshold (3x).
    for (class, value, label) in [
        (
            "guide average",
            average,
            format!("average {}", money(average)),
        ),
        (
            "guide threshold",
            3.0 * average,
            format!("3\u{d7} average {}", money(3.0 * average)),
        ),
    ] {
        let _ = write!(
            svg,
            r#"<line class="{class}" x1="{LEFT}" x2="{}" y1="{yv:.1}" y2="{yv:.1}"/><text class="guide-label {class}" x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            WIDTH - RIGHT,
            WIDTH - RIGHT - 4.0,
            y(value) - 5.0,
            escape(&label),
            yv = y(value)
        );
    }

    // The transactions in time order, then the points (anomalies last, on top).
    svg.push_str(r#"<polyline class="trace" points=""#);
    for p in points {
        let _ = write!(svg, "{:.1},{:.1} ", x(p.ts_ms), y(p.amount));
    }
    svg.push_str(r#""/>"#);
    let mut ordered: Vec<&Point> = points.iter().collect();
    ordered.sort_by_key(|p| p.flagged);
    for p in ordered {
        let avg = match p.user_avg {
            Some(a) => format!("user average then: {}", money(a)),
            None => "no alert from the fraud rule".into(),
        };
        let hover = format!(
            "Transaction {}{}\namount: {}\n{avg}\n{}",
            p.transaction_id,
            if p.flagged { " \u{2014} ANOMALY" } else { "" },
            money(p.amount),
            time_label(p.ts_ms, None)
        );
        let _ = write!(
            svg,
            r#"<circle class="point{}" cx="{:.1}" cy="{:.1}" r="{}" data-transaction-id="{}" data-amount="{}"><title>{}</title></circle>"#,
            if p.flagged { " anomaly" } else { "" },
            x(p.ts_ms),
            y(p.amount),
            if p.flagged { 6.5 } else { 4.5 },
            p.transaction_id,
            p.amount,
            escape(&hover)
        );
    }
    // Legend.
    let _ = write!(
        svg,
        r#"<g class="legend" transform="translate({LEFT},18)"><circle class="point" cx="6" cy="0" r="5"/><text x="16" y="4">transaction</text><circle class="point anomaly" cx="118" cy="0" r="6"/><text x="130" y="4">anomaly (amount &gt; 3&#215; the user's average)</text></g>"#
    );
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anomalies_are_red_points_with_their_ids() {
        let points = vec![
            Point {
                transaction_id: 1,
                ts_ms: 1_700_000_000_000,
                amount: 100.0,
                user_avg: None,
                flagged: false,
            },
            Point {
                transaction_id: 2,
                ts_ms: 1_700_000_060_000,
                amount: 900.0,
                user_avg: Some(100.0),
                flagged: true,
            },
        ];
        let svg = render("Ada <admin> (user 7)", &points);
        assert!(svg.contains(r#"class="point anomaly""#));
        assert!(svg.contains(r#"data-transaction-id="2""#));
        let red: Vec<&str> = svg
            .split("<circle ")
            .filter(|c| {
                c.starts_with(r#"class="point anomaly""#) && c.contains("data-transaction-id")
            })
            .collect();
        assert_eq!(red.len(), 1);
        assert!(red[0].contains(r#"data-transaction-id="2""#));
        assert!(svg.contains("Ada &lt;admin&gt;"));
        assert!(svg.contains("user average then: 100.00"));
        assert!(svg.contains("amount: 900.00"));
    }

    #[test]
    fn an_empty_user_says_so() {
        assert!(render("User 3", &[]).contains("User 3 has no transactions yet."));
    }

    #[test]
    fn money_groups_thousands() {
        assert_eq!(money(1234567.891), "1,234,567.89");
        assert_eq!(money(0.5), "0.50");
        assert_eq!(money(-12.0), "-12.00");
    }
}
