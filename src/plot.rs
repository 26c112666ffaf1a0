//! `vlmatch plot`: learning curves of one or more runs, from their
//! `metrics.jsonl` and `eval.jsonl`, on shared axes, as SVG or PNG.
//!
//! Metric keys are those of `tracking::flatten`: a `metrics.jsonl` field by
//! its name (`loss`, `itm_acc`, `lr`), a held-out value by its dotted path
//! in `eval.jsonl` (`matching.itm_acc`, `retrieval.i2t_r1`); a run's final
//! `eval-heldout.json` adds its step when `eval.jsonl` lacks it. With
//! `group_seeds`, runs whose `config.toml` differ only in `train.seed` are
//! drawn as one curve, the mean over seeds at the steps they all logged,
//! with a band from the lowest to the highest seed.
//!
//! Text is drawn with DejaVu Sans embedded in the binary
//! (`assets/fonts`), so a PNG has its labels on a machine without fonts;
//! an SVG names the font family and leaves the drawing to the viewer.

use crate::tracking::flatten;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmatch_core::{Error, Result};

/// DejaVu Sans 2.37 (Bitstream Vera licence: `assets/fonts/LICENSE-DejaVu.txt`).
pub(crate) const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// What to draw.
#[derive(Debug, Clone)]
pub struct PlotSpec {
    pub runs: Vec<PathBuf>,
    pub metrics: Vec<String>,
    /// `.svg` or `.png`.
    pub out: PathBuf,
    pub group_seeds: bool,
    pub title: Option<String>,
    pub size: (u32, u32),
}

/// `vlmatch plot`'s arguments.
#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// Run directories (each with metrics.jsonl and/or eval.jsonl).
    #[arg(required = true, value_name = "RUN")]
    pub runs: Vec<PathBuf>,
    /// A metric to draw; repeat for several on the same axes.
    #[arg(long = "metric", required = true, value_name = "KEY")]
    pub metrics: Vec<String>,
    /// The figure: FILE.svg or FILE.png.
    #[arg(long)]
    pub out: PathBuf,
    /// One curve per group of runs whose configs differ only in
    /// `train.seed`: the mean over seeds, with a min-max band.
    #[arg(long)]
    pub group_seeds: bool,
    /// Title (default: the metric keys).
    #[arg(long)]
    pub title: Option<String>,
    /// Width and height in pixels.
    #[arg(long, default_value = "960x540", value_parser = parse_size)]
    pub size: (u32, u32),
}

fn parse_size(s: &str) -> std::result::Result<(u32, u32), String> {
    let bad = || format!("`{s}`: expected WIDTHxHEIGHT, e.g. 960x540");
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    match (w.parse(), h.parse()) {
        (Ok(w @ 100..=8000), Ok(h @ 100..=8000)) => Ok((w, h)),
        _ => Err(bad()),
    }
}

impl From<PlotArgs> for PlotSpec {
    fn from(a: PlotArgs) -> PlotSpec {
        PlotSpec {
            runs: a.runs,
            metrics: a.metrics,
            out: a.out,
            group_seeds: a.group_seeds,
            title: a.title,
            size: a.size,
        }
    }
}

/// One run directory's scalars: key -> (step, value), steps ascending.
#[derive(Debug)]
pub struct RunCurves {
    pub dir: PathBuf,
    pub series: BTreeMap<String, Vec<(i64, f64)>>,
}

impl RunCurves {
    /// Reads `metrics.jsonl`, `eval.jsonl` and `eval-heldout.json`, those
    /// present; a run with none of them is an error naming the directory.
    pub fn load(dir: &Path) -> Result<RunCurves> {
        if !dir.is_dir() {
            return Err(Error::Config(format!(
                "run directory {} does not exist",
                dir.display()
            )));
        }
        let mut series: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
        let mut found = false;
        for name in ["metrics.jsonl", "eval.jsonl"] {
            let path = dir.join(name);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            found = true;
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let bad = |message: String| Error::Data {
                    path: path.clone(),
                    line: Some(i + 1),
                    message,
                };
                let v: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
                let step = v
                    .get("step")
                    .and_then(Value::as_i64)
                    .ok_or_else(|| bad("no integer `step`".into()))?;
                for (k, x) in flatten(&v) {
                    series.entry(k).or_default().push((step, x));
                }
            }
        }
        let final_eval = dir.join("eval-heldout.json");
        if let Ok(text) = std::fs::read_to_string(&final_eval) {
            found = true;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::Data {
                path: final_eval.clone(),
                line: None,
                message: e.to_string(),
            })?;
            if let Some(step) = v.get("step").and_then(Value::as_i64) {
                for (k, x) in flatten(&v) {
                    let s = series.entry(k).or_default();
                    if !s.iter().any(|&(t, _)| t == step) {
                        s.push((step, x));
                    }
                }
            }
        }
        if !found {
            return Err(Error::Config(format!(
                "run directory {} has no metrics.jsonl, eval.jsonl or eval-heldout.json",
                dir.display()
            )));
        }
        for s in series.values_mut() {
            s.sort_by_key(|&(t, _)| t);
        }
        Ok(RunCurves {
            dir: dir.to_path_buf(),
            series,
        })
    }

    /// The finite points of `key`, or an error listing the keys there are.
    pub fn metric(&self, key: &str) -> Result<Vec<(i64, f64)>> {
        match self.series.get(key) {
            Some(s) => Ok(s.iter().copied().filter(|(_, x)| x.is_finite()).collect()),
            None => Err(Error::Config(format!(
                "run {} has no metric `{key}`; it has: {}",
                self.dir.display(),
                self.series.keys().cloned().collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

/// A curve to draw: a line, and a band where seeds were grouped.
#[derive(Debug)]
pub struct Curve {
    pub label: String,
    pub line: Vec<(i64, f64)>,
    /// (step, lowest, highest) over the group's runs.
    pub band: Vec<(i64, f64, f64)>,
}

/// Runs in groups: each run alone, or (`group_seeds`) those whose
/// `config.toml` is the same once `train.seed` is removed; in the order the
/// runs were given.
pub fn group_runs(runs: &[PathBuf], group_seeds: bool) -> Result<Vec<Vec<PathBuf>>> {
    if !group_seeds {
        return Ok(runs.iter().map(|r| vec![r.clone()]).collect());
    }
    let mut groups: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for run in runs {
        let path = run.join("config.toml");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let mut cfg: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Data {
            path: path.clone(),
            line: None,
            message: e.message().to_string(),
        })?;
        if let Some(toml::Value::Table(train)) = cfg.get_mut("train") {
            train.remove("seed");
        }
        let key = toml::to_string(&cfg).expect("a parsed table serialises");
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(run.clone()),
            None => groups.push((key, vec![run.clone()])),
        }
    }
    Ok(groups.into_iter().map(|(_, g)| g).collect())
}

/// A run's name in the legend: its directory's name.
fn run_name(dir: &Path) -> String {
    dir.file_name()
        .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into())
}

/// A group's name: the members' common name without a seed suffix
/// (`baseline-s1`, `baseline-s2` -> `baseline`).
fn group_name(dirs: &[PathBuf]) -> String {
    let names: Vec<String> = dirs.iter().map(|d| run_name(d)).collect();
    if names.len() == 1 {
        return names[0].clone();
    }
    let strip = |n: &str| -> String {
        let base = n.trim_end_matches(|c: char| c.is_ascii_digit());
        let base = base
            .strip_suffix("seed")
            .or_else(|| base.strip_suffix('s'))
            .unwrap_or(base);
        base.trim_end_matches(['-', '_', '.']).to_string()
    };
    let first = strip(&names[0]);
    if !first.is_empty() && names.iter().all(|n| strip(n) == first) {
        return first;
    }
    names.join("+")
}

/// The curves of `metric` for each group of runs.
pub fn curves(groups: &[Vec<RunCurves>], metric: &str, suffix: bool) -> Result<Vec<Curve>> {
    let mut out = Vec::new();
    for group in groups {
        let dirs: Vec<PathBuf> = group.iter().map(|r| r.dir.clone()).collect();
        let mut label = group_name(&dirs);
        if group.len() > 1 {
            label.push_str(&format!(" ({} seeds: mean, min–max band)", group.len()));
        }
        if suffix {
            label.push_str(&format!(": {metric}"));
        }
        let series = group
            .iter()
            .map(|r| r.metric(metric))
            .collect::<Result<Vec<_>>>()?;
        if series.len() == 1 {
            out.push(Curve {
                label,
                line: series.into_iter().next().expect("one"),
                band: Vec::new(),
            });
            continue;
        }
        // The steps every seed logged.
        let mut at: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
        for s in &series {
            for &(t, x) in s {
                at.entry(t).or_default().push(x);
            }
        }
        at.retain(|_, xs| xs.len() == series.len());
        if at.is_empty() {
            return Err(Error::Config(format!(
                "the runs {} have no step in common for `{metric}`",
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let line = at
            .iter()
            .map(|(&t, xs)| (t, xs.iter().sum::<f64>() / xs.len() as f64))
            .collect();
        let band = at
            .iter()
            .map(|(&t, xs)| {
                let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (t, lo, hi)
            })
            .collect();
        out.push(Curve { label, line, band });
    }
    Ok(out)
}

/// Loads the runs, computes the curves and writes the figure.
pub fn plot(spec: &PlotSpec) -> Result<()> {
    if spec.runs.is_empty() || spec.metrics.is_empty() {
        return Err(Error::Config(
            "plot needs at least one run directory and one --metric".into(),
        ));
    }
    let groups = group_runs(&spec.runs, spec.group_seeds)?;
    let groups: Vec<Vec<RunCurves>> = groups
        .iter()
        .map(|g| g.iter().map(|d| RunCurves::load(d)).collect())
        .collect::<Result<_>>()?;
    let mut all = Vec::new();
    for metric in &spec.metrics {
        all.extend(curves(&groups, metric, spec.metrics.len() > 1)?);
    }
    let title = spec
        .title
        .clone()
        .unwrap_or_else(|| spec.metrics.join(", "));
    let y_label = match spec.metrics.as_slice() {
        [one] => one.as_str(),
        _ => "value",
    };
    let ext = spec
        .out
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    // The font is registered for every figure: plotters keeps fonts in a
    // process-wide table, and registering again replaces the entry.
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| Error::Config("the embedded font does not parse".into()))?;
    let (w, h) = spec.size;
    let drawn = match ext.as_deref() {
        Some("svg") => {
            let root = SVGBackend::new(&spec.out, (w, h)).into_drawing_area();
            draw(&root, &all, &title, y_label).and_then(|()| root.present().map_err(fail))
        }
        Some("png") => {
            let mut buf = vec![0u8; w as usize * h as usize * 3];
            {
                let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
                draw(&root, &all, &title, y_label)?;
                root.present().map_err(fail)?;
            }
            image::save_buffer(&spec.out, &buf, w, h, image::ExtendedColorType::Rgb8)
                .map_err(|e| fail(format!("{e}")))
        }
        _ => {
            return Err(Error::Config(format!(
                "--out {}: the figure's file name must end in .svg or .png",
                spec.out.display()
            )))
        }
    };
    drawn.map_err(|e| match e {
        Error::Config(m) => Error::Config(format!("cannot draw {}: {m}", spec.out.display())),
        e => e,
    })
}

fn fail(e: impl std::fmt::Display) -> Error {
    Error::Config(e.to_string())
}

/// Matplotlib's `tab10`: ten colours readers tell apart.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    curves: &[Curve],
    title: &str,
    y_label: &str,
) -> Result<()> {
    root.fill(&WHITE).map_err(fail)?;
    let xs = curves.iter().flat_map(|c| c.line.iter().map(|p| p.0));
    let (x0, x1) = xs.fold((i64::MAX, i64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let ys = curves.iter().flat_map(|c| {
        c.line
            .iter()
            .map(|p| p.1)
            .chain(c.band.iter().flat_map(|b| [b.1, b.2]))
    });
    let (y0, y1) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    if x0 > x1 || !y0.is_finite() {
        return Err(Error::Config("no finite point to draw".into()));
    }
    let (x1, pad) = (x1.max(x0 + 1), ((y1 - y0) * 0.05).max(1e-9));
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .margin_right(28)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x0 as f64..x1 as f64, (y0 - pad)..(y1 + pad))
        .map_err(fail)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(fail)?;
    for (i, c) in curves.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        if !c.band.is_empty() {
            let outline: Vec<(f64, f64)> = c
                .band
                .iter()
                .map(|&(t, lo, _)| (t as f64, lo))
                .chain(c.band.iter().rev().map(|&(t, _, hi)| (t as f64, hi)))
                .collect();
            chart
                .draw_series(std::iter::once(Polygon::new(outline, color.mix(0.18))))
                .map_err(fail)?;
        }
        let points = c.line.iter().map(|&(t, y)| (t as f64, y));
        // Sparse curves (held-out evaluations) show their points.
        let dots = if c.line.len() <= 40 { 3 } else { 0 };
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(dots))
            .map_err(fail)?
            .label(c.label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    // The legend goes where the curves are not: below them when they rise.
    let rising = curves
        .iter()
        .filter_map(|c| Some(c.line.last()?.1 - c.line.first()?.1))
        .sum::<f64>()
        > 0.0;
    chart
        .configure_series_labels()
        .position(if rising {
            SeriesLabelPosition::LowerRight
        } else {
            SeriesLabelPosition::UpperRight
        })
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(fail)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_suffixes_name_the_group() {
        let g = |names: &[&str]| group_name(&names.iter().map(PathBuf::from).collect::<Vec<_>>());
        assert_eq!(g(&["r/baseline-s1", "r/baseline-s2"]), "baseline");
        assert_eq!(
            g(&["a/vlmatch_neggen-seed3", "b/vlmatch_neggen-seed4"]),
            "vlmatch_neggen"
        );
        assert_eq!(g(&["x/one", "x/two"]), "one+two");
        assert_eq!(g(&["x/only-s1"]), "only-s1");
    }
}
