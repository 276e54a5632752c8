//! One seed's timeline as an SVG: a row per node, grouped by region; partitions and crashes as
//! bars, writes as ticks coloured by region, and a dot where each node converged after each heal.

use std::fmt::Write as _;

use crate::report::Timeline;

const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

/// Renders `timeline` as a standalone SVG document.
pub fn timeline_svg(timeline: &Timeline, title: &str) -> String {
    let rows = timeline.nodes.len().max(1);
    let (left, top, row_h, width) = (90.0, 50.0, 28.0, 1200.0);
    let plot_w = width - left - 20.0;
    let height = top + row_h * rows as f64 + 70.0;
    let end = timeline.end_at.max(1) as f64;
    let x = |t: u64| left + plot_w * (t as f64 / end).min(1.0);
    let y = |n: usize| top + row_h * n as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    for (n, name) in timeline.nodes.iter().enumerate() {
        let region = timeline.regions.get(n).copied().unwrap_or(0);
        let colour = COLOURS[region % COLOURS.len()];
        let _ = writeln!(
            s,
            r##"<text x="10" y="{}" fill="{colour}">{}</text><line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="#ddd"/>"##,
            y(n) + row_h / 2.0 + 4.0,
            escape(name),
            left + plot_w,
            y(n) + row_h / 2.0,
            y(n) + row_h / 2.0
        );
    }
    for (label, start, stop, nodes) in &timeline.partitions {
        for &n in nodes {
            let _ = writeln!(
                s,
                r##"<rect x="{}" y="{}" width="{}" height="{}" fill="#f5b041" fill-opacity="0.35"><title>{}</title></rect>"##,
                x(*start),
                y(n) + 3.0,
                (x(*stop) - x(*start)).max(0.5),
                row_h - 6.0,
                escape(label)
            );
        }
    }
    for (n, down, up) in &timeline.crashes {
        let _ = writeln!(
            s,
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="#333" fill-opacity="0.8"><title>crashed</title></rect>"##,
            x(*down),
            y(*n) + 9.0,
            (x(*up) - x(*down)).max(0.5),
            row_h - 18.0
        );
    }
    for (n, at, acked) in &timeline.writes {
        let region = timeline.regions.get(*n).copied().unwrap_or(0);
        let colour = if *acked {
            COLOURS[region % COLOURS.len()]
        } else {
            "#999"
        };
        let _ = writeln!(
            s,
            r#"<line x1="{0}" x2="{0}" y1="{1}" y2="{2}" stroke="{colour}"/>"#,
            x(*at),
            y(*n) + 2.0,
            y(*n) + 9.0
        );
    }
    for (n, _heal, at) in &timeline.converged {
        let _ = writeln!(
            s,
            r##"<circle cx="{}" cy="{}" r="2" fill="#27ae60"/>"##,
            x(*at),
            y(*n) + row_h - 6.0
        );
    }
    let live = x(timeline.liveness_at);
    let bottom = y(rows);
    let _ = writeln!(
        s,
        r#"<line x1="{live}" x2="{live}" y1="{top}" y2="{bottom}" stroke="black" stroke-dasharray="4 3"/><text x="{}" y="{}" text-anchor="end">liveness phase →</text>"#,
        live - 3.0,
        top - 5.0
    );
    for i in 0..=10 {
        let t = timeline.end_at * i / 10;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{:.0} s</text>"#,
            x(t),
            bottom + 15.0,
            t as f64 / 1000.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{}">orange: node cut off by a partition · black: crashed · ticks: writes (grey: never acknowledged) · green dots: node converged after a heal</text>"##,
        bottom + 40.0
    );
    s.push_str("</svg>\n");
    s
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
