//! The deploy file format (version 1), read without PyTorch.
//!
//! ```text
//! offset  size  field
//! 0       8     magic b"OVSWNET\0"
//! 8       4     format version, u32 little-endian (1)
//! 12      4     flags, u32 LE (0; reserved)
//! 16      8     header length H, u64 LE
//! 24      8     data length D, u64 LE
//! 32      H     header: UTF-8 JSON (graph, tensor table, metadata)
//! ..            zero bytes up to a multiple of 64
//! ..      D     data: raw little-endian tensors, each at a 64-byte-aligned offset
//! end-4   4     CRC-32 (zlib polynomial) of every byte before it, u32 LE
//! ```
//!
//! The JSON header holds `"tensors"` (name -> `{dtype: "f32"|"u64", shape, offset,
//! nbytes}`, offsets relative to the data section), `"ops"` (the graph, one object per
//! op, in execution order, reading and writing numbered values; value 0 is the input)
//! and `"output"` (the value returned). [`crate::writer`] writes it (from what
//! `python/ovsw/deploy/` lowers; `_export.py` documents every op); [`crate::engine`]
//! checks the ops.

use std::collections::HashMap;
use std::ops::Range;

use serde_json::Value;

use crate::error::{value_err, Result};

pub const MAGIC: &[u8; 8] = b"OVSWNET\0";
pub const VERSION: u32 = 1;
/// The header's `"format"` entry.
pub const FORMAT_NAME: &str = "ovsw-deploy";
const PREAMBLE: usize = 32;
/// The alignment of the data section and of each tensor in it, in bytes.
pub const ALIGN: usize = 64;

/// A tensor's element type in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    U64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::U64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::U64 => "u64",
        }
    }
}

/// One entry of the tensor table: its type, shape and bytes in the data section
/// (checked to lie inside it and to match the shape).
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Range<usize>,
}

/// A parsed file: its JSON header, its tensor table and the data section the table
/// points into (decoded only when an op takes a tensor).
pub struct File<'a> {
    pub header: Value,
    pub tensors: HashMap<String, TensorEntry>,
    pub data: &'a [u8],
}

/// Little-endian f32 values.
pub fn f32s(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Little-endian u64 values.
pub fn u64s(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8).map(le_u64).collect()
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn round_up(n: usize, to: usize) -> Option<usize> {
    n.checked_add(to - 1).map(|v| v / to * to)
}

/// Parses and checks a whole file held in memory.
pub fn parse(bytes: &[u8]) -> Result<File<'_>> {
    if bytes.len() < PREAMBLE + 4 {
        return value_err!(
            "not an ovsw deploy file: {} bytes is shorter than the {}-byte preamble",
            bytes.len(),
            PREAMBLE + 4
        );
    }
    if &bytes[..8] != MAGIC {
        return value_err!("not an ovsw deploy file (bad magic bytes; expected OVSWNET)");
    }
    let version = le_u32(&bytes[8..]);
    if version != VERSION {
        return value_err!(
            "deploy file format version {version} is not supported by this ovsw (reads version {VERSION}); \
             export the model again with this ovsw"
        );
    }
    let header_len = usize::try_from(le_u64(&bytes[16..])).ok();
    let data_len = usize::try_from(le_u64(&bytes[24..])).ok();
    let (header_len, data_len) = match (header_len, data_len) {
        (Some(h), Some(d)) => (h, d),
        _ => return value_err!("corrupt deploy file: section lengths do not fit in memory"),
    };
    let data_start = PREAMBLE
        .checked_add(header_len)
        .and_then(|e| round_up(e, ALIGN));
    let expected = data_start
        .and_then(|s| s.checked_add(data_len))
        .and_then(|e| e.checked_add(4));
    let (data_start, expected) = match (data_start, expected) {
        (Some(s), Some(e)) => (s, e),
        _ => return value_err!("corrupt deploy file: section lengths overflow"),
    };
    if bytes.len() < expected {
        return value_err!(
            "truncated deploy file: the header announces {expected} bytes, the file has {}",
            bytes.len()
        );
    }
    if bytes.len() > expected {
        return value_err!(
            "corrupt deploy file: {} bytes after the announced end ({expected} bytes)",
            bytes.len() - expected
        );
    }
    let stored = le_u32(&bytes[expected - 4..]);
    let actual = crc32fast::hash(&bytes[..expected - 4]);
    if stored != actual {
        return value_err!(
            "corrupt deploy file: checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
        );
    }
    let header: Value = match serde_json::from_slice(&bytes[PREAMBLE..PREAMBLE + header_len]) {
        Ok(v) => v,
        Err(e) => return value_err!("corrupt deploy file: header is not valid JSON ({e})"),
    };
    let data = &bytes[data_start..data_start + data_len];
    let tensors = read_tensors(&header, data.len())?;
    Ok(File {
        header,
        tensors,
        data,
    })
}

fn read_tensors(header: &Value, data_len: usize) -> Result<HashMap<String, TensorEntry>> {
    let table = match header.get("tensors").and_then(Value::as_object) {
        Some(t) => t,
        None => return value_err!("corrupt deploy file: header has no 'tensors' table"),
    };
    let mut out = HashMap::with_capacity(table.len());
    for (name, entry) in table {
        let field = |key: &str| entry.get(key);
        let dtype = match field("dtype").and_then(Value::as_str) {
            Some("f32") => DType::F32,
            Some("u64") => DType::U64,
            other => return value_err!("corrupt deploy file: tensor '{name}' has dtype {other:?}"),
        };
        let shape: Option<Vec<usize>> = field("shape").and_then(Value::as_array).and_then(|a| {
            a.iter()
                .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
                .collect()
        });
        let offset = field("offset")
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok());
        let nbytes = field("nbytes")
            .and_then(Value::as_u64)
            .and_then(|v| usize::try_from(v).ok());
        let (shape, offset, nbytes) = match (shape, offset, nbytes) {
            (Some(s), Some(o), Some(n)) => (s, o, n),
            _ => {
                return value_err!(
                    "corrupt deploy file: tensor '{name}' needs a shape, an offset and nbytes"
                )
            }
        };
        let count = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if count.and_then(|c| c.checked_mul(dtype.size())) != Some(nbytes) {
            return value_err!(
                "corrupt deploy file: tensor '{name}' of shape {shape:?} cannot hold {nbytes} bytes"
            );
        }
        let end = offset.checked_add(nbytes);
        if offset % ALIGN != 0 || end.is_none_or(|e| e > data_len) {
            return value_err!(
                "corrupt deploy file: tensor '{name}' ({nbytes} bytes at {offset}) lies outside the data section"
            );
        }
        out.insert(
            name.clone(),
            TensorEntry {
                dtype,
                shape,
                bytes: offset..offset + nbytes,
            },
        );
    }
    Ok(out)
}
