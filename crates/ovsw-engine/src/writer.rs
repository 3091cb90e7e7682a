//! Writes a deploy file in the layout of [`crate::format`] (the one place its magic,
//! version, alignment and byte layout are defined).
//!
//! The exporter (`python/ovsw/deploy/`) traces the model and lowers each layer to ops
//! and tensors; it hands over the header's metadata and op list as JSON text (Python's
//! `json.dumps(..., separators=(",", ":"))`, so the user's metadata is written exactly as
//! Python serialises it) and the tensors as raw little-endian bytes. This module lays
//! the tensors out at 64-byte-aligned offsets, writes the tensor table, composes the
//! header (`format` and `version` first, then the metadata, `tensors`, `ops` and
//! `output`), appends the checksum and writes the file atomically.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::error::{value_err, Error, Result};
use crate::format::{DType, ALIGN, FORMAT_NAME, MAGIC, VERSION};

/// One tensor to store: its name in the tensor table, element type, shape and
/// little-endian bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorData {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// The header keys the writer sets itself (the metadata may not hold them).
const RESERVED: [&str; 5] = ["format", "version", "tensors", "ops", "output"];

/// `s` as a JSON string the way Python's `json.dumps` writes it (`ensure_ascii`):
/// `"` and `\` escaped, `\b \f \n \r \t` by name, every other character outside
/// printable ASCII (` ` to `~`) as `\uXXXX` in lowercase hex, a character beyond
/// U+FFFF as its UTF-16 surrogate pair.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

/// Checks that `text` is one JSON value of the kind `want` accepts, naming `what`.
fn parse_json(text: &str, what: &str, want: fn(&Value) -> bool) -> Result<Value> {
    match serde_json::from_str::<Value>(text) {
        Ok(v) if want(&v) => Ok(v),
        Ok(_) => value_err!("the deploy header's {what} has the wrong JSON type"),
        Err(e) => value_err!("the deploy header's {what} is not valid JSON ({e})"),
    }
}

/// The whole file: `metadata` (a JSON object's text, without the keys the writer
/// sets), the `tensors` in table order, `ops` (a JSON array's text) and the graph's
/// `output` value.
pub fn to_bytes(
    metadata: &str,
    tensors: &[TensorData],
    ops: &str,
    output: usize,
) -> Result<Vec<u8>> {
    let meta = parse_json(metadata, "metadata", Value::is_object)?;
    if let Some(key) = RESERVED.iter().find(|k| meta.get(**k).is_some()) {
        return value_err!("the deploy header's metadata may not set '{key}'");
    }
    parse_json(ops, "op list", Value::is_array)?;
    let mut table = String::from("{");
    let mut data: Vec<u8> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, t) in tensors.iter().enumerate() {
        if !names.insert(t.name.as_str()) {
            return value_err!("tensor '{}' is stored twice", t.name);
        }
        let count = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if count.and_then(|c| c.checked_mul(t.dtype.size())) != Some(t.bytes.len()) {
            return value_err!(
                "tensor '{}' of shape {:?} cannot hold {} bytes of {}",
                t.name,
                t.shape,
                t.bytes.len(),
                t.dtype.name()
            );
        }
        data.resize(data.len().next_multiple_of(ALIGN), 0);
        let shape: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        if i > 0 {
            table.push(',');
        }
        table.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"offset\":{},\"nbytes\":{}}}",
            json_string(&t.name),
            t.dtype.name(),
            shape.join(","),
            data.len(),
            t.bytes.len()
        ));
        data.extend_from_slice(&t.bytes);
    }
    table.push('}');
    let inner = metadata.trim()[1..metadata.trim().len() - 1].trim();
    let mut header = format!(
        "{{\"format\":{},\"version\":{VERSION},",
        json_string(FORMAT_NAME)
    );
    if !inner.is_empty() {
        header.push_str(inner);
        header.push(',');
    }
    header.push_str(&format!(
        "\"tensors\":{table},\"ops\":{},\"output\":{output}}}",
        ops.trim()
    ));
    let mut out = Vec::with_capacity(header.len() + data.len() + 2 * ALIGN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // flags
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len().next_multiple_of(ALIGN), 0);
    out.extend_from_slice(&data);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// An I/O error naming the file it concerns.
fn io_err(what: &str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        message: format!("cannot {what} {}: {source}", path.display()),
        source,
    }
}

/// Writes `bytes` to `path` atomically: into a new temporary file beside it, flushed
/// to disk, then renamed over `path`, so a reader sees the old file or the whole new
/// one, never a part. The temporary file is removed when any step fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let Some(name) = path.file_name() else {
        return value_err!(
            "cannot write a deploy file to {}: not a file name",
            path.display()
        );
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let (tmp, mut file) = loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp_name = format!(
            "{}.{}-{nanos:08x}-{n}.tmp",
            name.to_string_lossy(),
            std::process::id()
        );
        let tmp = dir.join(tmp_name);
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => continue,
            Err(e) => return Err(io_err("create", &tmp, e)),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err("write", &tmp, e))
        .and_then(|()| {
            drop(file);
            fs::rename(&tmp, path).map_err(|e| io_err("rename into", path, e))
        });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format;

    fn f32_tensor(name: &str, values: &[f32], shape: &[usize]) -> TensorData {
        TensorData {
            name: name.into(),
            dtype: DType::F32,
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn strings_are_escaped_as_python_json_dumps_does() {
        assert_eq!(json_string("conv1.weight"), "\"conv1.weight\"");
        assert_eq!(json_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(json_string("\n\r\t\u{8}\u{c}"), "\"\\n\\r\\t\\b\\f\"");
        assert_eq!(json_string("\u{1}\u{7f}"), "\"\\u0001\\u007f\"");
        assert_eq!(json_string("é"), "\"\\u00e9\"");
        assert_eq!(json_string("\u{1F600}"), "\"\\ud83d\\ude00\"");
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        let tensors = [
            f32_tensor("a", &[1.0, -2.0, 0.5], &[3]),
            TensorData {
                name: "b".into(),
                dtype: DType::U64,
                shape: vec![1, 2],
                bytes: [5u64, 7].iter().flat_map(|v| v.to_le_bytes()).collect(),
            },
        ];
        let bytes = to_bytes(r#"{"arch":"x","input":{"channels":3}}"#, &tensors, "[]", 0).unwrap();
        let header = concat!(
            r#"{"format":"ovsw-deploy","version":1,"arch":"x","input":{"channels":3},"#,
            r#""tensors":{"a":{"dtype":"f32","shape":[3],"offset":0,"nbytes":12},"#,
            r#""b":{"dtype":"u64","shape":[1,2],"offset":64,"nbytes":16}},"#,
            r#""ops":[],"output":0}"#
        );
        assert_eq!(&bytes[..8], b"OVSWNET\0");
        assert_eq!(bytes[8..12], 1u32.to_le_bytes());
        assert_eq!(bytes[12..16], 0u32.to_le_bytes());
        assert_eq!(bytes[16..24], (header.len() as u64).to_le_bytes());
        assert_eq!(bytes[24..32], 80u64.to_le_bytes());
        assert_eq!(&bytes[32..32 + header.len()], header.as_bytes());
        let data_start = (32 + header.len()).div_ceil(64) * 64;
        assert!(bytes[32 + header.len()..data_start].iter().all(|&b| b == 0));
        assert_eq!(bytes.len(), data_start + 80 + 4);
        assert_eq!(&bytes[data_start..data_start + 4], &1.0f32.to_le_bytes());
        assert_eq!(bytes[data_start + 64], 5);
        let end = bytes.len() - 4;
        assert_eq!(bytes[end..], crc32fast::hash(&bytes[..end]).to_le_bytes());
        let file = format::parse(&bytes).unwrap();
        assert_eq!(file.tensors["b"].bytes, 64..80);
    }

    #[test]
    fn bad_input_is_refused() {
        let t = [f32_tensor("a", &[1.0], &[2])];
        let err = to_bytes("{}", &t, "[]", 0).unwrap_err().to_string();
        assert!(err.contains("cannot hold 4 bytes"), "{err}");
        let twice = [f32_tensor("a", &[1.0], &[1]), f32_tensor("a", &[1.0], &[1])];
        assert!(to_bytes("{}", &twice, "[]", 0).is_err());
        assert!(to_bytes("[]", &[], "[]", 0).is_err());
        assert!(to_bytes(r#"{"version":2}"#, &[], "[]", 0).is_err());
        assert!(to_bytes("{}", &[], "{}", 0).is_err());
        assert!(to_bytes("{", &[], "[]", 0).is_err());
    }

    #[test]
    fn writing_is_atomic_and_leaves_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("ovsw-engine-writer-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("net.ovsw");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new bytes").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new bytes");
        let left: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1);
        let missing = dir.join("no such folder").join("net.ovsw");
        match write_atomic(&missing, b"x") {
            Err(Error::Io { source, .. }) => {
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
            }
            other => panic!("expected a NotFound I/O error, got {other:?}"),
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
