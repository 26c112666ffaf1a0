//! `vlmatch filter` into a WebDataset tar shard: for each image with a kept
//! caption, its image member as it was read (`KEY.jpg`, `KEY.png`, ...) and
//! `KEY.json` with the kept captions and the image id, in the order of the
//! scored pairs; keys are the sample's position (`000000`, ...), so they
//! are unique whatever shards the samples came from. The archive is plain
//! ustar, written durably.

use crate::data::{Dataset, ImageRef};
use std::collections::BTreeMap;
use std::path::Path;
use vlmatch_core::{Error, Result};

/// A ustar header for a regular file `name` of `size` bytes.
fn header(name: &str, size: u64) -> Result<[u8; 512]> {
    if name.len() > 100 {
        return Err(Error::Config(format!(
            "tar member name `{name}` is over 100 bytes"
        )));
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    if size >= 1 << 33 {
        return Err(Error::Config(format!(
            "tar member `{name}`: {size} bytes do not fit a ustar header"
        )));
    }
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field as spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    Ok(h)
}

fn append(out: &mut Vec<u8>, name: &str, data: &[u8]) -> Result<()> {
    out.extend_from_slice(&header(name, data.len() as u64)?);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    Ok(())
}

/// Write the kept pairs (`kept`: positions in `ds.pairs`, in order) of a
/// dataset read from shards as one tar shard at `out`; returns the samples
/// written.
pub fn write_shard(ds: &Dataset, kept: &[usize], out: &Path) -> Result<usize> {
    // Images in the order of their first kept pair, each with its captions.
    let mut order: Vec<usize> = Vec::new();
    let mut captions: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for &k in kept {
        let p = ds.pairs.get(k).ok_or_else(|| {
            Error::Config(format!(
                "scored pair {k} is not in the source ({} pairs); score it again",
                ds.pairs.len()
            ))
        })?;
        let list = captions.entry(p.image).or_default();
        if list.is_empty() {
            order.push(p.image);
        }
        list.push(&p.caption);
    }
    let mut tar = Vec::new();
    for (n, &i) in order.iter().enumerate() {
        let key = format!("{n:06}");
        let (path, bytes) = match &ds.images[i] {
            ImageRef::File {
                path,
                bytes: Some(b),
                ..
            } => (path, b),
            _ => {
                return Err(Error::Config(
                    "filter into shards needs the images of tar shards".into(),
                ))
            }
        };
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("jpg")
            .to_ascii_lowercase();
        append(&mut tar, &format!("{key}.{ext}"), &bytes.0)?;
        let json = serde_json::json!({"caption": captions[&i], "image_id": ds.image_ids[i]});
        append(
            &mut tar,
            &format!("{key}.json"),
            json.to_string().as_bytes(),
        )?;
    }
    tar.extend_from_slice(&[0u8; 1024]);
    crate::durable::write(out, tar)?;
    Ok(order.len())
}

#[cfg(test)]
mod tests {
    #[test]
    fn headers_carry_size_and_a_valid_checksum() {
        let h = super::header("000001.png", 1234).unwrap();
        assert_eq!(&h[124..136], b"00000002322\0");
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        let mut blank = h;
        blank[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, blank.iter().map(|&b| u32::from(b)).sum::<u32>());
        assert!(super::header(&"x".repeat(101), 1).is_err());
    }
}
