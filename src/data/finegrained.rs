//! The fine-grained held-out suite of the built-in data: for a scene of the
//! scene model ([`super::synthetic`]), a caption true of it and, for each
//! kind of mismatch, one negative that differs from the caption in exactly
//! that way and is false of the scene by the scene model's truth function
//! ([`Statement::holds`]). Kinds are kept apart:
//!
//! - `color`, `size`, `shape` (attribute swap): one object's attribute
//!   replaced by a value another object of the scene has (a value no object
//!   has would be `absent`);
//! - `binding`: one attribute exchanged between two objects ("a small red
//!   circle and a small blue square" vs "a small blue circle and a small red
//!   square");
//! - `relation`: left/right or above/below exchanged;
//! - `count`: the number of shapes changed (within the scene model's 1-3);
//! - `absent`: a color, shape or size that no object of the scene has, in
//!   place of one an object has.
//!
//! A kind that cannot be made for a scene (one object: no binding, no
//! relation, no attribute swap) is skipped for it. Choices are drawn with the
//! suite's own seed ([`SEED`]) and the scene's index, so every model is
//! scored on the same cases.

use super::synthetic::{Object, Scene, BACKGROUNDS, COLORS, SHAPES, SIZES};
use crate::rng::{mix, Rng};

/// The suite's own seed, mixed with a scene's index and the kind.
pub const SEED: u64 = 0xF1E6_5017_7E57;

const COUNTS: [&str; 3] = ["one", "two", "three"];

/// A kind of mismatch between a caption and its negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Color,
    Size,
    Shape,
    Binding,
    Relation,
    Count,
    Absent,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Color,
        Kind::Size,
        Kind::Shape,
        Kind::Binding,
        Kind::Relation,
        Kind::Count,
        Kind::Absent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Color => "color",
            Kind::Size => "size",
            Kind::Shape => "shape",
            Kind::Binding => "binding",
            Kind::Relation => "relation",
            Kind::Count => "count",
            Kind::Absent => "absent",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Every kind's name, for messages: "color, size, ..., absent".
    pub fn names() -> String {
        Kind::ALL.map(Kind::as_str).join(", ")
    }
}

/// An attribute of an object that captions name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attr {
    Color,
    Size,
    Shape,
}

impl Attr {
    pub const ALL: [Attr; 3] = [Attr::Color, Attr::Size, Attr::Shape];

    /// How many values the attribute has.
    pub fn values(self) -> usize {
        match self {
            Attr::Color => COLORS.len(),
            Attr::Size => SIZES.len(),
            Attr::Shape => SHAPES.len(),
        }
    }

    /// The word for value `v`.
    pub fn word(self, v: usize) -> &'static str {
        match self {
            Attr::Color => COLORS[v].0,
            Attr::Size => SIZES[v],
            Attr::Shape => SHAPES[v],
        }
    }

    /// The value named by `word`, if it is one of this attribute's words.
    pub fn value(self, word: &str) -> Option<usize> {
        (0..self.values()).find(|&v| self.word(v) == word)
    }

    fn of(self, o: &Object) -> usize {
        Noun::of(o).get(self)
    }
}

/// One object as a caption names it: "a small red circle".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Noun {
    pub size: usize,
    pub color: usize,
    pub shape: usize,
}

impl Noun {
    pub fn of(o: &Object) -> Noun {
        Noun {
            size: o.size,
            color: o.color,
            shape: o.shape,
        }
    }

    pub fn get(&self, a: Attr) -> usize {
        match a {
            Attr::Color => self.color,
            Attr::Size => self.size,
            Attr::Shape => self.shape,
        }
    }

    pub fn with(mut self, a: Attr, v: usize) -> Noun {
        match a {
            Attr::Color => self.color = v,
            Attr::Size => self.size = v,
            Attr::Shape => self.shape = v,
        }
        self
    }

    /// Whether `o` is such an object.
    pub fn fits(&self, o: &Object) -> bool {
        *self == Noun::of(o)
    }

    fn text(&self) -> String {
        format!(
            "a {} {} {}",
            SIZES[self.size], COLORS[self.color].0, SHAPES[self.shape]
        )
    }

    fn parse(text: &str) -> Option<Noun> {
        let words: Vec<&str> = text.split(' ').collect();
        let ["a", size, color, shape] = words[..] else {
            return None;
        };
        Some(Noun {
            size: Attr::Size.value(size)?,
            color: Attr::Color.value(color)?,
            shape: Attr::Shape.value(shape)?,
        })
    }
}

/// Where one object is against another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];

    pub fn text(self) -> &'static str {
        match self {
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// Left and right, above and below exchanged.
    pub fn opposite(self) -> Relation {
        match self {
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
        }
    }

    /// Whether `a` stands so to `b` on the scene's 3x3 grid (columns left
    /// to right, rows top to bottom).
    pub fn holds(self, a: &Object, b: &Object) -> bool {
        match self {
            Relation::LeftOf => a.col < b.col,
            Relation::RightOf => a.col > b.col,
            Relation::Above => a.row < b.row,
            Relation::Below => a.row > b.row,
        }
    }
}

/// What a suite caption (or negative) says about a scene.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    /// "a small red circle and a large blue square on a gray background":
    /// the scene has a distinct object for each noun, in any order.
    Objects { nouns: Vec<Noun>, background: usize },
    /// "a small red circle to the left of a large blue square": two distinct
    /// objects of the scene stand so.
    Relation {
        a: Noun,
        relation: Relation,
        b: Noun,
    },
    /// "a picture of two shapes on a gray background": the scene has that
    /// many objects.
    Count { count: usize, background: usize },
}

impl Statement {
    /// The statement in words (the built-in vocabulary's).
    pub fn text(&self) -> String {
        let bg = |b: usize| format!("on a {} background", BACKGROUNDS[b].0);
        match self {
            Statement::Objects { nouns, background } => {
                let parts: Vec<String> = nouns.iter().map(Noun::text).collect();
                let list = match &parts[..] {
                    [] => String::new(),
                    [one] => one.clone(),
                    [init @ .., last] => format!("{} and {last}", init.join(", ")),
                };
                format!("{list} {}", bg(*background))
            }
            Statement::Relation { a, relation, b } => {
                format!("{} {} {}", a.text(), relation.text(), b.text())
            }
            Statement::Count { count, background } => format!(
                "a picture of {} {} {}",
                COUNTS[count - 1],
                if *count == 1 { "shape" } else { "shapes" },
                bg(*background)
            ),
        }
    }

    /// The statement `text` ([`Statement::text`]) says, if it is one.
    pub fn parse(text: &str) -> Option<Statement> {
        fn background(s: &str) -> Option<(&str, usize)> {
            let (head, bg) = s.strip_suffix(" background")?.rsplit_once(" on a ")?;
            Some((head, BACKGROUNDS.iter().position(|b| b.0 == bg)?))
        }
        if let Some(rest) = text.strip_prefix("a picture of ") {
            let (head, background) = background(rest)?;
            let (word, noun) = head.split_once(' ')?;
            let count = COUNTS.iter().position(|w| *w == word)? + 1;
            let want = if count == 1 { "shape" } else { "shapes" };
            return (noun == want).then_some(Statement::Count { count, background });
        }
        for relation in Relation::ALL {
            if let Some((a, b)) = text.split_once(&format!(" {} ", relation.text())) {
                return Some(Statement::Relation {
                    a: Noun::parse(a)?,
                    relation,
                    b: Noun::parse(b)?,
                });
            }
        }
        let (list, background) = background(text)?;
        let (init, last) = match list.rsplit_once(" and ") {
            Some((init, last)) => (init.split(", ").collect(), last),
            None => (Vec::new(), list),
        };
        let nouns = init
            .into_iter()
            .chain([last])
            .map(Noun::parse)
            .collect::<Option<Vec<Noun>>>()?;
        Some(Statement::Objects { nouns, background })
    }

    /// The scene model's truth function: whether the statement is true of
    /// `scene`.
    pub fn holds(&self, scene: &Scene) -> bool {
        let objects = &scene.objects;
        match self {
            Statement::Objects { nouns, background } => {
                *background == scene.background
                    && distinct_fits(nouns, objects, &mut vec![false; objects.len()])
            }
            Statement::Relation { a, relation, b } => objects.iter().enumerate().any(|(i, oa)| {
                a.fits(oa)
                    && objects
                        .iter()
                        .enumerate()
                        .any(|(j, ob)| i != j && b.fits(ob) && relation.holds(oa, ob))
            }),
            Statement::Count { count, background } => {
                *count == objects.len() && *background == scene.background
            }
        }
    }
}

/// Whether each of `nouns` fits a distinct object of `objects` not `used`.
fn distinct_fits(nouns: &[Noun], objects: &[Object], used: &mut [bool]) -> bool {
    let Some((first, rest)) = nouns.split_first() else {
        return true;
    };
    for (i, o) in objects.iter().enumerate() {
        if !used[i] && first.fits(o) {
            used[i] = true;
            let found = distinct_fits(rest, objects, used);
            used[i] = false;
            if found {
                return true;
            }
        }
    }
    false
}

/// One case of the suite: a caption true of its scene, a negative false of
/// it, and how they differ.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub kind: Kind,
    pub caption: Statement,
    pub negative: Statement,
}

/// The case of `kind` for `scene`, the scene with index `index` of its
/// generator; `None` when no negative of that kind can be made for it.
pub fn case(scene: &Scene, index: u64, kind: Kind) -> Option<Case> {
    // Candidates come in groups (the attribute changed, the axis of the
    // relation) drawn uniformly first, so no group wins by its size alone.
    let groups: Vec<Vec<(Statement, Statement)>> = candidates(scene, kind)
        .into_iter()
        .map(|g| {
            g.into_iter()
                .filter(|(c, n)| c.holds(scene) && !n.holds(scene))
                .collect::<Vec<_>>()
        })
        .filter(|g| !g.is_empty())
        .collect();
    if groups.is_empty() {
        return None;
    }
    let mut rng = Rng::new(mix(&[SEED, index, kind as u64]));
    let group = &groups[rng.below(groups.len())];
    let (caption, negative) = group[rng.below(group.len())].clone();
    Some(Case {
        kind,
        caption,
        negative,
    })
}

/// Every case [`case`] may draw for `scene`: one per kind it can make.
pub fn cases(scene: &Scene, index: u64) -> Vec<Case> {
    Kind::ALL
        .into_iter()
        .filter_map(|k| case(scene, index, k))
        .collect()
}

/// The `(caption, negative)` pairs of `kind` for `scene`, grouped, before
/// the truth check.
fn candidates(scene: &Scene, kind: Kind) -> Vec<Vec<(Statement, Statement)>> {
    let objects = &scene.objects;
    let nouns: Vec<Noun> = objects.iter().map(Noun::of).collect();
    let background = scene.background;
    let listed = |nouns: Vec<Noun>| Statement::Objects { nouns, background };
    let caption = listed(nouns.clone());
    // Object `i`'s attribute `a` set to `v`.
    let changed = |i: usize, a: Attr, v: usize| {
        let mut n = nouns.clone();
        n[i] = n[i].with(a, v);
        (caption.clone(), listed(n))
    };
    let swap = |a: Attr| -> Vec<(Statement, Statement)> {
        let mut out = Vec::new();
        for i in 0..objects.len() {
            let mut values: Vec<usize> = (0..objects.len())
                .filter(|&j| j != i)
                .map(|j| a.of(&objects[j]))
                .filter(|&v| v != a.of(&objects[i]))
                .collect();
            values.sort_unstable();
            values.dedup();
            out.extend(values.into_iter().map(|v| changed(i, a, v)));
        }
        out
    };
    match kind {
        Kind::Color => vec![swap(Attr::Color)],
        Kind::Size => vec![swap(Attr::Size)],
        Kind::Shape => vec![swap(Attr::Shape)],
        Kind::Absent => Attr::ALL
            .into_iter()
            .map(|a| {
                let absent: Vec<usize> = (0..a.values())
                    .filter(|&v| objects.iter().all(|o| a.of(o) != v))
                    .collect();
                (0..objects.len())
                    .flat_map(|i| absent.iter().map(move |&v| (i, v)))
                    .map(|(i, v)| changed(i, a, v))
                    .collect()
            })
            .collect(),
        Kind::Binding => Attr::ALL
            .into_iter()
            .map(|a| {
                let mut out = Vec::new();
                for i in 0..objects.len() {
                    for j in i + 1..objects.len() {
                        let (vi, vj) = (nouns[i].get(a), nouns[j].get(a));
                        if vi != vj {
                            let mut n = nouns.clone();
                            n[i] = n[i].with(a, vj);
                            n[j] = n[j].with(a, vi);
                            out.push((caption.clone(), listed(n)));
                        }
                    }
                }
                out
            })
            .collect(),
        Kind::Relation => [
            [Relation::LeftOf, Relation::RightOf],
            [Relation::Above, Relation::Below],
        ]
        .into_iter()
        .map(|axis| {
            let mut out = Vec::new();
            for (i, oa) in objects.iter().enumerate() {
                for (j, ob) in objects.iter().enumerate() {
                    for relation in axis {
                        if i != j && relation.holds(oa, ob) {
                            let said = |relation| Statement::Relation {
                                a: nouns[i],
                                relation,
                                b: nouns[j],
                            };
                            out.push((said(relation), said(relation.opposite())));
                        }
                    }
                }
            }
            out
        })
        .collect(),
        Kind::Count => {
            let count = |count| Statement::Count { count, background };
            vec![(1..=COUNTS.len())
                .filter(|&c| c != objects.len())
                .map(|c| (count(objects.len()), count(c)))
                .collect()]
        }
    }
}
