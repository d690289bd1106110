//! `--plot DIR`: SVG charts of a run, drawn with plotters' SVG backend.
//!
//! - `<transport>-<mode>-throughput.svg`: per shape, one bar per side (busway, the raw
//!   client, the in-runtime channels in memory) at the median msgs/s over `--repeat`, a line
//!   over the range and a dot per run; each shape on its own scale.
//! - `<transport>-<mode>-latency.svg`: the latency shape's delay percentile curves, busway
//!   and the raw client, one line per run, on log axes.
//! - `scenario.svg`: per set-up, broker CPU seconds per million messages and the end-to-end
//!   p99, medians with their range over `--repeat`, on log scales.

use std::path::{Path, PathBuf};

use busway::{Error, ErrorKind, Result};
use plotters::coord::ranged1d::SegmentValue;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::report::ShapeResult;
use super::Shape;

/// The quantiles a latency curve is drawn through: 1 - 10^-x for x from 0.3 (p50) to 4
/// (p99.99), evenly spaced on the chart's axis.
pub(crate) fn curve_quantiles() -> impl Iterator<Item = (f64, f64)> {
    (3..=40).map(|i| {
        let x = f64::from(i) / 10.0;
        (x, 1.0 - 10f64.powf(-x))
    })
}

/// The axis position of quantile `q` (see [`curve_quantiles`]).
fn percentile_label(x: f64) -> String {
    let q = 100.0 * (1.0 - 10f64.powf(-x));
    let s = format!("{q:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("p{s}")
}

/// Colours of the sides, in the order they are listed.
const COLOURS: [RGBColor; 5] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
];

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Other,
        format!("--plot: cannot draw {}: {e}", path.display()),
    )
}

/// One bar of a panel: its label and the values of every run (the bar is their median).
pub(crate) struct Bar {
    pub(crate) label: String,
    pub(crate) values: Vec<f64>,
}

/// How a panel's values are scaled.
#[derive(Clone, Copy)]
enum Scale {
    /// From zero, in the given unit (values are divided by it).
    Linear(f64),
    /// Powers of ten, from a decade below the least value.
    Log,
}

/// Draws one bar panel on `area`.
fn bars(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    y_desc: &str,
    bars: &[Bar],
    scale: Scale,
    path: &Path,
) -> Result<()> {
    let err = |e| plot_err(path, e);
    let t = |v: f64| match scale {
        Scale::Linear(unit) => v / unit,
        Scale::Log => v.max(1e-9).log10(),
    };
    let values: Vec<f64> = bars.iter().flat_map(|b| b.values.iter().copied()).collect();
    let hi = values.iter().copied().map(t).fold(f64::MIN, f64::max);
    let lo = values.iter().copied().map(t).fold(f64::MAX, f64::min);
    let (y0, y1) = match scale {
        Scale::Linear(_) => (0.0, if hi > 0.0 { hi * 1.15 } else { 1.0 }),
        Scale::Log if values.is_empty() => (0.0, 1.0),
        Scale::Log => (lo.floor() - 0.2, hi.ceil() + 0.1),
    };
    let n = bars.len().max(1) as i32;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(52)
        .build_cartesian_2d((0..n).into_segmented(), y0..y1)
        .map_err(err)?;
    let labels: Vec<String> = bars.iter().map(|b| b.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc(y_desc)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|y| match scale {
            Scale::Linear(_) => format!("{y:.1}"),
            Scale::Log => {
                let v = 10f64.powf(*y);
                if v >= 1.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            }
        })
        .draw()
        .map_err(err)?;
    for (i, bar) in bars.iter().enumerate() {
        let Some((median, least, most)) = crate::report::median_range(bar.values.clone()) else {
            continue;
        };
        let i = i as i32;
        let colour = COLOURS[i as usize % COLOURS.len()];
        let mut rect = Rectangle::new(
            [
                (SegmentValue::Exact(i), y0),
                (SegmentValue::Exact(i + 1), t(median)),
            ],
            colour.mix(0.75).filled(),
        );
        rect.set_margin(0, 0, 6, 6);
        chart.draw_series([rect]).map_err(err)?;
        let range = PathElement::new(
            vec![
                (SegmentValue::CenterOf(i), t(least)),
                (SegmentValue::CenterOf(i), t(most)),
            ],
            BLACK.stroke_width(2),
        );
        chart.draw_series([range]).map_err(err)?;
        chart
            .draw_series(
                bar.values
                    .iter()
                    .map(|v| Circle::new((SegmentValue::CenterOf(i), t(*v)), 3, BLACK.filled())),
            )
            .map_err(err)?;
    }
    Ok(())
}

/// The sides of a shape as (label, result) pairs, busway first.
fn sides(r: &ShapeResult) -> Vec<(String, &super::engine::SideResult)> {
    let mut out = vec![
        ("busway".to_string(), &r.busway),
        (r.raw_label().to_string(), &r.raw),
    ];
    out.extend(r.others.iter().map(|(name, s)| (name.clone(), s)));
    out
}

/// Writes the throughput and latency charts of a `busway-bench` run into `dir`; returns the
/// files written.
///
/// # Errors
/// The directory cannot be created or a chart cannot be written.
pub(crate) fn bench_charts(dir: &Path, results: &[ShapeResult]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::new(
            ErrorKind::Other,
            format!("--plot: cannot create {}: {e}", dir.display()),
        )
    })?;
    let Some(first) = results.first() else {
        return Ok(Vec::new());
    };
    let stem = format!("{}-{}", first.plan.transport.as_str(), first.plan.mode);
    let mut written = Vec::new();

    let mut shapes: Vec<Shape> = results
        .iter()
        .map(|r| r.plan.shape)
        .filter(|s| *s != Shape::Latency)
        .collect();
    shapes.dedup();
    if !shapes.is_empty() {
        let path = dir.join(format!("{stem}-throughput.svg"));
        let width = 260 * shapes.len() as u32 + 20;
        let root = SVGBackend::new(&path, (width.max(400), 340)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(&path, e))?;
        let root = root
            .titled(
                &format!(
                    "busway-bench --transport {} --mode {}: throughput (median, range, runs)",
                    first.plan.transport.as_str(),
                    first.plan.mode
                ),
                ("sans-serif", 18),
            )
            .map_err(|e| plot_err(&path, e))?;
        let panels = root.split_evenly((1, shapes.len()));
        for (shape, area) in shapes.iter().zip(&panels) {
            let runs: Vec<&ShapeResult> =
                results.iter().filter(|r| r.plan.shape == *shape).collect();
            let mut side_bars: Vec<Bar> = Vec::new();
            for r in &runs {
                for (label, s) in sides(r) {
                    let Some(rate) = s.rate() else { continue };
                    match side_bars.iter_mut().find(|b| b.label == label) {
                        Some(b) => b.values.push(rate),
                        None => side_bars.push(Bar {
                            label,
                            values: vec![rate],
                        }),
                    }
                }
            }
            let p = &runs[0].plan;
            let title = format!("{} ({}->{})", shape.as_str(), p.publishers, p.subscribers);
            bars(
                area,
                &title,
                "M msgs/s",
                &side_bars,
                Scale::Linear(1e6),
                &path,
            )?;
        }
        root.present().map_err(|e| plot_err(&path, e))?;
        written.push(path.clone());
    }

    let latency: Vec<&ShapeResult> = results
        .iter()
        .filter(|r| r.plan.shape == Shape::Latency)
        .collect();
    if !latency.is_empty() {
        let path = dir.join(format!("{stem}-latency.svg"));
        latency_chart(&path, &latency)?;
        written.push(path);
    }
    Ok(written)
}

/// Delay percentile curves of the latency shape, busway and raw, one line per run.
fn latency_chart(path: &Path, runs: &[&ShapeResult]) -> Result<()> {
    let err = |e| plot_err(path, e);
    let curves: Vec<(usize, &[(f64, f64)])> = runs
        .iter()
        .flat_map(|r| [(0, &r.busway.percentiles[..]), (1, &r.raw.percentiles[..])])
        .filter(|(_, c)| !c.is_empty())
        .collect();
    let us: Vec<f64> = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .collect();
    let lo = us.iter().copied().fold(f64::MAX, f64::min).max(0.1);
    let hi = us.iter().copied().fold(f64::MIN, f64::max).max(lo * 10.0);
    let p = &runs[0].plan;
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{} {}: delay at {:.0} msgs/s, {}->{} ({} runs)",
                p.transport.as_str(),
                p.mode,
                p.rate.unwrap_or(0.0),
                p.publishers,
                p.subscribers,
                runs.len()
            ),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0.3f64..4.0, (lo / 1.5..hi * 1.5).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("delay, µs")
        // Whole positions only: p90, p99, p99.9, p99.99.
        .x_labels(4)
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| {
            if *y >= 1.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            }
        })
        .draw()
        .map_err(err)?;
    let names = ["busway", runs[0].raw_label()];
    for (side, name) in names.iter().enumerate() {
        let colour = COLOURS[side];
        let mut labelled = false;
        for (_, curve) in curves.iter().filter(|(s, _)| *s == side) {
            let series = chart
                .draw_series(LineSeries::new(
                    curve.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(err)?;
            if !labelled {
                labelled = true;
                series.label(*name).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// One set-up of the scenario, over its runs.
pub(crate) struct SetupFigures {
    pub(crate) setup: String,
    pub(crate) cpu_per_million: Vec<f64>,
    pub(crate) p99_us: Vec<f64>,
}

/// Writes `scenario.svg` into `dir`: broker CPU per million messages and p99 per set-up, on
/// log scales.
///
/// # Errors
/// The directory cannot be created or the chart cannot be written.
pub(crate) fn scenario_chart(dir: &Path, title: &str, setups: &[SetupFigures]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::new(
            ErrorKind::Other,
            format!("--plot: cannot create {}: {e}", dir.display()),
        )
    })?;
    let path = dir.join("scenario.svg");
    let root = SVGBackend::new(&path, (820, 360)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_err(&path, e))?;
    let root = root
        .titled(title, ("sans-serif", 16))
        .map_err(|e| plot_err(&path, e))?;
    let panels = root.split_evenly((1, 2));
    let cpu: Vec<Bar> = setups
        .iter()
        .map(|s| Bar {
            label: s.setup.clone(),
            values: s.cpu_per_million.clone(),
        })
        .collect();
    let p99: Vec<Bar> = setups
        .iter()
        .map(|s| Bar {
            label: s.setup.clone(),
            values: s.p99_us.clone(),
        })
        .collect();
    bars(
        &panels[0],
        "broker CPU per million messages (log)",
        "CPU s / M msgs",
        &cpu,
        Scale::Log,
        &path,
    )?;
    bars(
        &panels[1],
        "end-to-end p99 (log)",
        "µs",
        &p99,
        Scale::Log,
        &path,
    )?;
    root.present().map_err(|e| plot_err(&path, e))?;
    Ok(path.clone())
}
