//! The chart: latency percentiles (left) and throughput over time (right), as a plain SVG.

use std::fmt::Write as _;

use crate::report::{dur, thousands, Hist, Report};

const W: f64 = 1000.0;
const H: f64 = 440.0;
const PANEL_W: f64 = 400.0;
const PANEL_H: f64 = 290.0;
const TOP: f64 = 80.0;
const LEFT_X: f64 = 80.0;
const RIGHT_X: f64 = 570.0;
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// Percentile → x position in "nines" (90 → 1, 99 → 2, 99.9 → 3), capped at 5.
fn nines(p: f64) -> f64 {
    if p >= 100.0 {
        5.0
    } else {
        (-(1.0 - p / 100.0).log10()).min(5.0)
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders the report's chart.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let headline = if let Some(p) = &r.packets {
        let mode = match (r.settings.send_mode.as_deref(), r.settings.window) {
            (Some("window"), Some(n)) => format!(", window {n}"),
            (Some(m), _) => format!(", {m}"),
            _ => String::new(),
        };
        format!(
            "{} packets/s delivered, {} B packets{mode}, loss {:.3} %",
            thousands(p.delivered_per_second),
            r.settings.packet_size.unwrap_or(0),
            p.loss_ratio * 100.0
        )
    } else if let Some(h) = &r.handshakes {
        format!("{} handshakes/s", thousands(h.per_second))
    } else if let Some(x) = &r.stun {
        format!("{} answers/s", thousands(x.answers_per_second))
    } else {
        String::new()
    };
    let _ = writeln!(
        s,
        r#"<text x="20" y="28" font-size="16" font-weight="bold">ferry-loadtest {} — {}</text>"#,
        esc(&r.mode),
        esc(&r.target)
    );
    let _ = writeln!(
        s,
        r##"<text x="20" y="50" fill="#444">{} · {:.0} s measured · {}</text>"##,
        esc(&r.started_at),
        r.measured_seconds,
        esc(&headline)
    );
    latency_panel(&mut s, r);
    timeline_panel(&mut s, r);
    s.push_str("</svg>\n");
    s
}

fn axes(s: &mut String, x0: f64, title: &str, xlabel: &str) {
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-weight="bold">{}</text>"#,
        x0,
        TOP - 10.0,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<rect x="{x0}" y="{TOP}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="#888"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#444">{}</text>"##,
        x0 + PANEL_W / 2.0,
        TOP + PANEL_H + 36.0,
        esc(xlabel)
    );
}

fn latency_panel(s: &mut String, r: &Report) {
    let x0 = LEFT_X;
    axes(s, x0, "Latency by percentile", "percentile");
    let series: Vec<(&str, &Hist)> = [
        ("one-way", &r.latency.one_way),
        ("round trip", &r.latency.round_trip),
        ("handshake", &r.latency.handshake),
        ("STUN round trip", &r.latency.stun),
    ]
    .into_iter()
    .filter_map(|(n, h)| h.as_ref().map(|h| (n, h)))
    .collect();
    if series.is_empty() {
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#888">no latency samples</text>"##,
            x0 + PANEL_W / 2.0,
            TOP + PANEL_H / 2.0
        );
        return;
    }
    // Log y axis over whole decades covering every point.
    let (mut lo, mut hi) = (f64::MAX, f64::MIN);
    for (_, h) in &series {
        for [_, us] in &h.percentiles {
            lo = lo.min(us.max(0.1));
            hi = hi.max(us.max(0.1));
        }
    }
    let dlo = lo.log10().floor();
    let dhi = (hi.log10().ceil()).max(dlo + 1.0);
    let y = |us: f64| TOP + PANEL_H - (us.max(0.1).log10() - dlo) / (dhi - dlo) * PANEL_H;
    let x = |p: f64| x0 + nines(p) / 5.0 * PANEL_W;
    let mut d = dlo;
    while d <= dhi + 1e-9 {
        let yy = y(10f64.powf(d));
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">{}</text>"##,
            x0 + PANEL_W,
            x0 - 6.0,
            yy + 4.0,
            dur(10f64.powf(d))
        );
        d += 1.0;
    }
    for (p, label) in [
        (0.0, "0"),
        (90.0, "90"),
        (99.0, "99"),
        (99.9, "99.9"),
        (99.99, "99.99"),
        (99.999, "99.999"),
    ] {
        let xx = x(p);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle" fill="#444">{label}</text>"##,
            TOP + PANEL_H,
            TOP + PANEL_H + 16.0
        );
    }
    for (i, (name, h)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = h
            .percentiles
            .iter()
            .map(|[p, us]| format!("{:.1},{:.1}", x(*p), y(*us)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#,
            pts.join(" ")
        );
        let ly = TOP + 16.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="12" height="3" fill="{color}"/><text x="{:.1}" y="{:.1}">{} (p50 {}, p99 {})</text>"#,
            x0 + 10.0,
            ly - 4.0,
            x0 + 28.0,
            ly,
            esc(name),
            dur(h.p50_us),
            dur(h.p99_us)
        );
    }
}

fn timeline_panel(s: &mut String, r: &Report) {
    let x0 = RIGHT_X;
    let what = match r.mode.as_str() {
        "derp" => "Delivered packets/s",
        "connect" => "Handshakes/s",
        "idle" => "Connections opened/s",
        "stun" => "STUN answers/s",
        _ => "Rate",
    };
    axes(s, x0, &format!("{what} over time"), "seconds since start");
    let pts = &r.timeline;
    if pts.is_empty() {
        return;
    }
    let tmax = pts.last().map(|p| p.t).unwrap_or(1.0).max(1.0);
    let vmax = pts
        .iter()
        .map(|p| p.per_second)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let x = |t: f64| x0 + t / tmax * PANEL_W;
    let y = |v: f64| TOP + PANEL_H - v / vmax * PANEL_H;
    // Warm-up shaded.
    let warm = r.settings.warmup_seconds.min(tmax);
    if warm > 0.0 {
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{TOP}" width="{:.1}" height="{PANEL_H}" fill="#f3f3f3"/><text x="{:.1}" y="{:.1}" fill="#888">warm-up</text>"##,
            x(warm) - x0,
            x0 + 4.0,
            TOP + 14.0
        );
    }
    for i in 0..=4 {
        let v = vmax / 1.1 * i as f64 / 4.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">{}</text>"##,
            x0 + PANEL_W,
            x0 - 6.0,
            yy + 4.0,
            thousands(v)
        );
    }
    let step = (tmax / 5.0).ceil().max(1.0);
    let mut t = 0.0;
    while t <= tmax + 1e-9 {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#444">{t:.0}</text>"##,
            x(t),
            TOP + PANEL_H + 16.0
        );
        t += step;
    }
    let line: Vec<String> = pts
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(p.t), y(p.per_second)))
        .collect();
    let _ = writeln!(
        s,
        r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
        line.join(" "),
        COLORS[0]
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{new_hist, Sample, Settings};

    #[test]
    fn chart_is_well_formed_svg_with_both_panels() {
        let mut r = Report::new(
            "derp",
            "http://127.0.0.1:1/derp",
            Settings {
                warmup_seconds: 1.0,
                duration_seconds: 2.0,
                ..Default::default()
            },
        );
        let mut h = new_hist();
        for v in [10_000u64, 20_000, 40_000, 2_000_000] {
            h.record(v).unwrap();
        }
        r.latency.one_way = Hist::from_ns(&h);
        r.timeline = (0..12)
            .map(|i| Sample {
                t: i as f64 * 0.25,
                per_second: 1000.0 * i as f64,
                bytes_per_second: 0.0,
                phase: "measure".into(),
            })
            .collect();
        let svg = render(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("one-way (p50"));
        assert!(svg.contains("warm-up"));
        assert_eq!(nines(99.0).round(), 2.0);
        // Every tag is closed: count opening vs self-closing/closing forms of <text>.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }
}
