//! A minimal sequential reader of POSIX (ustar) tar archives: regular files
//! only, with GNU long names (`L`) and pax `path` records; other entries
//! (directories, links, global headers) are passed over. Member data is read
//! on request or skipped, so a reader can walk an archive without loading it.
//!
//! Any bytes are safe to read: a corrupt or truncated archive is an `Err`
//! naming the byte or member, never a panic or an allocation its size fields
//! ask for (`tests/parsers_props.rs` feeds it random bytes).

use std::io::{self, Read, Seek, SeekFrom};

const BLOCK: u64 = 512;

/// A regular file in the archive; its data starts at byte `offset`.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub size: u64,
    pub offset: u64,
}

impl Member {
    /// `Err` naming the member, its size and the config key `key` when its
    /// header claims more than `cap` bytes: such a member is refused before
    /// any of it is read, so a header cannot ask for a large allocation.
    pub fn check_size(&self, cap: u64, key: &str) -> Result<(), String> {
        if self.size <= cap {
            return Ok(());
        }
        Err(format!(
            "member {} is {} bytes, over {key} ({cap} bytes); refused before reading it \
             (raise the key for real members this large)",
            self.name, self.size
        ))
    }
}

/// Walks the members of an archive in order: [`TarReader::next_member`],
/// then optionally [`TarReader::read_data`] for that member.
pub struct TarReader<R> {
    inner: R,
    /// Bytes consumed so far.
    pos: u64,
    /// Bytes of the current member (data and padding) not yet consumed.
    pending: u64,
    done: bool,
    /// Length of the stream, learnt on the first seek (a seek past the end
    /// succeeds, so a truncated archive is caught by comparing with it).
    len: Option<u64>,
}

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn octal(field: &[u8]) -> Option<u64> {
    let text = cstr(field);
    let text = text.trim_matches(|c: char| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

/// A numeric field: octal text, or base-256 when the high bit is set.
fn number(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        Some(v)
    } else {
        octal(field)
    }
}

/// The `path` record of a pax extended header, if any.
fn pax_path(data: &[u8]) -> Option<String> {
    let mut rest = data;
    while let Some(space) = rest.iter().position(|&b| b == b' ') {
        let len: usize = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
        if len <= space || len > rest.len() {
            return None;
        }
        let record = &rest[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(value) = record.strip_prefix(b"path=") {
            return Some(String::from_utf8_lossy(value).into_owned());
        }
        rest = &rest[len..];
    }
    None
}

impl<R: Read + Seek> TarReader<R> {
    pub fn new(inner: R) -> Self {
        TarReader {
            inner,
            pos: 0,
            pending: 0,
            done: false,
            len: None,
        }
    }

    fn stream_len(&mut self) -> io::Result<u64> {
        if let Some(len) = self.len {
            return Ok(len);
        }
        let here = self.inner.stream_position()?;
        let len = self.inner.seek(SeekFrom::End(0))?;
        self.inner.seek(SeekFrom::Start(here))?;
        self.len = Some(len);
        Ok(len)
    }

    fn skip(&mut self, n: u64) -> io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        if n <= 64 * 1024 {
            let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
            if copied < n {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated archive",
                ));
            }
        } else {
            let here = self.inner.stream_position()?;
            let to = here.checked_add(n).filter(|&to| to <= self.len_or_max());
            let Some(to) = to else {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "truncated archive (a member runs past the end of the file)",
                ));
            };
            self.inner.seek(SeekFrom::Start(to))?;
        }
        self.pos += n;
        Ok(())
    }

    /// The stream's length, or `u64::MAX` where it cannot be learnt.
    fn len_or_max(&mut self) -> u64 {
        self.stream_len().unwrap_or(u64::MAX)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Read up to one block; returns the bytes read (0 at a clean end).
    fn read_block(&mut self, block: &mut [u8; 512]) -> io::Result<usize> {
        let mut got = 0;
        while got < block.len() {
            match self.inner.read(&mut block[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pos += got as u64;
        Ok(got)
    }

    /// The next regular file, or `None` at the end of the archive. Data of
    /// the previous member that was not read is skipped.
    pub fn next_member(&mut self) -> Result<Option<Member>, String> {
        if self.done {
            return Ok(None);
        }
        let pending = std::mem::take(&mut self.pending);
        self.skip(pending)
            .map_err(|e| format!("at byte {}: {e}", self.pos))?;
        let mut long_name: Option<String> = None;
        loop {
            let at = self.pos;
            let mut h = [0u8; 512];
            let got = self
                .read_block(&mut h)
                .map_err(|e| format!("at byte {at}: {e}"))?;
            if got == 0 || h.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            if got < h.len() {
                return Err(format!("truncated header at byte {at}"));
            }
            let stored = octal(&h[148..156]);
            let sum: u64 = h
                .iter()
                .enumerate()
                .map(|(i, &b)| u64::from(if (148..156).contains(&i) { b' ' } else { b }))
                .sum();
            if stored != Some(sum) {
                return Err(format!("not a tar header at byte {at} (checksum mismatch)"));
            }
            let size = number(&h[124..136])
                .ok_or_else(|| format!("bad size field in the header at byte {at}"))?;
            let padded = size
                .checked_next_multiple_of(BLOCK)
                .ok_or_else(|| format!("bad size field in the header at byte {at}"))?;
            let mut name = cstr(&h[..100]);
            if &h[257..262] == b"ustar" {
                let prefix = cstr(&h[345..500]);
                if !prefix.is_empty() {
                    name = format!("{prefix}/{name}");
                }
            }
            let name = long_name.take().unwrap_or(name);
            let io_err = |e: io::Error| format!("member {name}: {e}");
            match h[156] {
                b'0' | 0 | b'7' => {
                    self.pending = padded;
                    return Ok(Some(Member {
                        name,
                        size,
                        offset: self.pos,
                    }));
                }
                kind @ (b'L' | b'x') => {
                    if size > 1 << 20 {
                        return Err(format!("oversized extended header at byte {at}"));
                    }
                    let mut data = vec![0u8; size as usize];
                    self.read_exact(&mut data).map_err(io_err)?;
                    self.skip(padded - size).map_err(io_err)?;
                    long_name = if kind == b'L' {
                        Some(cstr(&data))
                    } else {
                        pax_path(&data)
                    };
                }
                _ => self.skip(padded).map_err(io_err)?,
            }
        }
    }

    /// The data of `member`, which must be the member last returned and not
    /// yet read.
    pub fn read_data(&mut self, member: &Member) -> Result<Vec<u8>, String> {
        if self.pos != member.offset || self.pending < member.size {
            return Err(format!(
                "member {}: read out of order (at byte {}, its data starts at {})",
                member.name, self.pos, member.offset
            ));
        }
        let data = read_n(&mut self.inner, member.size)
            .map_err(|e| format!("member {}: {e}", member.name))?;
        self.pos += member.size;
        self.pending -= member.size;
        Ok(data)
    }
}

/// Exactly `n` bytes of `r`, or `UnexpectedEof`; the buffer grows with what
/// is read, so a corrupt size field cannot ask for a huge allocation.
fn read_n(r: &mut impl Read, n: u64) -> io::Result<Vec<u8>> {
    let mut data = Vec::with_capacity(n.min(1 << 20) as usize);
    r.take(n).read_to_end(&mut data)?;
    if (data.len() as u64) < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "truncated archive ({} of {n} bytes of member data)",
                data.len()
            ),
        ));
    }
    Ok(data)
}

/// `len` bytes at `offset` of the file at `path` (a member's data).
pub fn read_at(path: &std::path::Path, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    read_n(&mut f, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn header(name: &str, size: usize, kind: u8) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    fn entry(out: &mut Vec<u8>, name: &str, data: &[u8], kind: u8) {
        out.extend_from_slice(&header(name, data.len(), kind));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }

    #[test]
    fn reads_members_long_names_and_skips_unread_data() {
        let mut tar = Vec::new();
        entry(&mut tar, "dir/", b"", b'5');
        entry(&mut tar, "a.txt", b"hello", b'0');
        entry(&mut tar, "././@LongLink", b"long/name.json\0", b'L');
        entry(&mut tar, "ignored", b"{}", b'0');
        entry(&mut tar, "pax", b"20 path=p/x.png.png\n", b'x');
        entry(&mut tar, "short", &[7u8; 700], b'0');
        tar.extend_from_slice(&[0u8; 1024]);
        let mut r = TarReader::new(Cursor::new(tar));
        let a = r.next_member().unwrap().unwrap();
        assert_eq!((a.name.as_str(), a.size), ("a.txt", 5));
        assert_eq!(r.read_data(&a).unwrap(), b"hello");
        let b = r.next_member().unwrap().unwrap();
        assert_eq!(b.name, "long/name.json");
        let c = r.next_member().unwrap().unwrap();
        assert_eq!((c.name.as_str(), c.size), ("p/x.png.png", 700));
        assert!(r.next_member().unwrap().is_none());
    }

    #[test]
    fn a_member_over_its_cap_is_refused_naming_it() {
        let m = Member {
            name: "k.txt".into(),
            size: 1 << 40,
            offset: 512,
        };
        let e = m.check_size(1 << 20, "data.max_text_bytes").unwrap_err();
        assert!(
            e.contains("k.txt") && e.contains("data.max_text_bytes"),
            "{e}"
        );
        assert!(m.check_size(1 << 40, "data.max_text_bytes").is_ok());
    }

    #[test]
    fn a_bad_checksum_is_an_error() {
        let mut tar = Vec::new();
        entry(&mut tar, "a.txt", b"hello", b'0');
        tar[0] = b'b';
        let mut r = TarReader::new(Cursor::new(tar));
        assert!(r.next_member().unwrap_err().contains("checksum"));
    }
}
