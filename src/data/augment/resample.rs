//! Bicubic resampling as Pillow's `Image.resize(..., BICUBIC)` computes it
//! (what torchvision's `RandomResizedCrop` runs on a PIL image): a separable
//! convolution with the Keys cubic (a = -0.5) whose support widens by the
//! downscaling factor (antialiasing), weights normalised per output pixel
//! and rounded to 22-bit fixed point, the horizontal pass first into an
//! 8-bit intermediate image, then the vertical pass.

use image::RgbImage;

/// Fixed-point fraction bits of the weights (Pillow's `PRECISION_BITS`).
const BITS: u32 = 32 - 8 - 2;

/// The Keys cubic convolution kernel with a = -0.5, support 2.
fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of every output pixel of one axis: output `o` sums input
/// pixels `first[o]..first[o] + len[o]` with `weights[o * width..]`.
#[derive(Debug, Default, Clone)]
struct Taps {
    first: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<i32>,
    width: usize,
    /// The weights in pairs of taps, each spread over four lanes
    /// (`[w0; 4]`, `[w1; 4]`), a missing second tap weighing 0: the SIMD
    /// horizontal pass's operands, `pairs()` pairs per output.
    paired: Vec<i32>,
}

impl Taps {
    /// The taps of each of `out` output pixels over an input axis `size`
    /// long, in place of the previous ones (no allocation once the buffers
    /// are large enough).
    fn compute(&mut self, size: usize, out: usize) {
        let scale = size as f64 / out as f64;
        let filterscale = scale.max(1.0);
        let support = 2.0 * filterscale;
        // Pillow's kernel size bound: every output's taps fit in it.
        self.width = (support.ceil() as usize) * 2 + 1;
        self.first.clear();
        self.len.clear();
        self.weights.clear();
        self.weights.resize(out * self.width, 0);
        for o in 0..out {
            let centre = (o as f64 + 0.5) * scale;
            // Truncation toward zero after adding a half, as Pillow rounds.
            let lo = ((centre - support + 0.5) as i64).max(0) as usize;
            let hi = ((centre + support + 0.5) as i64).min(size as i64) as usize;
            let raw = |x: usize| cubic((x as f64 - centre + 0.5) / filterscale);
            // Summed left to right from -0.0, as `Iterator::sum` does.
            let sum = (lo..hi).fold(-0.0f64, |acc, x| acc + raw(x));
            let row = &mut self.weights[o * self.width..(o + 1) * self.width];
            for (x, slot) in (lo..hi).zip(row.iter_mut()) {
                let w = raw(x);
                let w = if sum != 0.0 { w / sum } else { w };
                let f = w * f64::from(1u32 << BITS);
                *slot = (if w < 0.0 { f - 0.5 } else { f + 0.5 }) as i32;
            }
            self.first.push(lo);
            self.len.push(hi - lo);
        }
        let pairs = self.pairs();
        self.paired.clear();
        self.paired.resize(out * pairs * 8, 0);
        for o in 0..out {
            let w = &self.weights[o * self.width..o * self.width + self.len[o]];
            let dst = &mut self.paired[o * pairs * 8..(o + 1) * pairs * 8];
            for (k, &wt) in w.iter().enumerate() {
                let at = (k / 2) * 8 + (k % 2) * 4;
                dst[at..at + 4].fill(wt);
            }
        }
    }

    /// Room for the taps of any axis up to `size` long resampled to
    /// `least` to `out` pixels (a crop's taps never outgrow its image's).
    fn reserve(&mut self, size: usize, least: usize, out: usize) {
        let support = 2.0 * (size as f64 / least.max(1) as f64).max(1.0);
        let width = (support.ceil() as usize) * 2 + 1;
        let grow = |v: &mut Vec<i32>, n: usize| v.reserve(n.saturating_sub(v.len()));
        grow(&mut self.weights, out * width);
        grow(&mut self.paired, out * width.div_ceil(2) * 8);
        self.first.reserve(out.saturating_sub(self.first.len()));
        self.len.reserve(out.saturating_sub(self.len.len()));
    }

    /// Pairs of taps per output in `paired`.
    fn pairs(&self) -> usize {
        self.width.div_ceil(2)
    }

    fn of(&self, o: usize) -> (usize, &[i32]) {
        let at = o * self.width;
        (self.first[o], &self.weights[at..at + self.len[o]])
    }
}

/// A fixed-point sum back to a byte, clamped. Sums stay within `i32`, as
/// in Pillow: weights of one tap set add up to `2^22` and their absolute
/// values to less than `1.3 * 2^22`.
fn clip8(acc: i32) -> u8 {
    (acc >> BITS).clamp(0, 255) as u8
}

/// The rounding half added to every sum.
const HALF: i32 = 1 << (BITS - 1);

/// A view of RGB rows: `w` x `h` pixels at `(x0, y0)` of a buffer whose
/// rows are `stride` bytes apart.
#[derive(Clone, Copy)]
struct View<'a> {
    src: &'a [u8],
    stride: usize,
    x0: usize,
    y0: usize,
    w: usize,
    h: usize,
}

impl View<'_> {
    fn row(&self, y: usize) -> &[u8] {
        let at = (self.y0 + y) * self.stride + self.x0 * 3;
        &self.src[at..at + self.w * 3]
    }
}

/// `v` resampled along its rows to `taps.len()` pixels, into `dst`.
fn horizontal(v: View, taps: &Taps, dst: &mut Vec<u8>) {
    let out_w = taps.first.len();
    dst.clear();
    dst.resize(out_w * v.h * 3, 0);
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    for (y, out) in dst.chunks_exact_mut(out_w * 3).enumerate() {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // The row with the rest of the buffer after it, which the
            // SIMD loads may read past the row's end (at weight 0).
            let at = (v.y0 + y) * v.stride + v.x0 * 3;
            // SAFETY: the CPU has AVX2 (checked above).
            unsafe { horizontal_row_avx2(&v.src[at..], v.w, taps, out) };
            continue;
        }
        let row = v.row(y);
        for (o, px) in out.chunks_exact_mut(3).enumerate() {
            horizontal_pixel(row, taps, o, px);
        }
    }
}

/// Output pixel `o` of one row, one tap at a time.
#[inline(always)]
fn horizontal_pixel(row: &[u8], taps: &Taps, o: usize, px: &mut [u8]) {
    let (first, weights) = taps.of(o);
    let (mut r, mut g, mut b) = (HALF, HALF, HALF);
    let from = &row[first * 3..(first + weights.len()) * 3];
    for (p, &wt) in from.chunks_exact(3).zip(weights) {
        r += i32::from(p[0]) * wt;
        g += i32::from(p[1]) * wt;
        b += i32::from(p[2]) * wt;
    }
    px[0] = clip8(r);
    px[1] = clip8(g);
    px[2] = clip8(b);
}

/// One row of the horizontal pass, two taps per step in eight 32-bit
/// lanes (the first tap's R, G, B and a zero, then the second's). The
/// same integer sums as [`horizontal_pixel`], added in another order,
/// which integers (that never overflow here) do not notice. `src` starts
/// at the row (`w` pixels) and runs on to the buffer's end; an output
/// whose last load would pass that end is summed one tap at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn horizontal_row_avx2(src: &[u8], w: usize, taps: &Taps, out: &mut [u8]) {
    use std::arch::x86_64::*;
    let pairs = taps.pairs();
    // Bytes 0-2 and 3-5 of an 8-byte load into lanes 0-2 and 4-6.
    let spread = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (o, px) in out.chunks_exact_mut(3).enumerate() {
        let first = taps.first[o];
        let n = taps.len[o].div_ceil(2);
        // The last pair's load: 8 bytes from its first tap.
        if first * 3 + (n.max(1) - 1) * 6 + 8 > src.len() {
            horizontal_pixel(&src[..w * 3], taps, o, px);
            continue;
        }
        let weights = &taps.paired[o * pairs * 8..(o * pairs + n) * 8];
        let mut acc = _mm256_setzero_si256();
        for (k, wt) in weights.chunks_exact(8).enumerate() {
            let at = (first + 2 * k) * 3;
            let bytes: &[u8; 8] = src[at..at + 8].try_into().expect("8 bytes");
            // SAFETY: an unaligned load of the 8 bytes of `bytes`.
            let v = unsafe { _mm_loadl_epi64(bytes.as_ptr().cast()) };
            let v = _mm_shuffle_epi8(v, spread);
            let wt: &[i32; 8] = wt.try_into().expect("8 weights");
            // SAFETY: an unaligned load of 8 in-bounds i32s.
            let wv = unsafe { _mm256_loadu_si256(wt.as_ptr().cast()) };
            acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(v), wv));
        }
        let sum = _mm_add_epi32(
            _mm256_castsi256_si128(acc),
            _mm256_extracti128_si256(acc, 1),
        );
        let mut lanes = [0i32; 4];
        // SAFETY: an unaligned store of 4 i32s into `lanes`.
        unsafe { _mm_storeu_si128(lanes.as_mut_ptr().cast(), sum) };
        px[0] = clip8(HALF + lanes[0]);
        px[1] = clip8(HALF + lanes[1]);
        px[2] = clip8(HALF + lanes[2]);
    }
}

/// `acc[i] += row[i] * wt` over a row: the vertical pass's inner loop,
/// which the compiler vectorises (with AVX2 where the CPU has it).
#[inline(always)]
fn accumulate_row(acc: &mut [i32], row: &[u8], wt: i32) {
    for (a, &p) in acc.iter_mut().zip(row) {
        *a += i32::from(p) * wt;
    }
}

/// Every tap of one output row: `acc` starts at the rounding half.
#[inline(always)]
fn sum_rows(acc: &mut [i32], v: View, first: usize, weights: &[i32]) {
    acc.fill(HALF);
    for (k, &wt) in weights.iter().enumerate() {
        accumulate_row(acc, v.row(first + k), wt);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_rows_avx2(acc: &mut [i32], v: View, first: usize, weights: &[i32]) {
    sum_rows(acc, v, first, weights)
}

/// `v` resampled along its columns to `taps.len()` rows, into `dst`, a
/// whole row of sums (`acc`) at a time.
fn vertical(v: View, taps: &Taps, acc: &mut Vec<i32>, dst: &mut Vec<u8>) {
    let out_h = taps.first.len();
    let stride = v.w * 3;
    dst.clear();
    dst.resize(stride * out_h, 0);
    acc.clear();
    acc.resize(stride, 0);
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    for (o, out) in dst.chunks_exact_mut(stride).enumerate() {
        let (first, weights) = taps.of(o);
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 (checked above).
            unsafe { sum_rows_avx2(acc, v, first, weights) }
        } else {
            sum_rows(acc, v, first, weights)
        }
        #[cfg(not(target_arch = "x86_64"))]
        sum_rows(acc, v, first, weights);
        for (o, &a) in out.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
}

/// The reusable buffers of [`resized_crop_into`]: taps, the row sums and
/// the intermediate image, kept by a loader worker from image to image.
#[derive(Debug, Default)]
pub struct Resample {
    taps: Taps,
    acc: Vec<i32>,
    tmp: Vec<u8>,
}

/// `img`'s box `(left, top, width, height)` resized to `out_w` x `out_h`,
/// as Pillow's `img.crop(box).resize((out_w, out_h), BICUBIC)`: the crop
/// is cut first, so the filter clamps at the box's edges. Each pass rounds
/// to bytes; the vertical pass comes first when it shrinks and the
/// horizontal one grows (Pillow runs the reducing pass first then), else
/// the horizontal one; an axis whose size is kept is not filtered.
pub fn resized_crop(
    img: &RgbImage,
    crop: (usize, usize, usize, usize),
    out_w: usize,
    out_h: usize,
) -> RgbImage {
    let mut out = Vec::new();
    let (w, h) = (img.width() as usize, img.height() as usize);
    resized_crop_into(
        img.as_raw(),
        (w, h),
        crop,
        (out_w, out_h),
        &mut Resample::default(),
        &mut out,
    );
    RgbImage::from_raw(out_w as u32, out_h as u32, out).expect("sized buffer")
}

/// [`resized_crop`] of the `iw` x `ih` RGB buffer `src` into `dst`
/// (`out_w * out_h * 3` bytes), the work buffers taken from `r`: bit for
/// bit the same, without allocating once `r` and `dst` have grown.
pub fn resized_crop_into(
    src: &[u8],
    (iw, ih): (usize, usize),
    (left, top, w, h): (usize, usize, usize, usize),
    (out_w, out_h): (usize, usize),
    r: &mut Resample,
    dst: &mut Vec<u8>,
) {
    assert!(
        left + w <= iw && top + h <= ih && w > 0 && h > 0 && out_w > 0 && out_h > 0,
        "crop box {w} x {h} at ({left}, {top}) inside the {iw} x {ih} image"
    );
    assert_eq!(src.len(), iw * ih * 3, "an {iw} x {ih} RGB buffer");
    let crop = View {
        src,
        stride: iw * 3,
        x0: left,
        y0: top,
        w,
        h,
    };
    // Room for any crop of this image, so that a later, larger crop of an
    // image no larger does not grow a buffer.
    r.taps
        .reserve(iw.max(ih), out_w.min(out_h), out_w.max(out_h));
    let grow = |v: &mut Vec<u8>, n: usize| v.reserve(n.saturating_sub(v.len()));
    grow(&mut r.tmp, 3 * (out_w * ih).max(iw * out_h));
    r.acc
        .reserve((3 * iw.max(out_w)).saturating_sub(r.acc.len()));
    let rows = w != out_w;
    let cols = h != out_h;
    let vertical_first = out_w > w && out_h < h;
    match (rows, cols) {
        (false, false) => {
            dst.clear();
            for y in 0..h {
                dst.extend_from_slice(crop.row(y));
            }
        }
        (true, false) => {
            r.taps.compute(w, out_w);
            horizontal(crop, &r.taps, dst);
        }
        (false, true) => {
            r.taps.compute(h, out_h);
            vertical(crop, &r.taps, &mut r.acc, dst);
        }
        (true, true) if vertical_first => {
            r.taps.compute(h, out_h);
            vertical(crop, &r.taps, &mut r.acc, &mut r.tmp);
            r.taps.compute(w, out_w);
            horizontal(packed(&r.tmp, w, out_h), &r.taps, dst);
        }
        (true, true) => {
            r.taps.compute(w, out_w);
            horizontal(crop, &r.taps, &mut r.tmp);
            r.taps.compute(h, out_h);
            vertical(packed(&r.tmp, out_w, h), &r.taps, &mut r.acc, dst);
        }
    }
}

/// A whole packed `w` x `h` RGB buffer as a view.
fn packed(src: &[u8], w: usize, h: usize) -> View<'_> {
    View {
        src,
        stride: w * 3,
        x0: 0,
        y0: 0,
        w,
        h,
    }
}
