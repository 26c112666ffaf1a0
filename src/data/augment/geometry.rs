//! Geometric ops: the horizontal flip, and ALBEF's shear, translate and
//! rotate, which are OpenCV `warpAffine` calls (bilinear, constant border).
//! The warp is computed as OpenCV 5.1 computes it for 8-bit images: the
//! forward matrix inverted in double precision, then in single precision
//! each output pixel's source position, its bilinear interpolation as two
//! horizontal blends and a vertical one, rounded half to even; neighbours
//! outside the image take the fill colour. (OpenCV 4's fixed-point path,
//! positions rounded to 1/32 pixel, differs from it by up to 2/255.)

use image::RgbImage;

/// `img` mirrored left to right.
pub fn hflip(img: &RgbImage) -> RgbImage {
    image::imageops::flip_horizontal(img)
}

/// `img` warped by the forward affine map `m` (`[a, b, c, d, e, f]`: a
/// source pixel `(x, y)` lands at `(a x + b y + c, d x + e y + f)`), the
/// same size, uncovered pixels `fill`.
pub fn warp_affine(img: &RgbImage, m: [f64; 6], fill: [u8; 3]) -> RgbImage {
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
            let inside = ix >= 0 && iy >= 0 && ix + 1 < w && iy + 1 < h;
            let o = ((y * w + x) * 3) as usize;
            for c in 0..3 {
                let [p00, p01, p10, p11] = if inside {
                    let i = ((iy * w + ix) * 3) as usize + c;
                    let j = i + (w * 3) as usize;
                    [src[i], src[i + 3], src[j], src[j + 3]].map(f32::from)
                } else {
                    [
                        at(ix, iy, c),
                        at(ix + 1, iy, c),
                        at(ix, iy + 1, c),
                        at(ix + 1, iy + 1, c),
                    ]
                };
                let top = p00 + ax * (p01 - p00);
                let bottom = p10 + ax * (p11 - p10);
                let v = top + ay * (bottom - top);
                out[o + c] = v.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("sized buffer")
}

/// A single-precision matrix entry, as ALBEF builds its shear and
/// translate matrices (`np.float32`).
fn f32_entry(v: f64) -> f64 {
    f64::from(v as f32)
}

/// ALBEF's `ShearX`: `x' = x + factor * y`, about the top-left corner.
pub fn shear_x(img: &RgbImage, factor: f64, fill: [u8; 3]) -> RgbImage {
    warp_affine(img, [1.0, f32_entry(factor), 0.0, 0.0, 1.0, 0.0], fill)
}

/// ALBEF's `ShearY`: `y' = y + factor * x`.
pub fn shear_y(img: &RgbImage, factor: f64, fill: [u8; 3]) -> RgbImage {
    warp_affine(img, [1.0, 0.0, 0.0, f32_entry(factor), 1.0, 0.0], fill)
}

/// ALBEF's `TranslateX`: the content moves `offset` pixels left
/// (`x' = x - offset`).
pub fn translate_x(img: &RgbImage, offset: f64, fill: [u8; 3]) -> RgbImage {
    warp_affine(img, [1.0, 0.0, f32_entry(-offset), 0.0, 1.0, 0.0], fill)
}

/// ALBEF's `TranslateY`: the content moves `offset` pixels up.
pub fn translate_y(img: &RgbImage, offset: f64, fill: [u8; 3]) -> RgbImage {
    warp_affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, f32_entry(-offset)], fill)
}

/// ALBEF's `Rotate`: `degrees` counter-clockwise about `(W / 2, H / 2)`
/// (OpenCV's `getRotationMatrix2D`).
pub fn rotate(img: &RgbImage, degrees: f64, fill: [u8; 3]) -> RgbImage {
    let (cx, cy) = (f64::from(img.width()) / 2.0, f64::from(img.height()) / 2.0);
    let (sin, cos) = degrees.to_radians().sin_cos();
    warp_affine(
        img,
        [
            cos,
            sin,
            (1.0 - cos) * cx - sin * cy,
            -sin,
            cos,
            sin * cx + (1.0 - cos) * cy,
        ],
        fill,
    )
}
