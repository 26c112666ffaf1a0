//! The built-in dataset: procedurally generated scenes of one to three
//! shapes, each with a color, a size and a position on a 3x3 grid, over a
//! colored background, with several captions per scene ("a small red circle
//! to the left of a large blue square"). Deterministic from a seed; nothing
//! to download. Captions name colors, shapes, sizes and positions, so a model
//! must bind attributes to objects to match them, which is exactly what
//! fine-grained matching tests.

use crate::rng::{mix, Rng};

pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "diamond"];
pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 215, 40]),
    ("purple", [140, 50, 180]),
    ("orange", [245, 140, 30]),
];
pub const BACKGROUNDS: [(&str, [u8; 3]); 3] = [
    ("gray", [128, 128, 128]),
    ("black", [20, 20, 20]),
    ("white", [240, 240, 240]),
];
pub const SIZES: [&str; 2] = ["small", "large"];
const COLS: [&str; 3] = ["left", "center", "right"];
const ROWS: [&str; 3] = ["top", "middle", "bottom"];
const COUNTS: [&str; 3] = ["one", "two", "three"];

/// Every word a caption may contain (the built-in vocabulary's words).
pub const WORDS: &[&str] = &[
    "a",
    "an",
    "and",
    "the",
    "of",
    "on",
    "in",
    "at",
    "to",
    "is",
    "there",
    "are",
    "with",
    "picture",
    "image",
    "shape",
    "shapes",
    "background",
    "corner",
    "side",
    "left",
    "right",
    "center",
    "top",
    "middle",
    "bottom",
    "above",
    "below",
    "next",
    "one",
    "two",
    "three",
    "small",
    "large",
    "circle",
    "square",
    "triangle",
    "diamond",
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "gray",
    "black",
    "white",
    "circles",
    "squares",
    "triangles",
    "diamonds",
];

#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub shape: usize,
    pub color: usize,
    pub size: usize,
    /// Grid cell: column and row in 0..3.
    pub col: usize,
    pub row: usize,
    /// Offset from the cell center, in cell fractions, for variety.
    pub jitter: (f32, f32),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub background: usize,
    pub objects: Vec<Object>,
}

impl Scene {
    /// The scene with index `index` of the generator seeded by `seed`.
    pub fn generate(seed: u64, index: u64) -> Scene {
        let mut rng = Rng::new(mix(&[seed, index]));
        let background = rng.below(BACKGROUNDS.len());
        let n = 1 + rng.below(3);
        let mut cells: Vec<usize> = (0..9).collect();
        rng.shuffle(&mut cells);
        let objects = cells[..n]
            .iter()
            .map(|&cell| Object {
                shape: rng.below(SHAPES.len()),
                color: rng.below(COLORS.len()),
                size: rng.below(SIZES.len()),
                col: cell % 3,
                row: cell / 3,
                jitter: ((rng.unit() - 0.5) * 0.3, (rng.unit() - 0.5) * 0.3),
            })
            .collect();
        Scene {
            background,
            objects,
        }
    }

    /// RGB pixels, row-major `[size, size, 3]`.
    pub fn render(&self, size: usize) -> Vec<u8> {
        let bg = BACKGROUNDS[self.background].1;
        let mut px: Vec<u8> = bg.iter().copied().cycle().take(size * size * 3).collect();
        let cell = size as f32 / 3.0;
        for o in &self.objects {
            let cx = (o.col as f32 + 0.5 + o.jitter.0) * cell;
            let cy = (o.row as f32 + 0.5 + o.jitter.1) * cell;
            let r = cell * if o.size == 0 { 0.22 } else { 0.42 };
            let color = COLORS[o.color].1;
            let (x0, x1) = (
                ((cx - r).floor().max(0.0)) as usize,
                ((cx + r).ceil() as usize).min(size),
            );
            let (y0, y1) = (
                ((cy - r).floor().max(0.0)) as usize,
                ((cy + r).ceil() as usize).min(size),
            );
            for y in y0..y1 {
                for x in x0..x1 {
                    let dx = (x as f32 + 0.5 - cx) / r;
                    let dy = (y as f32 + 0.5 - cy) / r;
                    let inside = match SHAPES[o.shape] {
                        "circle" => dx * dx + dy * dy <= 1.0,
                        "square" => dx.abs() <= 0.8 && dy.abs() <= 0.8,
                        "triangle" => (-0.9..=0.8).contains(&dy) && dx.abs() <= (dy + 0.9) * 0.55,
                        _ => dx.abs() + dy.abs() <= 1.0,
                    };
                    if inside {
                        let i = (y * size + x) * 3;
                        px[i..i + 3].copy_from_slice(&color);
                    }
                }
            }
        }
        px
    }

    /// `count` distinct captions (fewer if the scene has fewer phrasings),
    /// chosen by `seed`.
    pub fn captions(&self, seed: u64, count: usize) -> Vec<String> {
        let mut all = self.phrasings();
        all.dedup();
        let mut rng = Rng::new(seed);
        rng.shuffle(&mut all);
        // The full description always comes first, so every scene has one
        // caption that pins down all its attributes.
        let full = self.describe_all(true);
        all.retain(|c| *c != full);
        let mut out = vec![full];
        out.extend(all.into_iter().take(count.saturating_sub(1)));
        out
    }

    fn noun(o: &Object, size: bool) -> String {
        let color = COLORS[o.color].0;
        let shape = SHAPES[o.shape];
        if size {
            format!("a {} {color} {shape}", SIZES[o.size])
        } else {
            format!("a {color} {shape}")
        }
    }

    fn place(o: &Object) -> String {
        match (ROWS[o.row], COLS[o.col]) {
            ("middle", "center") => "in the center".into(),
            ("middle", c) => format!("on the {c} side"),
            (r, "center") => format!("at the {r}"),
            (r, c) => format!("in the {r} {c} corner"),
        }
    }

    fn list(parts: &[String]) -> String {
        match parts {
            [] => String::new(),
            [one] => one.clone(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        }
    }

    fn describe_all(&self, size: bool) -> String {
        let bg = BACKGROUNDS[self.background].0;
        let parts: Vec<String> = self
            .objects
            .iter()
            .map(|o| format!("{} {}", Self::noun(o, size), Self::place(o)))
            .collect();
        format!("{} on a {bg} background", Self::list(&parts))
    }

    fn relation(a: &Object, b: &Object) -> Option<&'static str> {
        if a.col < b.col {
            Some("to the left of")
        } else if a.col > b.col {
            Some("to the right of")
        } else if a.row < b.row {
            Some("above")
        } else if a.row > b.row {
            Some("below")
        } else {
            None
        }
    }

    fn phrasings(&self) -> Vec<String> {
        let bg = BACKGROUNDS[self.background].0;
        let n = self.objects.len();
        let mut out = vec![self.describe_all(false)];
        let nouns: Vec<String> = self.objects.iter().map(|o| Self::noun(o, true)).collect();
        out.push(format!("{} on a {bg} background", Self::list(&nouns)));
        for o in &self.objects {
            out.push(format!("{} {}", Self::noun(o, true), Self::place(o)));
        }
        for (i, a) in self.objects.iter().enumerate() {
            for b in self.objects.iter().skip(i + 1) {
                if let Some(rel) = Self::relation(a, b) {
                    out.push(format!(
                        "{} {rel} {}",
                        Self::noun(a, true),
                        Self::noun(b, true)
                    ));
                }
            }
        }
        if n > 1 {
            let nouns: Vec<String> = self.objects.iter().map(|o| Self::noun(o, false)).collect();
            out.push(format!(
                "a picture of {} shapes: {}",
                COUNTS[n - 1],
                Self::list(&nouns)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenes_are_deterministic_and_varied() {
        assert_eq!(Scene::generate(7, 3), Scene::generate(7, 3));
        let distinct: std::collections::HashSet<String> = (0..50)
            .map(|i| Scene::generate(7, i).describe_all(true))
            .collect();
        assert!(
            distinct.len() >= 49,
            "only {} distinct scenes of 50",
            distinct.len()
        );
    }

    #[test]
    fn captions_use_only_vocabulary_words() {
        for i in 0..200 {
            for c in Scene::generate(1, i).captions(i, 5) {
                for w in c.split_whitespace() {
                    let w = w.trim_end_matches([',', ':']);
                    assert!(WORDS.contains(&w), "`{w}` in `{c}` is not in WORDS");
                }
            }
        }
    }

    #[test]
    fn render_paints_each_object_color() {
        let s = Scene::generate(3, 11);
        let px = s.render(48);
        for o in &s.objects {
            let c = COLORS[o.color].1;
            assert!(px.chunks(3).any(|p| p == c), "color of {o:?} not painted");
        }
    }
}
