//! The loader's augmented image path in reused buffers
//! (`src/data/image.rs`, `src/data/augment/`): the SIMD crop-resize gives
//! Pillow's integer sums exactly, reused buffers give what fresh ones give,
//! decoding into a buffer gives the `image` crate's pixels, and once the
//! buffers have grown nothing after the decoder allocates per image (this
//! binary counts allocations with the bench's allocator).

mod common;
use common::*;

use image::RgbImage;
use proptest::prelude::*;
use vlmatch::bench::alloc::{allocations, Counting};
use vlmatch::data::augment::{resample, AugKey, Augment, Buffers, Draws};
use vlmatch::data::image::{normalize_into, Scratch};
use vlmatch_registry::config::{AugmentConfig, AugmentOp};

#[global_allocator]
static ALLOC: Counting = Counting;

/// Pillow's bicubic crop-resize written plainly, one tap at a time (the
/// loader's first version of it): the reference the fast one must equal.
fn reference_resized_crop(
    img: &RgbImage,
    (left, top, w, h): (usize, usize, usize, usize),
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    const BITS: u32 = 22;
    const HALF: i64 = 1 << (BITS - 1);
    fn cubic(x: f64) -> f64 {
        let a = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    }
    fn taps(size: usize, out: usize) -> Vec<(usize, Vec<i64>)> {
        let scale = size as f64 / out as f64;
        let fs = scale.max(1.0);
        let support = 2.0 * fs;
        (0..out)
            .map(|o| {
                let c = (o as f64 + 0.5) * scale;
                let lo = ((c - support + 0.5) as i64).max(0) as usize;
                let hi = ((c + support + 0.5) as i64).min(size as i64) as usize;
                let raw: Vec<f64> = (lo..hi).map(|x| cubic((x as f64 - c + 0.5) / fs)).collect();
                let sum: f64 = raw.iter().sum();
                let w = raw
                    .iter()
                    .map(|&w| {
                        let w = if sum != 0.0 { w / sum } else { w };
                        let f = w * f64::from(1u32 << BITS);
                        (if w < 0.0 { f - 0.5 } else { f + 0.5 }) as i32 as i64
                    })
                    .collect();
                (lo, w)
            })
            .collect()
    }
    let clip = |a: i64| (a >> BITS).clamp(0, 255) as u8;
    let iw = img.width() as usize;
    let mut buf: Vec<u8> = (top..top + h)
        .flat_map(|y| img.as_raw()[(y * iw + left) * 3..(y * iw + left + w) * 3].to_vec())
        .collect();
    let (mut cw, mut ch) = (w, h);
    let horizontal = |buf: &[u8], cw: usize, ch: usize| -> Vec<u8> {
        let t = taps(cw, out_w);
        let mut out = vec![0u8; out_w * ch * 3];
        for y in 0..ch {
            for (o, (first, ws)) in t.iter().enumerate() {
                for c in 0..3 {
                    let mut acc = HALF;
                    for (k, wt) in ws.iter().enumerate() {
                        acc += i64::from(buf[(y * cw + first + k) * 3 + c]) * wt;
                    }
                    out[(y * out_w + o) * 3 + c] = clip(acc);
                }
            }
        }
        out
    };
    let vertical = |buf: &[u8], cw: usize, ch: usize| -> Vec<u8> {
        let t = taps(ch, out_h);
        let mut out = vec![0u8; cw * out_h * 3];
        for (o, (first, ws)) in t.iter().enumerate() {
            for i in 0..cw * 3 {
                let mut acc = HALF;
                for (k, wt) in ws.iter().enumerate() {
                    acc += i64::from(buf[(first + k) * cw * 3 + i]) * wt;
                }
                out[o * cw * 3 + i] = clip(acc);
            }
        }
        out
    };
    let vertical_first = out_w > w && out_h < h;
    for along_rows in [!vertical_first, vertical_first] {
        if along_rows && cw != out_w {
            buf = horizontal(&buf, cw, ch);
            cw = out_w;
        } else if !along_rows && ch != out_h {
            buf = vertical(&buf, cw, ch);
            ch = out_h;
        }
    }
    buf
}

/// OpenCV's bilinear `warpAffine` as the loader first computed it, pixel
/// by pixel and channel by channel: the reference the restructured one
/// must equal.
fn reference_warp(img: &RgbImage, m: [f64; 6], fill: [u8; 3]) -> Vec<u8> {
    let det = m[0] * m[4] - m[1] * m[3];
    let det = if det != 0.0 { 1.0 / det } else { 0.0 };
    let (i0, i1, i3, i4) = (m[4] * det, -m[1] * det, -m[3] * det, m[0] * det);
    let (i2, i5) = (-i0 * m[2] - i1 * m[5], -i3 * m[2] - i4 * m[5]);
    let [i0, i1, i2, i3, i4, i5] = [i0, i1, i2, i3, i4, i5].map(|v| v as f32);
    let (w, h) = (img.width() as i64, img.height() as i64);
    let src = img.as_raw();
    let at = |x: i64, y: i64, c: usize| -> f32 {
        if x < 0 || y < 0 || x >= w || y >= h {
            f32::from(fill[c])
        } else {
            f32::from(src[((y * w + x) * 3) as usize + c])
        }
    };
    let mut out = vec![0u8; src.len()];
    for y in 0..h {
        let (row_x, row_y) = (i1 * y as f32 + i2, i4 * y as f32 + i5);
        for x in 0..w {
            let sx = i0 * x as f32 + row_x;
            let sy = i3 * x as f32 + row_y;
            let (fx0, fy0) = (sx.floor(), sy.floor());
            let (ax, ay) = (sx - fx0, sy - fy0);
            let (ix, iy) = (fx0 as i64, fy0 as i64);
            for c in 0..3 {
                let [p00, p01, p10, p11] = [
                    at(ix, iy, c),
                    at(ix + 1, iy, c),
                    at(ix, iy + 1, c),
                    at(ix + 1, iy + 1, c),
                ];
                let top = p00 + ax * (p01 - p00);
                let bottom = p10 + ax * (p11 - p10);
                let v = top + ay * (bottom - top);
                out[((y * w + x) * 3) as usize + c] = v.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// A `w` x `h` image of bytes from `seed`, smooth or noisy.
fn image_of(w: usize, h: usize, seed: u64) -> RgbImage {
    let mut x = seed | 1;
    let raw = (0..w * h * 3)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if seed.is_multiple_of(2) {
                (x >> 56) as u8
            } else {
                ((i / 3) % 251) as u8 ^ ((x >> 60) as u8)
            }
        })
        .collect();
    RgbImage::from_raw(w as u32, h as u32, raw).unwrap()
}

fn albef() -> Augment {
    let cfg = AugmentConfig {
        crop: true,
        crop_scale: [0.2, 1.0],
        crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
        flip: 0.5,
        flip_swap_left_right: false,
        randaug_n: 2,
        randaug_m: 7.0,
        randaug_ops: AugmentOp::ALBEF.to_vec(),
    };
    Augment::new(&cfg, 7).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The crop-resize (two taps per SIMD step where the CPU has AVX2)
    /// gives Pillow's fixed-point sums exactly, for any box and size,
    /// shrinking or growing either axis.
    #[test]
    fn resized_crop_equals_the_per_tap_sums(
        w in 1usize..90, h in 1usize..90, seed in any::<u64>(),
        fx in 0.0f64..1.0, fy in 0.0f64..1.0, fw in 0.01f64..1.0, fh in 0.01f64..1.0,
        out_w in 1usize..70, out_h in 1usize..70,
    ) {
        let img = image_of(w, h, seed);
        let cw = ((w as f64 * fw) as usize).clamp(1, w);
        let ch = ((h as f64 * fh) as usize).clamp(1, h);
        let left = ((w - cw) as f64 * fx) as usize;
        let top = ((h - ch) as f64 * fy) as usize;
        let fast = resample::resized_crop(&img, (left, top, cw, ch), out_w, out_h);
        let slow = reference_resized_crop(&img, (left, top, cw, ch), out_w, out_h);
        prop_assert!(fast.as_raw() == &slow, "{w}x{h} box {cw}x{ch}+{left}+{top} -> {out_w}x{out_h}");
    }

    /// The warp (neighbour pairs read as runs, compiled for AVX2 where the
    /// CPU has it) equals the plain per-channel code for any matrix of
    /// ALBEF's ops, inside and across the image's edges.
    #[test]
    fn warps_equal_the_per_channel_code(
        w in 1usize..50, h in 1usize..50, seed in any::<u64>(),
        op in 0usize..5, v in -1.0f64..1.0,
    ) {
        use vlmatch::data::augment::geometry as g;
        let img = image_of(w, h, seed);
        let m = match op {
            0 => g::shear_x_matrix(0.3 * v),
            1 => g::shear_y_matrix(0.3 * v),
            2 => g::translate_x_matrix(10.0 * v),
            3 => g::translate_y_matrix(10.0 * v),
            _ => g::rotate_matrix(30.0 * v, (w, h)),
        };
        let fill = [128, 7, 250];
        prop_assert_eq!(g::warp_affine(&img, m, fill).into_raw(), reference_warp(&img, m, fill));
    }

    /// Whole-pixel translations (ALBEF's translate ops, which take a
    /// shortcut) equal the per-channel code too, offsets past the image
    /// included.
    #[test]
    fn whole_pixel_translations_equal_the_per_channel_code(
        w in 1usize..40, h in 1usize..40, seed in any::<u64>(),
        dx in -45i32..45, dy in -45i32..45, along_x in any::<bool>(),
    ) {
        use vlmatch::data::augment::geometry as g;
        let img = image_of(w, h, seed);
        let m = if along_x {
            g::translate_x_matrix(f64::from(dx))
        } else {
            g::translate_y_matrix(f64::from(dy))
        };
        let both = [1.0, 0.0, f64::from(dx), 0.0, 1.0, f64::from(dy)];
        let fill = [128, 7, 250];
        for m in [m, both] {
            prop_assert_eq!(g::warp_affine(&img, m, fill).into_raw(), reference_warp(&img, m, fill));
        }
    }

    /// One set of buffers carried through images of any sizes and draws
    /// gives each image what fresh buffers give (nothing left over leaks).
    #[test]
    fn reused_buffers_give_what_fresh_ones_give(
        images in proptest::collection::vec((1usize..60, 1usize..60, any::<u64>(), 0u64..1000), 1..6),
        size in 1usize..40,
    ) {
        let aug = albef();
        let mut bufs = Buffers::default();
        for (w, h, seed, sample) in images {
            let img = image_of(w, h, seed);
            let key = AugKey { sample, epoch: 1 };
            aug.apply_into(img.as_raw(), (w, h), key, size, &mut bufs);
            prop_assert_eq!(bufs.image(), &aug.apply(&img, key, size)[..]);
        }
    }
}

/// Decoding into a reused buffer gives the `image` crate's RGB pixels for
/// RGB and grey JPEGs and (through its general path) an RGBA PNG.
#[test]
fn decoding_into_a_buffer_gives_the_crates_pixels() {
    let dir = scratch("image-pipeline-decode");
    let rgb = image_of(37, 23, 3);
    let files = [
        ("a.jpg", image::DynamicImage::ImageRgb8(rgb.clone())),
        (
            "b.jpg",
            image::DynamicImage::ImageLuma8(image::imageops::grayscale(&rgb)),
        ),
        (
            "c.png",
            image::DynamicImage::ImageRgba8(image::DynamicImage::ImageRgb8(rgb).to_rgba8()),
        ),
    ];
    let mut s = Scratch::default();
    for (name, img) in &files {
        let path = dir.join(name);
        img.save(&path).unwrap();
        let want = image::open(&path).unwrap().to_rgb8();
        let dims = s.decode_file(&path, "the test").unwrap();
        assert_eq!(dims, (want.width() as usize, want.height() as usize));
        assert_eq!(&s.rgb, want.as_raw(), "{name}");
    }
    // A file that is not an image names itself.
    let bad = dir.join("bad.jpg");
    std::fs::write(&bad, b"not a jpeg").unwrap();
    let e = s
        .decode_file(&bad, "line 3 of x.json")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bad.jpg") && e.contains("line 3 of x.json"),
        "{e}"
    );
}

/// After one image of the largest size has grown the buffers, the crop,
/// flip, RandAugment ops and normalisation allocate nothing per image; the
/// decoder's own working memory is what remains (counted, not zero).
#[test]
fn the_hot_path_allocates_only_in_the_decoder() {
    assert!(
        allocations().is_some(),
        "the counting allocator is installed"
    );
    let dir = scratch("image-pipeline-allocs");
    let paths: Vec<_> = (0..6)
        .map(|i| {
            let p = dir.join(format!("{i}.jpg"));
            image_of(120 - 7 * i, 96 + 5 * i, i as u64 * 2 + 1)
                .save(&p)
                .unwrap();
            p
        })
        .collect();
    let aug = albef();
    let size = 64;
    let mut s = Scratch::default();
    let mut draws = Draws::default();
    let mut out = vec![0f32; 3 * size * size];
    let (mut decode, mut rest) = (0, 0);
    for pass in 0..3 {
        for (i, p) in paths.iter().enumerate() {
            let key = AugKey {
                sample: (pass * 10 + i) as u64,
                epoch: 0,
            };
            let a = allocations().unwrap();
            let (w, h) = s.decode_file(p, "the test").unwrap();
            let b = allocations().unwrap();
            aug.draws_into(key, w, h, &mut draws);
            s.aug.crop_resize(&s.rgb, (w, h), &draws, size);
            s.aug.flip_and_ops(&draws, size);
            normalize_into(s.aug.image(), [0.5; 3], [0.25; 3], &mut out);
            let c = allocations().unwrap();
            if pass > 0 {
                decode += b - a;
                rest += c - b;
            }
        }
    }
    assert_eq!(rest, 0, "allocations after decoding, over 12 images");
    eprintln!("decoder allocations per image: {}", decode as f64 / 12.0);
}
