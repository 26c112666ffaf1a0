//! TensorBoard event files: what `metrics.jsonl` and `eval.jsonl` hold, as
//! scalars under `RUN/tb/`, so that `tensorboard --logdir runs/` shows a
//! run while it trains.
//!
//! The format is TensorFlow's TFRecord of `Event` protobufs (tensorflow
//! `core/util/event.proto`, `core/framework/summary.proto`). It is written
//! here rather than through a crate: the TensorBoard writer crates
//! (`tensorboard-rs` 0.5, last released 2022, on `protobuf` 2 and `image`
//! 0.23) are unmaintained and pull in a code-generated copy of all of
//! TensorFlow's protos, where a scalar needs five fields. Those are encoded
//! by hand below (`Event`), and the CRC-32C a record carries is a
//! 20-line table (`crc32c`), checked against the standard's check value.
//! `tests/tensorboard.rs` reads the files back with the `tensorboard`
//! Python package's own reader.
//!
//! A record: `u64` length (little-endian), masked CRC-32C of those 8 bytes,
//! the data, masked CRC-32C of the data. Each file starts with an `Event`
//! whose `file_version` is `brain.Event:2`; with that version TensorBoard
//! drops the points at or after a `SessionLog` START event's step that
//! earlier files wrote, which is how a resumed run hides the steps a killed
//! one logged past its checkpoint.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use vlmatch_core::{Error, Result};

/// The event-file writer of one training invocation (rank 0).
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// A new event file in `dir` (created if missing). `resumed_at`: the
    /// step the run continues from; the file then marks a restart there, so
    /// that TensorBoard drops what earlier files logged after that step.
    pub fn create(dir: &Path, resumed_at: Option<i64>) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // TensorBoard reads a directory's files in name order, and the name
        // is `events.out.tfevents.<seconds>.<host>.<pid>`: a resume within
        // the same second as the file before it must still sort after it.
        let newest = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| file_seconds(&e.file_name().to_string_lossy()))
            .max();
        let secs = newest.map_or(now, |n| now.max(n + 1));
        let host = hostname();
        let path = dir.join(format!(
            "events.out.tfevents.{secs:010}.{host}.{}.vlmatch",
            std::process::id()
        ));
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { path, file };
        w.write_event(&Event {
            wall_time: wall_time(),
            file_version: Some("brain.Event:2"),
            ..Event::default()
        })?;
        if let Some(step) = resumed_at {
            // The first step this invocation logs is `step + 1`; the
            // checkpoint's own step stays as the earlier file logged it
            // (`metrics.jsonl` keeps it too).
            w.write_event(&Event {
                wall_time: wall_time(),
                step: step + 1,
                session_start: true,
                ..Event::default()
            })?;
        }
        w.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event at `step` with a scalar per `(key, value)`, tagged
    /// `group/key`; flushed, so that TensorBoard sees it while training
    /// runs (this is called at logging and evaluation steps only).
    pub fn scalars(&mut self, step: i64, group: &str, values: &[(String, f64)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let tagged: Vec<(String, f32)> = values
            .iter()
            .map(|(k, v)| (format!("{group}/{k}"), *v as f32))
            .collect();
        self.write_event(&Event {
            wall_time: wall_time(),
            step,
            scalars: &tagged,
            ..Event::default()
        })?;
        self.flush()
    }

    fn write_event(&mut self, event: &Event<'_>) -> Result<()> {
        let record = record(&event.encode());
        self.file
            .write_all(&record)
            .map_err(|e| Error::io(&self.path, e))
    }

    fn flush(&mut self) -> Result<()> {
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// The seconds field of an event file's name.
fn file_seconds(name: &str) -> Option<u64> {
    name.strip_prefix("events.out.tfevents.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    // Dots would split the name's fields; keep it a plain file name.
    let name: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The fields of `tensorflow.Event` this writer uses.
#[derive(Default)]
struct Event<'a> {
    wall_time: f64,
    step: i64,
    file_version: Option<&'a str>,
    /// `summary.value[i] = {tag, simple_value}`.
    scalars: &'a [(String, f32)],
    /// `session_log.status = START`.
    session_start: bool,
}

impl Event<'_> {
    /// Protobuf encoding: `Event {wall_time = 1 (double), step = 2 (int64),
    /// one of file_version = 3 (string), summary = 5 (Summary), session_log
    /// = 7 (SessionLog)}` (6 is the deprecated `log_message`), `Summary {value = 1 (repeated Value)}`, `Value {tag =
    /// 1 (string), simple_value = 2 (float)}`, `SessionLog {status = 1
    /// (enum, START = 1)}`.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        key(&mut out, 1, WIRE_I64);
        out.extend_from_slice(&self.wall_time.to_le_bytes());
        if self.step != 0 {
            key(&mut out, 2, WIRE_VARINT);
            varint(&mut out, self.step as u64);
        }
        if let Some(v) = self.file_version {
            bytes_field(&mut out, 3, v.as_bytes());
        }
        if !self.scalars.is_empty() {
            let mut summary = Vec::new();
            for (tag, value) in self.scalars {
                let mut v = Vec::new();
                bytes_field(&mut v, 1, tag.as_bytes());
                key(&mut v, 2, WIRE_I32);
                v.extend_from_slice(&value.to_le_bytes());
                bytes_field(&mut summary, 1, &v);
            }
            bytes_field(&mut out, 5, &summary);
        }
        if self.session_start {
            let mut log = Vec::new();
            key(&mut log, 1, WIRE_VARINT);
            varint(&mut log, 1);
            bytes_field(&mut out, 7, &log);
        }
        out
    }
}

const WIRE_VARINT: u8 = 0;
const WIRE_I64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_I32: u8 = 5;

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire)));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    key(out, field, WIRE_LEN);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), byte-wise over
/// a table built at compile time; event files are a few kilobytes per
/// logging step, so speed does not matter.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        // The CRC catalogue's check value, and the crc32c crate's example.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b"Hello world!"), 0x7b98_e751);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn a_scalar_event_encodes_as_protobuf() {
        let scalars = [("train/loss".to_string(), 0.5f32)];
        let bytes = Event {
            wall_time: 1.0,
            step: 300,
            scalars: &scalars,
            ..Event::default()
        }
        .encode();
        let mut want = vec![0x09];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0xac, 0x02]); // step 300 as a varint
        want.extend_from_slice(&[0x2a, 19, 0x0a, 17, 0x0a, 10]);
        want.extend_from_slice(b"train/loss");
        want.push(0x15);
        want.extend_from_slice(&0.5f32.to_le_bytes());
        assert_eq!(bytes, want);
    }

    #[test]
    fn a_restart_is_session_log_start_in_field_7() {
        let bytes = Event {
            step: 5,
            session_start: true,
            ..Event::default()
        }
        .encode();
        // `session_log` (7, length-delimited) holding `status` (1) = START (1).
        assert!(bytes.ends_with(&[0x10, 5, 0x3a, 2, 0x08, 1]), "{bytes:x?}");
    }

    #[test]
    fn resumed_files_sort_after_earlier_ones() {
        let dir = std::env::temp_dir().join(format!("vlmatch-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = EventWriter::create(&dir, None).unwrap();
        let b = EventWriter::create(&dir, Some(10)).unwrap();
        assert!(a.path() < b.path(), "{:?} {:?}", a.path(), b.path());
        let data = std::fs::read(b.path()).unwrap();
        let len = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
        assert_eq!(
            u32::from_le_bytes(data[8..12].try_into().unwrap()),
            masked_crc(&data[..8])
        );
        let body = &data[12..12 + len];
        assert_eq!(
            u32::from_le_bytes(data[12 + len..16 + len].try_into().unwrap()),
            masked_crc(body)
        );
        assert!(body.ends_with(b"brain.Event:2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
