//! `vlmatch filter`: a new annotation file of the pairs whose chosen score
//! (from `vlmatch score`'s lines) is at or above a threshold (a tar shard
//! when the pairs came from shards), and a report:
//! pairs kept, pairs dropped per reason, and a histogram of the score, as
//! JSON and optionally as a PNG.

use super::score::{progress_path, PairScore, ScoreProgress};
use image::ImageEncoder;
use plotters::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmatch_core::{Error, Result};

/// The score a filter compares with its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum By {
    /// ITC similarity, in [-1, 1].
    Itc,
    /// ITM match probability.
    Itm,
    /// 1 - the highest word mismatch probability (needs `score --tokens`):
    /// a pair is kept only when every word fits the image well enough.
    WordMatch,
}

impl std::str::FromStr for By {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<By, String> {
        match s {
            "itc" => Ok(By::Itc),
            "itm" => Ok(By::Itm),
            "word-match" => Ok(By::WordMatch),
            _ => Err(format!("`{s}`: expected itc, itm or word-match")),
        }
    }
}

impl By {
    pub fn name(self) -> &'static str {
        match self {
            By::Itc => "itc",
            By::Itm => "itm",
            By::WordMatch => "word-match",
        }
    }

    /// The range the histogram spans.
    fn range(self) -> (f64, f64) {
        match self {
            By::Itc => (-1.0, 1.0),
            By::Itm | By::WordMatch => (0.0, 1.0),
        }
    }

    /// The pair's score, or why it has none.
    pub fn value(self, s: &PairScore) -> std::result::Result<f64, &'static str> {
        if s.error.is_some() {
            return Err("unreadable image");
        }
        let v = match self {
            By::Itc => s.itc.ok_or("no score")?,
            By::Itm => s.itm.ok_or("no score")?,
            By::WordMatch => {
                let words = s.words.as_ref().ok_or("no word scores")?;
                1.0 - words.iter().map(|w| w.mismatch).fold(0.0, f64::max)
            }
        };
        if v.is_nan() {
            return Err("not a number");
        }
        Ok(v)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Histogram {
    pub lo: f64,
    pub hi: f64,
    pub counts: Vec<usize>,
}

impl Histogram {
    pub fn new(lo: f64, hi: f64, bins: usize) -> Histogram {
        Histogram {
            lo,
            hi,
            counts: vec![0; bins.max(1)],
        }
    }
    pub fn add(&mut self, v: f64) {
        let n = self.counts.len();
        let at = ((v - self.lo) / (self.hi - self.lo) * n as f64).floor();
        self.counts[(at.max(0.0) as usize).min(n - 1)] += 1;
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FilterReport {
    pub scores: String,
    pub out: String,
    pub by: By,
    pub threshold: f64,
    pub pairs: usize,
    pub kept: usize,
    /// Pairs dropped, by reason (`below threshold`, `unreadable image`,
    /// `no word scores`, ...).
    pub dropped: BTreeMap<String, usize>,
    /// The chosen score of every scored pair.
    pub histogram: Histogram,
}

pub struct FilterOptions {
    pub by: By,
    pub threshold: f64,
    pub bins: usize,
    /// The report (default: OUT with `.report.json`).
    pub report: Option<PathBuf>,
    /// The histogram as a PNG.
    pub png: Option<PathBuf>,
}

/// Filter the score lines of `scores` into the annotation file `out`
/// (`{"image", "caption", "image_id"}` per kept pair, image paths as the
/// scored source named them).
pub fn filter(scores: &Path, out: &Path, opts: &FilterOptions) -> Result<FilterReport> {
    let record = progress_path(scores);
    // From shards (known by `score --out`'s record), kept pairs go to a
    // new shard.
    let mut shards: Option<super::index::SourceSpec> = None;
    if record.is_file() {
        let text = std::fs::read_to_string(&record).map_err(|e| Error::io(&record, e))?;
        if let Ok(r) = serde_json::from_str::<ScoreProgress>(&text) {
            if r.pairs < r.total {
                return Err(Error::Config(format!(
                    "--scores {}: scoring stopped at pair {} of {}; run the same `vlmatch \
                     score` again to finish it",
                    scores.display(),
                    r.pairs,
                    r.total
                )));
            }
            if r.source.kind == "shards" {
                shards = Some(r.source);
            }
        }
    }
    let to_tar = out.extension().is_some_and(|e| e == "tar");
    if to_tar != shards.is_some() {
        return Err(Error::Config(format!(
            "--out {}: {}",
            out.display(),
            if to_tar {
                "a .tar shard is written from the scores of tar shards (`score --out` of \
                 shards); these scores are of an annotation file: give an annotation file name"
            } else {
                "these scores are of tar shards: give a shard name ending in .tar"
            }
        )));
    }
    let text = vlmatch_registry::check::read_utf8(scores)?;
    let (lo, hi) = opts.by.range();
    let mut report = FilterReport {
        scores: scores.display().to_string(),
        out: out.display().to_string(),
        by: opts.by,
        threshold: opts.threshold,
        pairs: 0,
        kept: 0,
        dropped: BTreeMap::new(),
        histogram: Histogram::new(lo, hi, opts.bins),
    };
    let mut kept = String::new();
    let mut kept_pairs: Vec<(usize, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let s: PairScore = serde_json::from_str(line).map_err(|e| Error::Data {
            path: scores.to_path_buf(),
            line: Some(n + 1),
            message: format!("expected a line of `vlmatch score`: {e}"),
        })?;
        report.pairs += 1;
        match opts.by.value(&s) {
            Ok(v) => {
                report.histogram.add(v);
                if v >= opts.threshold {
                    report.kept += 1;
                    kept_pairs.push((s.pair, s.caption.clone()));
                    kept += &serde_json::to_string(&serde_json::json!({
                        "image": s.image,
                        "caption": s.caption,
                        "image_id": s.image_id,
                    }))
                    .expect("serialisable");
                    kept.push('\n');
                } else {
                    *report.dropped.entry("below threshold".into()).or_default() += 1;
                }
            }
            Err(why) => *report.dropped.entry(why.into()).or_default() += 1,
        }
    }
    match &shards {
        None => crate::durable::write(out, kept)?,
        Some(source) => {
            let ds =
                crate::data::load_any_with(&source.data, None, None, crate::data::OnError::Skip)?;
            if let Some((p, _)) = kept_pairs
                .iter()
                .find(|(p, c)| !matches!(ds.pairs.get(*p), Some(x) if &x.caption == c))
            {
                return Err(Error::Config(format!(
                    "--scores {}: pair {p} is not the pair the shards `{}` hold now; score \
                     them again",
                    scores.display(),
                    source.data
                )));
            }
            let pairs: Vec<usize> = kept_pairs.iter().map(|(p, _)| *p).collect();
            super::shards_out::write_shard(&ds, &pairs, out)?;
        }
    }
    let report_path = opts.report.clone().unwrap_or_else(|| {
        let mut p = out.as_os_str().to_owned();
        p.push(".report.json");
        PathBuf::from(p)
    });
    crate::durable::write(
        &report_path,
        serde_json::to_string_pretty(&report).expect("serialisable") + "\n",
    )?;
    if let Some(png) = &opts.png {
        draw_histogram(&report, png)?;
    }
    Ok(report)
}

fn fail(e: impl std::fmt::Display) -> Error {
    Error::Config(format!("cannot draw the histogram: {e}"))
}

/// The report's histogram as a PNG: kept bins blue, dropped grey, the
/// threshold a red line.
pub fn draw_histogram(report: &FilterReport, png: &Path) -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, crate::plot::FONT)
        .map_err(|_| fail("the embedded font does not parse"))?;
    let (w, h) = (720u32, 420u32);
    let hist = &report.histogram;
    let n = hist.counts.len();
    let width = (hist.hi - hist.lo) / n as f64;
    let top = hist.counts.iter().copied().max().unwrap_or(0).max(1) as f64 * 1.1;
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        let title = format!(
            "{} score: {} kept, {} dropped (threshold {})",
            report.by.name(),
            report.kept,
            report.pairs - report.kept,
            report.threshold
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(hist.lo..hist.hi, 0.0..top)
            .map_err(fail)?;
        chart
            .configure_mesh()
            .x_desc("score")
            .y_desc("pairs")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(fail)?;
        let blue = RGBColor(31, 119, 180);
        let grey = RGBColor(160, 160, 160);
        chart
            .draw_series(hist.counts.iter().enumerate().map(|(b, &c)| {
                let x0 = hist.lo + b as f64 * width;
                let color = if x0 + width / 2.0 >= report.threshold {
                    blue
                } else {
                    grey
                };
                Rectangle::new([(x0, 0.0), (x0 + width * 0.95, c as f64)], color.filled())
            }))
            .map_err(fail)?;
        let t = report.threshold.clamp(hist.lo, hist.hi);
        chart
            .draw_series(std::iter::once(PathElement::new(
                [(t, 0.0), (t, top)],
                RED.stroke_width(2),
            )))
            .map_err(fail)?;
        root.present().map_err(fail)?;
    }
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(&buf, w, h, image::ExtendedColorType::Rgb8)
        .map_err(fail)?;
    crate::durable::write(png, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_bins_cover_the_range_ends() {
        let mut h = Histogram::new(0.0, 1.0, 4);
        for v in [0.0, 0.24, 0.25, 0.99, 1.0, -0.5, 1.5] {
            h.add(v);
        }
        assert_eq!(h.counts, [3, 1, 0, 3]);
    }
}
