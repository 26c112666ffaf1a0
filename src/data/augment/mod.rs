//! ALBEF's training augmentations (`[data.augment]`): torchvision's
//! `RandomResizedCrop` (bicubic) and `RandomHorizontalFlip`, then ALBEF's
//! `RandomAugment(N, M)` (`dataset/randaugment.py`), on the decoded 8-bit
//! RGB image before normalisation. Training only: evaluation loaders carry
//! no [`Augment`].
//!
//! Every draw is a pure function of the run's seed, the sample and the
//! epoch ([`AugKey`]), from its own SplitMix64 stream per concern (crop,
//! flip, RandAugment), so that resuming mid-epoch and splitting a global
//! batch over ranks give the same images, and the flip (which may change
//! the caption) does not depend on the image's size.
//!
//! `resample` is Pillow's bicubic resize, `color` and `geometry` ALBEF's
//! ops; `tests/augment.rs` compares each with the reference's output.

pub mod color;
pub mod geometry;
pub mod resample;

use crate::rng::{mix, Rng};
use image::RgbImage;
use vlmatch_registry::config::{AugmentConfig, AugmentOp};

/// ALBEF's fill colour for pixels a geometric op uncovers.
pub const FILL: [u8; 3] = [128, 128, 128];

/// What a draw is keyed by besides the seed: the sample (a pair's index in
/// an in-memory dataset, or its position in a shard stream) and the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AugKey {
    pub sample: u64,
    pub epoch: u64,
}

/// A crop box in source pixels: `(left, top, width, height)`.
pub type CropBox = (usize, usize, usize, usize);

/// One RandAugment op as applied: the op and its argument (a factor for
/// brightness and sharpness, a signed shear, offset in pixels or angle in
/// degrees; unused for the others).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AppliedOp {
    pub op: AugmentOp,
    pub arg: f64,
}

/// Every random choice for one image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draws {
    /// The crop box, or `None` for the whole image.
    pub crop: Option<CropBox>,
    pub flip: bool,
    /// The RandAugment ops that passed their coin, in order.
    pub ops: Vec<AppliedOp>,
}

/// `[data.augment]` with the run's seed: what a training loader applies.
#[derive(Debug, Clone)]
pub struct Augment {
    pub config: AugmentConfig,
    pub seed: u64,
}

/// Stream tags, one per concern.
const CROP: u64 = 0xC809;
const FLIP: u64 = 0xF119;
const RANDAUG: u64 = 0x8A4D;

/// A uniform in `[lo, hi)` at 53-bit resolution.
fn uniform(rng: &mut Rng, lo: f64, hi: f64) -> f64 {
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    lo + u * (hi - lo)
}

impl Augment {
    /// `None` when `config` turns nothing on.
    pub fn new(config: &AugmentConfig, seed: u64) -> Option<Augment> {
        config.enabled().then(|| Augment {
            config: config.clone(),
            seed,
        })
    }

    fn stream(&self, key: AugKey, concern: u64) -> Rng {
        Rng::new(mix(&[self.seed, key.sample, key.epoch, concern]))
    }

    /// Whether the image of `key` is flipped.
    pub fn flips(&self, key: AugKey) -> bool {
        let p = self.config.flip;
        p > 0.0 && uniform(&mut self.stream(key, FLIP), 0.0, 1.0) < p
    }

    /// torchvision's `RandomResizedCrop.get_params` on a `w` x `h` image:
    /// up to ten tries of an area fraction (uniform in `crop_scale`) and an
    /// aspect ratio (log-uniform in `crop_ratio`), rounded half to even,
    /// that fit, placed uniformly; otherwise the largest centred crop
    /// within the ratio range.
    pub fn crop_box(&self, key: AugKey, w: usize, h: usize) -> CropBox {
        let c = &self.config;
        let mut rng = self.stream(key, CROP);
        let area = (w * h) as f64;
        let (lr0, lr1) = (c.crop_ratio[0].ln(), c.crop_ratio[1].ln());
        for _ in 0..10 {
            let target = area * uniform(&mut rng, c.crop_scale[0], c.crop_scale[1]);
            let ratio = uniform(&mut rng, lr0, lr1).exp();
            let cw = (target * ratio).sqrt().round_ties_even();
            let ch = (target / ratio).sqrt().round_ties_even();
            if cw >= 1.0 && ch >= 1.0 && cw <= w as f64 && ch <= h as f64 {
                let (cw, ch) = (cw as usize, ch as usize);
                let top = rng.below(h - ch + 1);
                let left = rng.below(w - cw + 1);
                return (left, top, cw, ch);
            }
        }
        let in_ratio = w as f64 / h as f64;
        let (cw, ch) = if in_ratio < c.crop_ratio[0] {
            (
                w,
                ((w as f64 / c.crop_ratio[0]).round_ties_even() as usize).clamp(1, h),
            )
        } else if in_ratio > c.crop_ratio[1] {
            (
                ((h as f64 * c.crop_ratio[1]).round_ties_even() as usize).clamp(1, w),
                h,
            )
        } else {
            (w, h)
        };
        ((w - cw) / 2, (h - ch) / 2, cw, ch)
    }

    /// ALBEF's `RandomAugment`: `randaug_n` ops drawn with replacement, each
    /// applied with probability 0.5; magnitude `M` of 10 gives a factor of
    /// `1.8 M / 10 + 0.1` (brightness, sharpness), a shear of `0.3 M / 10`,
    /// a translation of `M` pixels, a rotation of `3 M` degrees, the last
    /// three of either sign with equal probability.
    pub fn ops(&self, key: AugKey) -> Vec<AppliedOp> {
        let mut out = Vec::new();
        self.ops_into(key, &mut out);
        out
    }

    /// [`Augment::ops`] into `out` (cleared first).
    pub fn ops_into(&self, key: AugKey, out: &mut Vec<AppliedOp>) {
        let c = &self.config;
        let mut rng = self.stream(key, RANDAUG);
        let level = c.randaug_m / 10.0;
        out.clear();
        // Room for every op once, so a later image never grows the list.
        out.reserve(c.randaug_n);
        for _ in 0..c.randaug_n {
            let op = *rng.pick(&c.randaug_ops);
            let applied = uniform(&mut rng, 0.0, 1.0) < 0.5;
            let sign = if uniform(&mut rng, 0.0, 1.0) < 0.5 {
                -1.0
            } else {
                1.0
            };
            let arg = match op {
                AugmentOp::Brightness | AugmentOp::Sharpness => level * 1.8 + 0.1,
                AugmentOp::ShearX | AugmentOp::ShearY => sign * level * 0.3,
                AugmentOp::TranslateX | AugmentOp::TranslateY => sign * level * 10.0,
                AugmentOp::Rotate => sign * level * 30.0,
                AugmentOp::Identity | AugmentOp::Autocontrast | AugmentOp::Equalize => 0.0,
            };
            if applied {
                out.push(AppliedOp { op, arg });
            }
        }
    }

    /// Every draw for the image of `key`, `w` x `h` before cropping.
    pub fn draws(&self, key: AugKey, w: usize, h: usize) -> Draws {
        let mut d = Draws::default();
        self.draws_into(key, w, h, &mut d);
        d
    }

    /// [`Augment::draws`] into `d`, reusing its list of ops.
    pub fn draws_into(&self, key: AugKey, w: usize, h: usize, d: &mut Draws) {
        d.crop = self.config.crop.then(|| self.crop_box(key, w, h));
        d.flip = self.flips(key);
        self.ops_into(key, &mut d.ops);
    }

    /// `img` augmented for `key` at `size` x `size`: row-major RGB bytes.
    /// Without a crop, the whole image is resized (Pillow's bicubic too).
    pub fn apply(&self, img: &RgbImage, key: AugKey, size: usize) -> Vec<u8> {
        let mut bufs = Buffers::default();
        let (w, h) = (img.width() as usize, img.height() as usize);
        self.apply_into(img.as_raw(), (w, h), key, size, &mut bufs);
        bufs.take()
    }

    /// [`Augment::apply`] on `w` x `h` RGB bytes, the result left in
    /// `bufs` ([`Buffers::image`]): bit for bit the same, and no
    /// allocation once `bufs` has grown to the sizes seen.
    pub fn apply_into(
        &self,
        src: &[u8],
        (w, h): (usize, usize),
        key: AugKey,
        size: usize,
        bufs: &mut Buffers,
    ) {
        let mut d = std::mem::take(&mut bufs.draws);
        self.draws_into(key, w, h, &mut d);
        bufs.crop_resize(src, (w, h), &d, size);
        bufs.flip_and_ops(&d, size);
        bufs.draws = d;
    }
}

/// The work buffers of [`Augment::apply_into`], one set per loader
/// worker, reused from image to image; the image the last call left is
/// [`Buffers::image`].
#[derive(Debug, Default)]
pub struct Buffers {
    resample: resample::Resample,
    /// The current image.
    image: Vec<u8>,
    /// A geometric or sharpness op's output, swapped with `image`.
    other: Vec<u8>,
    draws: Draws,
}

impl Buffers {
    /// The image the last step left: `size` x `size` RGB bytes.
    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// The image, leaving an empty buffer.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.image)
    }

    /// The crop of `d` (else the whole `w` x `h` image) resized to `size`
    /// x `size`: the first step of [`apply_draws`].
    pub fn crop_resize(&mut self, src: &[u8], (w, h): (usize, usize), d: &Draws, size: usize) {
        let crop = d.crop.unwrap_or((0, 0, w, h));
        // The ops' second buffer at its size now, not at the first op.
        self.other
            .reserve((size * size * 3).saturating_sub(self.other.len()));
        resample::resized_crop_into(
            src,
            (w, h),
            crop,
            (size, size),
            &mut self.resample,
            &mut self.image,
        );
    }

    /// The flip and the ops of `d` on the `size` x `size` image: the rest
    /// of [`apply_draws`].
    pub fn flip_and_ops(&mut self, d: &Draws, size: usize) {
        if d.flip {
            geometry::hflip_in_place(&mut self.image, size);
        }
        for a in &d.ops {
            self.op(*a, (size, size));
        }
    }

    /// One RandAugment op on the `w` x `h` image.
    fn op(&mut self, a: AppliedOp, (w, h): (usize, usize)) {
        let warp = |m: [f64; 6], this: &mut Buffers| {
            geometry::warp_affine_into(&this.image, (w, h), m, FILL, &mut this.other);
            std::mem::swap(&mut this.image, &mut this.other);
        };
        match a.op {
            AugmentOp::Identity => {}
            AugmentOp::Autocontrast => color::autocontrast_in_place(&mut self.image),
            AugmentOp::Equalize => color::equalize_in_place(&mut self.image),
            AugmentOp::Brightness => color::brightness_in_place(&mut self.image, a.arg),
            AugmentOp::Sharpness => {
                color::sharpness_into(&self.image, (w, h), a.arg, &mut self.other);
                std::mem::swap(&mut self.image, &mut self.other);
            }
            AugmentOp::ShearX => warp(geometry::shear_x_matrix(a.arg), self),
            AugmentOp::ShearY => warp(geometry::shear_y_matrix(a.arg), self),
            AugmentOp::TranslateX => warp(geometry::translate_x_matrix(a.arg), self),
            AugmentOp::TranslateY => warp(geometry::translate_y_matrix(a.arg), self),
            AugmentOp::Rotate => warp(geometry::rotate_matrix(a.arg, (w, h)), self),
        }
    }
}

/// `img` through the choices `d`: crop and resize to `size` x `size`, flip,
/// then each op in order.
pub fn apply_draws(img: &RgbImage, d: &Draws, size: usize) -> RgbImage {
    let mut bufs = Buffers::default();
    let (w, h) = (img.width() as usize, img.height() as usize);
    bufs.crop_resize(img.as_raw(), (w, h), d, size);
    bufs.flip_and_ops(d, size);
    RgbImage::from_raw(size as u32, size as u32, bufs.take()).expect("sized buffer")
}

/// One RandAugment op with its argument.
pub fn apply_op(img: &RgbImage, a: AppliedOp) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let mut bufs = Buffers {
        image: img.as_raw().clone(),
        ..Buffers::default()
    };
    bufs.op(a, (w as usize, h as usize));
    RgbImage::from_raw(w, h, bufs.take()).expect("sized buffer")
}

/// `caption` with the words "left" and "right" swapped (whole words, any
/// case; a capital first letter or all capitals kept), for a flipped image.
pub fn swap_left_right(caption: &str) -> String {
    let mut out = String::with_capacity(caption.len() + 8);
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let swapped = match word.to_lowercase().as_str() {
            "left" => Some("right"),
            "right" => Some("left"),
            _ => None,
        };
        match swapped {
            Some(s) if word.chars().all(|c| c.is_uppercase()) => out.push_str(&s.to_uppercase()),
            Some(s) if word.starts_with(|c: char| c.is_uppercase()) => {
                out.push_str(&s[..1].to_uppercase());
                out.push_str(&s[1..]);
            }
            Some(s) => out.push_str(s),
            None => out.push_str(word),
        }
        word.clear();
    };
    for ch in caption.chars() {
        if ch.is_alphanumeric() {
            word.push(ch);
        } else {
            flush(&mut word, &mut out);
            out.push(ch);
        }
    }
    flush(&mut word, &mut out);
    out
}
