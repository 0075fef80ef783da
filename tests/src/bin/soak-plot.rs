//! `soak-plot`: turns the samples of a chaos or soak run (`FLEET_CHAOS_SAMPLES`, a CSV file
//! whose first column is `unix_ms` and whose header names the others) into one SVG with a
//! chart per column over time, so that growth (memory, descriptors, queue depth) shows at a
//! glance.
//!
//! ```sh
//! soak-plot samples.csv soak.svg
//! ```
//!
//! Lines that do not parse are skipped and counted; a column without any value is left out.

use std::fmt::Write as _;
use std::process::ExitCode;

/// One chart's size in the picture, in pixels.
const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 150.0;
/// Room for the axis labels.
const LEFT: f64 = 90.0;
const TOP: f64 = 30.0;
const GAP: f64 = 40.0;

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        eprintln!("usage: soak-plot SAMPLES.csv OUT.svg");
        return ExitCode::from(2);
    };
    let text = match std::fs::read_to_string(input) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("soak-plot: cannot read {input}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (series, skipped) = match parse(&text) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("soak-plot: {input}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if skipped > 0 {
        eprintln!("soak-plot: {skipped} lines skipped (not numbers)");
    }
    let svg = render(&series, input);
    if let Err(e) = std::fs::write(output, svg) {
        eprintln!("soak-plot: cannot write {output}: {e}");
        return ExitCode::FAILURE;
    }
    let samples = series.first().map_or(0, |s| s.points.len());
    println!(
        "soak-plot: {} charts, {samples} samples -> {output}",
        series.len()
    );
    ExitCode::SUCCESS
}

/// The columns after the first, each as (minutes since the first sample, value).
fn parse(text: &str) -> Result<(Vec<Series>, usize), String> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().ok_or("empty file")?;
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    if names.len() < 2 {
        return Err("the header names no column after the time".into());
    }
    let mut series: Vec<Series> = names[1..]
        .iter()
        .map(|n| Series {
            name: (*n).to_owned(),
            points: Vec::new(),
        })
        .collect();
    let mut start = None;
    let mut skipped = 0;
    for line in lines {
        let mut cells = line.split(',').map(str::trim);
        let Some(Ok(t)) = cells.next().map(str::parse::<f64>) else {
            skipped += 1;
            continue;
        };
        let t0 = *start.get_or_insert(t);
        let minutes = (t - t0) / 60_000.0;
        for (s, cell) in series.iter_mut().zip(cells) {
            if let Ok(v) = cell.parse::<f64>() {
                s.points.push((minutes, v));
            }
        }
    }
    series.retain(|s| !s.points.is_empty());
    Ok((series, skipped))
}

fn render(series: &[Series], title: &str) -> String {
    let total = TOP + series.len() as f64 * (HEIGHT + GAP) + 20.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{total}" font-family="sans-serif" font-size="12">"#,
        w = LEFT + WIDTH + 20.0
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="18" font-size="14">{}</text>"#,
        escape(title)
    );
    let t_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    for (i, s) in series.iter().enumerate() {
        let top = TOP + i as f64 * (HEIGHT + GAP);
        let (lo, hi) = s.points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
        let (lo, hi) = if hi > lo {
            (lo.min(0.0), hi)
        } else {
            (lo - 1.0, hi + 1.0)
        };
        let x = |t: f64| LEFT + t / t_max * WIDTH;
        let y = |v: f64| top + HEIGHT - (v - lo) / (hi - lo) * HEIGHT;
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{top}" width="{WIDTH}" height="{HEIGHT}" fill="none" stroke="#999"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#,
            top - 5.0,
            escape(&s.name)
        );
        for (v, dy) in [(hi, 4.0), (lo, 0.0)] {
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y(v) + dy,
                number(v)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{:.1} min</text>"#,
            LEFT + WIDTH,
            top + HEIGHT + 15.0,
            t_max
        );
        let mut path = String::new();
        for (k, &(t, v)) in s.points.iter().enumerate() {
            let _ = write!(
                path,
                "{}{:.1},{:.1} ",
                if k == 0 { "M" } else { "L" },
                x(t),
                y(v)
            );
        }
        let _ = writeln!(
            svg,
            r##"<path d="{}" fill="none" stroke="#1f5fa8" stroke-width="1.2"/>"##,
            path.trim_end()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn number(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_become_series_and_bad_lines_are_counted() {
        let (s, skipped) =
            parse("unix_ms,rss_kib,fds\n1000,10,5\nx,1,1\n61000,20,\n").unwrap_or_default();
        assert_eq!(skipped, 1);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].points, [(0.0, 10.0), (1.0, 20.0)]);
        assert_eq!(s[1].points, [(0.0, 5.0)]);
        let svg = render(&s, "a<b");
        assert!(svg.contains("rss_kib") && svg.contains("a&lt;b"));
        assert_eq!(svg.matches("<path").count(), 2);
    }

    #[test]
    fn a_header_alone_is_no_error_and_no_header_is() {
        assert!(parse("").is_err());
        assert!(parse("unix_ms\n1,2\n").is_err());
        assert_eq!(parse("unix_ms,a\n").map(|x| x.0.len()), Ok(0));
    }
}
