//! Built-in SNLI-VE and NLVR2 items over the built-in scenes
//! ([`crate::data::synthetic`]), for tests and demos.
//!
//! SNLI-VE: the premise is a scene; a hypothesis is `entailment` when the
//! scene makes it true ("there is a red circle"), `contradiction` when it
//! makes it false, `neutral` when it speaks of a property the renderer
//! does not define ("the red circle is made of wood"). Each scene gets two
//! statements of each class.
//!
//! NLVR2: two scenes and a statement about both ("the left image has more
//! circles than the right image"), true or false. Each pair gets two true
//! and two false statements.
//!
//! Every statement is drawn as: a template at random, then the truth value
//! wanted, then one instance of the template with that truth value (a new
//! template when it has none). Each template is therefore as often true as
//! false, so the text alone does not give the label away: a model must
//! look at the image(s).

use crate::data::synthetic::{Scene, BACKGROUNDS, COLORS, SHAPES};
use crate::rng::Rng;

const COUNTS: [&str; 3] = ["one shape", "two shapes", "three shapes"];
const MATERIALS: [&str; 6] = ["wood", "metal", "glass", "paper", "stone", "plastic"];
const QUALITIES: [&str; 5] = ["heavy", "old", "soft", "warm", "expensive"];
const TIMES: [&str; 3] = ["at night", "in winter", "indoors"];

/// SNLI-VE labels as ALBEF numbers them.
pub const SNLI_VE_CLASSES: [&str; 3] = ["contradiction", "neutral", "entailment"];

fn has(scene: &Scene, f: impl Fn(&crate::data::synthetic::Object) -> bool) -> bool {
    scene.objects.iter().any(f)
}

fn count_of(scene: &Scene, shape: usize) -> usize {
    scene.objects.iter().filter(|o| o.shape == shape).count()
}

/// Every instance of SNLI-VE template `t` with its truth value in `scene`.
fn snli_instances(scene: &Scene, t: usize) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    match t {
        0 => {
            for (c, (color, _)) in COLORS.iter().enumerate() {
                for (s, shape) in SHAPES.iter().enumerate() {
                    out.push((
                        format!("there is a {color} {shape}"),
                        has(scene, |o| o.color == c && o.shape == s),
                    ));
                }
            }
        }
        1 => {
            for (c, (color, _)) in COLORS.iter().enumerate() {
                out.push((
                    format!("there is a {color} shape"),
                    has(scene, |o| o.color == c),
                ));
            }
        }
        2 => {
            for (n, count) in COUNTS.iter().enumerate() {
                let verb = if n == 0 { "is" } else { "are" };
                out.push((
                    format!("there {verb} {count}"),
                    scene.objects.len() == n + 1,
                ));
            }
        }
        _ => {
            for (b, (bg, _)) in BACKGROUNDS.iter().enumerate() {
                out.push((format!("the background is {bg}"), scene.background == b));
            }
        }
    }
    out
}

/// A statement the renderer cannot settle, about an object of `scene`.
fn snli_neutral(scene: &Scene, rng: &mut Rng) -> String {
    let o = rng.pick(&scene.objects);
    let noun = format!("the {} {}", COLORS[o.color].0, SHAPES[o.shape]);
    match rng.below(3) {
        0 => format!("{noun} is made of {}", rng.pick(&MATERIALS)),
        1 => format!("{noun} is {}", rng.pick(&QUALITIES)),
        _ => format!("the picture was taken {}", rng.pick(&TIMES)),
    }
}

/// A statement with truth `wanted` and its template: the first template,
/// in a random order, that has both true and false instances here (so
/// which template is used does not depend on `wanted`), then one of its
/// instances with that truth.
fn draw(
    rng: &mut Rng,
    templates: usize,
    wanted: bool,
    instances: impl Fn(usize) -> Vec<(String, bool)>,
) -> Option<(String, usize)> {
    let mut order: Vec<usize> = (0..templates).collect();
    rng.shuffle(&mut order);
    order.into_iter().find_map(|t| {
        let all = instances(t);
        let (fit, other): (Vec<_>, Vec<_>) = all.into_iter().partition(|(_, x)| *x == wanted);
        (!fit.is_empty() && !other.is_empty()).then(|| (rng.pick(&fit).0.clone(), t))
    })
}

/// The SNLI-VE templates, by number in [`snli_instances`]. Each draws as
/// many statements, so the share of kinds the tiny preset learns to check
/// against an image within a few hundred steps (backgrounds first) is not
/// diluted: shape and size statements, tried in 600-step runs, stayed at
/// chance.
const SNLI_KINDS: [&str; 4] = ["color-shape", "color", "count", "background"];

/// Six hypotheses about `scene`: two of each class, as (sentence, label
/// index into [`SNLI_VE_CLASSES`], statement kind).
pub fn snli_ve_statements(scene: &Scene, seed: u64) -> Vec<(String, i64, &'static str)> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for label in [2i64, 0, 1, 2, 0, 1] {
        if label == 1 {
            out.push((snli_neutral(scene, &mut rng), 1, "neutral"));
            continue;
        }
        let (s, t) = draw(&mut rng, SNLI_KINDS.len(), label == 2, |t| {
            snli_instances(scene, t)
        })
        .expect("the background template always has true and false instances");
        out.push((s, label, SNLI_KINDS[t]));
    }
    out
}

/// The NLVR2 templates, by number in [`nlvr2_instances`], chosen as the
/// SNLI-VE ones ("the left image has more shapes than the right image" and
/// "the left image has a circle", tried in a 600-step run, stayed at chance).
const NLVR2_KINDS: [&str; 4] = ["color", "both", "background", "shape-count"];

/// Every instance of NLVR2 template `t` with its truth for (`left`, `right`).
fn nlvr2_instances(left: &Scene, right: &Scene, t: usize) -> Vec<(String, bool)> {
    let sides = [("left", left), ("right", right)];
    let mut out = Vec::new();
    match t {
        0 => {
            for (side, scene) in sides {
                for (c, (color, _)) in COLORS.iter().enumerate() {
                    out.push((
                        format!("the {side} image has a {color} shape"),
                        has(scene, |o| o.color == c),
                    ));
                }
            }
        }
        1 => {
            for (c, (color, _)) in COLORS.iter().enumerate() {
                out.push((
                    format!("both images have a {color} shape"),
                    has(left, |o| o.color == c) && has(right, |o| o.color == c),
                ));
            }
            for (b, (bg, _)) in BACKGROUNDS.iter().enumerate() {
                out.push((
                    format!("both images have a {bg} background"),
                    left.background == b && right.background == b,
                ));
            }
        }
        2 => {
            for (side, scene) in sides {
                for (b, (bg, _)) in BACKGROUNDS.iter().enumerate() {
                    out.push((
                        format!("the {side} image has a {bg} background"),
                        scene.background == b,
                    ));
                }
            }
        }
        _ => {
            for (s, shape) in SHAPES.iter().enumerate() {
                let (l, r) = (count_of(left, s), count_of(right, s));
                out.push((
                    format!("the left image has more {shape}s than the right image"),
                    l > r,
                ));
                out.push((
                    format!("the right image has more {shape}s than the left image"),
                    r > l,
                ));
            }
        }
    }
    out
}

/// Four statements about the pair (`left`, `right`), two true and two
/// false (in a random order), as (sentence, label: 1 true / 0 false, kind).
pub fn nlvr2_statements(
    left: &Scene,
    right: &Scene,
    seed: u64,
) -> Vec<(String, i64, &'static str)> {
    let mut rng = Rng::new(seed);
    let mut labels = [true, false, true, false];
    rng.shuffle(&mut labels);
    labels
        .into_iter()
        .map(|truth| {
            let (s, t) = draw(&mut rng, NLVR2_KINDS.len(), truth, |t| {
                nlvr2_instances(left, right, t)
            })
            .expect("the background template always has true and false instances");
            (s, truth as i64, NLVR2_KINDS[t])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snli_ve_statements_are_balanced_and_true_to_the_scene() {
        let mut per_class = [0usize; 3];
        for i in 0..300 {
            let scene = Scene::generate(5, i);
            let caption = scene.captions(1, 1).remove(0);
            for (s, label, kind) in snli_ve_statements(&scene, i) {
                per_class[label as usize] += 1;
                // A statement of a template is true exactly when it is
                // listed as true for the scene.
                if label != 1 {
                    let t = SNLI_KINDS.iter().position(|k| *k == kind).unwrap();
                    let truth = snli_instances(&scene, t)
                        .into_iter()
                        .find(|(x, _)| *x == s)
                        .unwrap()
                        .1;
                    assert_eq!(truth, label == 2, "{s} of {caption}");
                }
                if let Some(bg) = s.strip_prefix("the background is ") {
                    assert_eq!(
                        caption.ends_with(&format!("on a {bg} background")),
                        label == 2,
                        "{s} of {caption}"
                    );
                }
                if label == 1 {
                    assert!(
                        s.contains("made of") || s.contains("picture was taken") || {
                            QUALITIES.iter().any(|q| s.ends_with(q))
                        },
                        "{s}"
                    );
                }
            }
        }
        assert_eq!(per_class, [600, 600, 600]);
    }

    #[test]
    fn nlvr2_statements_are_two_true_two_false_and_right() {
        let mut by_kind: std::collections::BTreeMap<&str, [usize; 2]> = Default::default();
        for i in 0..400 {
            let (l, r) = (Scene::generate(9, 2 * i), Scene::generate(9, 2 * i + 1));
            let st = nlvr2_statements(&l, &r, i);
            assert_eq!(st.len(), 4);
            assert_eq!(st.iter().map(|s| s.1).sum::<i64>(), 2, "{st:?}");
            for (s, label, kind) in st {
                by_kind.entry(kind).or_default()[label as usize] += 1;
                if let Some(bg) = s.strip_prefix("both images have a ") {
                    if let Some(bg) = bg.strip_suffix(" background") {
                        let name = |sc: &Scene| BACKGROUNDS[sc.background].0;
                        assert_eq!(label == 1, name(&l) == bg && name(&r) == bg, "{s}");
                    }
                }
                if s == "the left image has more circles than the right image" {
                    assert_eq!(label == 1, count_of(&l, 0) > count_of(&r, 0));
                }
            }
        }
        // Every template comes up, true and false alike.
        assert_eq!(by_kind.len(), NLVR2_KINDS.len(), "{by_kind:?}");
        for (kind, [f, t]) in by_kind {
            let share = t as f64 / (f + t) as f64;
            assert!(
                (0.35..=0.65).contains(&share),
                "{kind}: {t} true, {f} false"
            );
        }
    }
}
